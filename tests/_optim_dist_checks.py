"""Checks of param groups, gradual unfreezing and optimizer state over FSDP2, on 2 gloo ranks.

Run by `tests/test_optim_distributed.py` through `_dist_harness`; every rank runs every check.
"""

from __future__ import annotations

import pytest
import torch
from _dist_harness import Ctx
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import torch_modelstate as tms
from torch_modelstate import ModelState, merges, optim


def _sharded() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 1))
    fully_shard(model[0])
    fully_shard(model)
    return model


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    torch.manual_seed(1)
    opt.zero_grad()
    model(torch.randn(4, 3)).square().mean().backward()
    opt.step()


def check_param_groups_hold_the_live_dtensor_parameters(ctx: Ctx) -> None:
    """Groups over a sharded model: plain keys, the live DTensors, an optimizer that steps."""
    model = _sharded()
    ms = ModelState.new(model)
    groups = ms.param_groups({optim.no_decay(model): {"weight_decay": 0.0}}, weight_decay=0.1)
    assert [g["param_names"] for g in groups] == [
        ["0.bias", "1.weight", "1.bias", "2.bias"],
        ["0.weight", "2.weight"],
    ]
    live = dict(model.named_parameters())
    for group in groups:
        for key, p in zip(group["param_names"], group["params"], strict=True):
            assert p is live[key] and isinstance(p, DTensor)
    opt = torch.optim.AdamW(groups, lr=0.1)
    before = model[0].weight.full_tensor().clone()
    _step(model, opt)
    assert not torch.equal(model[0].weight.full_tensor(), before)


def check_unfreeze_adds_sharded_parameters_to_the_optimizer(ctx: Ctx) -> None:
    """Gradual unfreezing after fully_shard: the thawed DTensors join as one group and train."""
    model = _sharded()
    ms = ModelState.new(model).freeze("0.**")
    opt = torch.optim.AdamW(ms.param_groups(), lr=0.1)
    _step(model, opt)
    before = model[0].weight.full_tensor().clone()
    ms.unfreeze("0.**", optimizer=opt, lr=0.01)
    ms.unfreeze("0.**", optimizer=opt, lr=0.01)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["param_names"] == ["0.weight", "0.bias"]
    _step(model, opt)
    assert not torch.equal(model[0].weight.full_tensor(), before)


def _trained(steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _sharded()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(steps):
        _step(model, opt)
    return model, opt


def _fulls(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() for k, v in ModelState.new(model).parameters().items()}


def check_save_and_load_optimizer_of_a_sharded_model_resume_training_exactly(ctx: Ctx) -> None:
    """save_optimizer + save over FSDP2, rebuild, load both: the next steps equal uninterrupted
    training bit for bit, and the loaded state is sharded like the parameters."""
    model, opt = _trained(3)
    tms.save(model, ctx.tmp / "model.safetensors")
    tms.save_optimizer(opt, model, ctx.tmp / "opt.safetensors")  # collective: rank 0 writes
    assert sorted(p.name for p in ctx.tmp.iterdir()) == ["model.safetensors", "opt.safetensors"]
    for _ in range(2):
        _step(model, opt)
    want = _fulls(model)
    torch.manual_seed(5)
    fresh = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 1))
    fully_shard(fresh[0])
    fully_shard(fresh)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5, weight_decay=0.0)
    tms.load(ctx.tmp / "model.safetensors", into=fresh)
    tms.load_optimizer(fresh_opt, fresh, ctx.tmp / "opt.safetensors")
    assert fresh_opt.param_groups[0]["lr"] == 0.1
    for p in fresh.parameters():
        state = fresh_opt.state[p]
        assert isinstance(p, DTensor) and not isinstance(state["step"], DTensor)
        for name in ("exp_avg", "exp_avg_sq"):
            assert isinstance(state[name], DTensor) and state[name].placements == p.placements
            assert state[name].to_local().shape == p.to_local().shape
    for _ in range(2):
        _step(fresh, fresh_opt)
    got = _fulls(fresh)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def check_a_sharded_optimizer_file_loads_into_a_plain_model(ctx: Ctx) -> None:
    """The file save_optimizer writes over FSDP2 is plain: a single-process optimizer over an
    unsharded model loads it and holds the full state tensors."""
    model, opt = _trained(2)
    path = ctx.tmp / "opt.safetensors"
    tms.save_optimizer(opt, model, path)
    plain = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Linear(6, 1))
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=0.5)
    tms.load_optimizer(plain_opt, plain, path)  # no DTensor: nothing collective
    live = dict(plain.named_parameters())
    for key, p in ModelState.new(model).parameters().items():
        mine, theirs = opt.state[p], plain_opt.state[live[key]]
        assert torch.equal(theirs["step"], mine["step"]), key
        for name in ("exp_avg", "exp_avg_sq"):
            assert not isinstance(theirs[name], DTensor)
            assert torch.equal(theirs[name], mine[name].full_tensor()), (key, name)


def check_save_optimizer_of_a_sharded_model_with_no_state_yet(ctx: Ctx) -> None:
    """Before the first step (no DTensor state): still collective, one file from rank 0;
    loading it into a stepped optimizer restores its options and empties its state."""
    model, opt = _trained(1)
    unstepped = torch.optim.AdamW(model.parameters(), lr=0.3)
    tms.save_optimizer(unstepped, model, ctx.tmp / "opt.safetensors")
    assert [p.name for p in ctx.tmp.iterdir()] == ["opt.safetensors"]
    assert len(opt.state) == len(list(model.parameters()))
    tms.load_optimizer(opt, model, ctx.tmp / "opt.safetensors")
    assert len(opt.state) == 0 and opt.param_groups[0]["lr"] == 0.3


def check_a_mismatch_on_one_rank_raises_on_every_rank_and_changes_nothing(ctx: Ctx) -> None:
    """load_optimizer with a bad file on rank 1 only: the same error on both ranks, the
    optimizer's state and options untouched; a bad save writes nothing anywhere."""
    model, opt = _trained(2)
    good, bad = ctx.tmp / "good.safetensors", ctx.tmp / "bad.safetensors"
    tms.save_optimizer(opt, model, good)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, sgd)
    tms.save_optimizer(sgd, model, bad)
    before = {
        id(p): {k: v.full_tensor() if isinstance(v, DTensor) else v.clone() for k, v in s.items()}
        for p, s in opt.state.items()
    }
    with pytest.raises(tms.CheckpointMismatchError, match="the state of a SGD"):
        tms.load_optimizer(opt, model, bad if ctx.rank == 1 else good)
    assert opt.param_groups[0]["lr"] == 0.1
    for p, state in opt.state.items():
        for k, v in state.items():
            value = v.full_tensor() if isinstance(v, DTensor) else v
            assert torch.equal(value, before[id(p)][k]), k
    opt.param_groups[0]["betas"] = object() if ctx.rank == 0 else (0.9, 0.999)
    with pytest.raises(TypeError, match="option `betas` of group 0"):
        tms.save_optimizer(opt, model, ctx.tmp / "never.safetensors")
    assert not (ctx.tmp / "never.safetensors").exists()


def check_stochastic_ema_of_a_sharded_model_rounds_each_shard(ctx: Ctx) -> None:
    """rounding='stochastic' into a sharded bf16 model works locally, like its plain twin."""
    model = _sharded().to(torch.bfloat16)
    ms = ModelState.new(model)
    target = {k: torch.ones(v.shape) for k, v in ms.parameters().items()}
    before = {k: v.full_tensor().float() for k, v in ms.parameters().items()}
    ms.merge(target, merges.ema(0.5, rounding="stochastic"))
    for key, value in ms.parameters().items():
        assert isinstance(value, DTensor) and value.dtype == torch.bfloat16, key
        exact = (before[key] + 1.0) / 2
        ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
        assert ((value.full_tensor().float() - exact).abs() <= ulp).all(), key
    with pytest.raises(TypeError, match="sharded"):
        ms.merge(target, merges.slerp(0.5))


def check_an_fp32_clone_of_a_sharded_bf16_model_stays_sharded(ctx: Ctx) -> None:
    """clone(dtype=fp32) of an FSDP2 bf16 model: DTensors, same placements, the same values."""
    model = _sharded().to(torch.bfloat16)
    ms = ModelState.new(model)
    shadow = ms.clone(dtype=torch.float32)
    for key, value in ms.parameters().items():
        copy = shadow.parameters()[key]
        assert isinstance(copy, DTensor) and copy.dtype == torch.float32, key
        assert copy.placements == value.placements
        assert copy.to_local().shape == value.to_local().shape
        assert torch.equal(copy.full_tensor(), value.full_tensor().float()), key
    target = {k: torch.ones(v.shape) for k, v in ms.parameters().items()}
    shadow.merge(target, merges.ema(0.5))
    assert torch.equal(
        shadow.parameters()["0.bias"].full_tensor(),
        (ms.parameters()["0.bias"].full_tensor().float() + 1) / 2,
    )
