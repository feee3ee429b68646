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


def check_save_optimizer_of_a_sharded_model_is_refused_clearly(ctx: Ctx) -> None:
    """Sharded optimizer state is not written as one file yet: a TypeError naming DCP."""
    model = _sharded()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _step(model, opt)
    with pytest.raises(TypeError, match=r"torch\.distributed\.checkpoint"):
        tms.save_optimizer(opt, model, ctx.tmp / f"opt{ctx.rank}.safetensors")
    assert not (ctx.tmp / f"opt{ctx.rank}.safetensors").exists()


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
