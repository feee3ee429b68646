"""Checks of ModelState over FSDP2 (`fully_shard`) and DDP models, run on 2 gloo ranks.

Run by `tests/test_distributed.py` through `_dist_harness`; every rank runs every check.
The model has uneven shards on purpose (5 rows over 2 ranks; a 1-element bias).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist_harness import Ctx
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

import torch_modelstate as tms
from torch_modelstate import ModelState, _distributed, merges
from torch_modelstate._errors import KeyNotFoundError


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 1))


def _sharded(seed: int = 0) -> nn.Module:
    model = _model(seed)
    fully_shard(model[0])
    fully_shard(model)
    return model


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _fulls(ms: ModelState) -> dict[str, Tensor]:
    return {k: _full(v).clone() for k, v in ms.to_dict().items()}


def _values(seed: int) -> dict[str, Tensor]:
    """Full values for every key of `_model` (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v + seed)
        for k, v in _model().state_dict().items()
    }


def _assert_equal(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want), (list(got), list(want))
    for key in want:
        torch.testing.assert_close(_full(got[key]), want[key], msg=key)


def check_keys_accessors_ties_to_dict_match_the_unsharded_model(ctx: Ctx) -> None:
    """Keys, accessors (live DTensors), ties() and to_dict() are those of the plain model."""
    plain = ModelState.new(_model())
    model = _sharded()
    ms = ModelState.new(model)
    assert list(ms.to_dict()) == list(plain.to_dict())
    assert list(ms.parameters()) == list(plain.parameters())
    assert list(ms.state()) == list(plain.state())
    assert ms.parameters()["0.weight"] is model[0].weight
    assert isinstance(ms.parameters()["0.weight"], DTensor)
    assert not isinstance(ms.state()["1.running_mean"], DTensor)
    assert ms.ties() == {}
    _assert_equal(_fulls(ms), _fulls(plain))


def check_freeze_before_sharding_survives_and_unfreeze_after_works(ctx: Ctx) -> None:
    """freeze before fully_shard carries over; freeze/unfreeze after it act on the DTensors."""
    model = _model()
    ModelState.new(model).freeze("0.**")
    fully_shard(model[0])
    fully_shard(model)
    ms = ModelState.new(model)
    assert sorted(ms.frozen_parameters()) == ["0.bias", "0.weight"]
    assert not model[0].weight.requires_grad
    ms.unfreeze("0.weight").freeze("2.**")
    assert model[0].weight.requires_grad and not model[2].bias.requires_grad
    assert sorted(ms.trainable_parameters()) == ["0.weight", "1.bias", "1.weight"]


def check_update_from_full_tensors_copies_each_ranks_shard(ctx: Ctx) -> None:
    """update with full tensors (params and buffers mixed) writes each rank's own shard."""
    model = _sharded()
    ms = ModelState.new(model)
    weight = model[0].weight
    values = _values(1)
    ms.update(values)
    assert ms.parameters()["0.weight"] is weight
    _assert_equal(_fulls(ms), values)
    local = model[0].weight.to_local()
    rows = 3 if ctx.rank == 0 else 2
    torch.testing.assert_close(local, values["0.weight"][3 * ctx.rank : 3 * ctx.rank + rows])


def check_update_from_dtensors_of_the_destinations_placements(ctx: Ctx) -> None:
    """update from DTensors (another sharded model's state) with buffers: local writes."""
    src = ModelState.new(_sharded(seed=7))
    dst = ModelState.new(_sharded())
    with CommDebugMode() as comms:
        dst.update(src)
    assert comms.get_total_counts() == 1  # the one all-reduce of the collective checks
    _assert_equal(_fulls(dst), _fulls(src))
    mesh = dst.parameters()["2.weight"].device_mesh
    value = distribute_tensor(torch.full((1, 5), 3.0), mesh, [Shard(1)])  # other placements
    dst.update({"2.weight": value})
    torch.testing.assert_close(_full(dst.parameters()["2.weight"]), torch.full((1, 5), 3.0))


def check_update_refuses_a_full_tensor_of_the_wrong_shape(ctx: Ctx) -> None:
    """A full tensor must have the DTensor's global shape; nothing is written otherwise."""
    ms = ModelState.new(_sharded())
    before = _fulls(ms)
    bad = dict(_values(1), **{"0.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"shape mismatch for `0.weight`[\s\S]*\(5, 3\)"):
        ms.update(bad)
    _assert_equal(_fulls(ms), before)


def check_update_validation_is_collective(ctx: Ctx) -> None:
    """If one rank's values do not fit, every rank raises the same error and none writes."""
    ms = ModelState.new(_sharded())
    before = _fulls(ms)
    values = _values(1)
    if ctx.rank == 1:
        values["2.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"shape mismatch for `2.bias`") as info:
        ms.update(values)
    _assert_equal(_fulls(ms), before)
    messages: list[object] = [None, None]
    dist.all_gather_object(messages, str(info.value))
    assert messages[0] == messages[1]


def check_merge_between_sharded_states_is_local(ctx: Ctx) -> None:
    """merge of two sharded states (with buffers) runs on local shards: no data is sent."""
    lhs_model, rhs_model = _sharded(), _sharded(seed=3)
    lhs, rhs = ModelState.new(lhs_model), ModelState.new(rhs_model)
    a, b = _fulls(lhs), _fulls(rhs)
    with CommDebugMode() as comms:
        lhs.merge(rhs, merges.lerp(0.25))
    assert comms.get_total_counts() == 1  # only the all-reduce of the collective checks
    want = {k: (torch.lerp(a[k], b[k], 0.25) if a[k].is_floating_point() else b[k]) for k in a}
    _assert_equal(_fulls(lhs), want)


def check_merge_with_a_custom_function_on_dtensors(ctx: Ctx) -> None:
    """merge with a plain function works on DTensor operands."""
    lhs, rhs = ModelState.new(_sharded()), ModelState.new(_sharded(seed=3))
    a, b = _fulls(lhs), _fulls(rhs)
    lhs.merge(rhs, lambda path, x, y: x + 2 * y if x.is_floating_point() else y)
    want = {k: (a[k] + 2 * b[k] if a[k].is_floating_point() else b[k]) for k in a}
    _assert_equal(_fulls(lhs), want)


def check_clone_of_a_sharded_state_is_sharded(ctx: Ctx) -> None:
    """clone() gives DTensors of the same placements: each rank holds its shard only."""
    ms = ModelState.new(_sharded())
    copy = ms.clone()
    for key, value in copy.parameters().items():
        live = ms.parameters()[key]
        assert isinstance(value, DTensor) and value.placements == live.placements, key
        assert value.to_local().shape == live.to_local().shape, key
        if value.to_local().numel():  # (a rank may hold an empty shard)
            assert value.to_local().data_ptr() != live.to_local().data_ptr(), key
    _assert_equal(_fulls(copy), _fulls(ms))


def check_ema_of_a_sharded_model_in_two_lines(ctx: Ctx) -> None:
    """ema = ms.clone(); ema.merge(ms, merges.ema(d)) tracks the model, shard by shard."""
    model = _sharded()
    ms = ModelState.new(model)
    ema = ms.clone()
    want = _fulls(ema)
    for step in range(3):
        ms.update(_values(step + 10))
        ema.merge(ms, merges.ema(0.9))
        now = _fulls(ms)
        want = {
            k: (torch.lerp(want[k], now[k], 0.1) if now[k].is_floating_point() else now[k])
            for k in now
        }
    _assert_equal(_fulls(ema), want)


def check_ddp_model_has_the_plain_keys_and_every_operation_works(ctx: Ctx) -> None:
    """DDP: the plain model's keys; freeze, update, merge and save work on each replica."""
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    ms = ModelState.new(ddp)
    assert list(ms.to_dict()) == list(ModelState.new(_model()).to_dict())
    ms.freeze("0.**")
    assert not model[0].weight.requires_grad
    values = _values(2)
    ms.update(values)
    _assert_equal(ms.to_dict(), values)
    other = ModelState.new(_model(seed=5))
    ms.merge(other, merges.replace())
    _assert_equal(ms.to_dict(), other.to_dict())
    path = ctx.tmp / "ddp.safetensors"
    if ctx.rank == 0:
        tms.save(ddp, path)
    dist.barrier()
    fresh = _model(seed=9)
    tms.load(path, into=fresh)
    _assert_equal(ModelState.new(fresh).to_dict(), other.to_dict())


def check_agreement_raises_one_error_on_every_rank(ctx: Ctx) -> None:
    """_distributed.agreement: a failure on one rank is the same error on all ranks."""
    ms = ModelState.new(_sharded())
    tensors = list(ms.to_dict().values())
    with pytest.raises(KeyError) as info, _distributed.agreement(tensors):
        if ctx.rank == 1:
            raise KeyNotFoundError("update: unknown key `x`")
    assert str(info.value) == "update: unknown key `x`"
    assert type(info.value) is KeyNotFoundError
    with _distributed.agreement(tensors):  # all pass: nothing raised
        pass


def check_update_refuses_a_model_whose_parameters_are_gathered(ctx: Ctx) -> None:
    """After a forward with no backward FSDP2 holds gathered copies: update and merge refuse."""
    model = _sharded()
    model.eval()
    model(torch.randn(2, 3))  # the root group stays gathered
    ms = ModelState.new(model)
    with pytest.raises(ValueError, match=r"reshard\(\)"):
        ms.update(_values(1))
    with pytest.raises(ValueError, match=r"reshard\(\)"):
        ms.merge(ModelState.new(_sharded(seed=2)), merges.lerp(0.5))
    model.reshard()
    ms.update(_values(1))
    _assert_equal(_fulls(ModelState.new(model)), _values(1))


def check_merge_validation_is_collective(ctx: Ctx) -> None:
    """If `fun` fails on one rank, every rank raises the same error and none writes."""
    lhs, rhs = ModelState.new(_sharded()), ModelState.new(_sharded(seed=3))
    before = _fulls(lhs)

    def fun(path: list[str], x: Tensor, y: Tensor) -> Tensor:
        if ctx.rank == 1 and path == ["2", "bias"]:
            raise ValueError("fun: refused on this rank")
        return x + y

    with pytest.raises(ValueError, match="fun: refused on this rank"):
        lhs.merge(rhs, fun)
    _assert_equal(_fulls(lhs), before)
