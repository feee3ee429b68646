"""Checks of checkpoints (DCP, tms.save/load) and ties over FSDP2 models, on 2 gloo ranks.

Run by `tests/test_distributed_checkpoint.py` through `_dist_harness`; every rank runs every
check, and ``ctx.tmp`` is shared by the ranks.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _dist_harness import Ctx
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

import torch_modelstate as tms
from torch_modelstate import ModelState, _distributed
from torch_modelstate.checkpoint import _collective
from torch_modelstate.checkpoint._files import Checkpoint


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 1))


def _sharded(seed: int = 0, dim: int = 0) -> nn.Module:
    model = _model(seed)
    if dim == 0:
        fully_shard(model[0])
        fully_shard(model)
        return model

    def place(p: nn.Parameter) -> Shard:  # FSDP2 shards other dims only evenly
        return Shard(dim if p.ndim > dim and p.shape[dim] % 2 == 0 else 0)

    fully_shard(model[0], shard_placement_fn=place)
    fully_shard(model, shard_placement_fn=place)
    return model


class _LM(nn.Module):
    """A tiny LM with the output head tied to the embedding (one fully_shard group)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 7, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.norm(self.embed(x)))
        return out


def _tied_lm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = _LM()
    ModelState.new(model).tie("head.weight", "embed.weight")
    fully_shard(model)
    return model


@contextmanager
def _patched(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _fulls(ms: ModelState) -> dict[str, Tensor]:
    return {k: _full(v).clone() for k, v in ms.to_dict().items()}


def _assert_equal(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want), (list(got), list(want))
    for key in want:
        torch.testing.assert_close(_full(got[key]), want[key], msg=key)


def check_dcp_save_then_load_in_place_into_a_sharded_model(ctx: Ctx) -> None:
    """dcp.save({"model": ms}) and dcp.load into another sharded model, in place."""
    saved = ModelState.new(_sharded(seed=1))
    dcp.save({"model": saved}, checkpoint_id=str(ctx.tmp / "dcp"))
    model = _sharded()
    ms = ModelState.new(model)
    weight = model[0].weight
    dcp.load({"model": ms}, checkpoint_id=str(ctx.tmp / "dcp"))
    assert model[0].weight is weight
    _assert_equal(_fulls(ms), _fulls(saved))


def check_dcp_load_reshards_and_loads_into_an_unsharded_model(ctx: Ctx) -> None:
    """A 2-rank Shard(0) DCP checkpoint loads into Shard(1) placements and into a plain model."""
    saved = ModelState.new(_sharded(seed=1))
    want = _fulls(saved)
    dcp.save({"model": saved}, checkpoint_id=str(ctx.tmp / "dcp"))
    other = ModelState.new(_sharded(dim=1))
    assert other.parameters()["0.weight"].placements == (Shard(1),)
    dcp.load({"model": other}, checkpoint_id=str(ctx.tmp / "dcp"))
    _assert_equal(_fulls(other), want)
    plain = ModelState.new(_model())
    dcp.load({"model": plain}, checkpoint_id=str(ctx.tmp / "dcp"))
    _assert_equal(plain.to_dict(), want)


def check_dcp_of_a_sharded_ema(ctx: Ctx) -> None:
    """A sharded EMA (a standalone clone of DTensors) saves and loads through DCP."""
    ema = ModelState.new(_sharded(seed=2)).clone()
    dcp.save({"ema": ema}, checkpoint_id=str(ctx.tmp / "dcp"))
    back = ModelState.new(_sharded()).clone()
    dcp.load({"ema": back}, checkpoint_id=str(ctx.tmp / "dcp"))
    _assert_equal(_fulls(back), _fulls(ema))


def check_tied_embeddings_survive_update_and_dcp(ctx: Ctx) -> None:
    """Identity-tied embedding and head in one fully_shard group: update and DCP keep the tie."""
    model = _tied_lm()
    ms = ModelState.new(model)
    assert ms.ties() == {"head.weight": "embed.weight"}
    assert model.head.weight is model.embed.weight
    value = torch.arange(28.0).reshape(7, 4)
    ms.update({"embed.weight": value})
    torch.testing.assert_close(_full(model.head.weight), value)
    dcp.save({"model": ms}, checkpoint_id=str(ctx.tmp / "dcp"))
    fresh = _tied_lm(seed=3)
    dcp.load({"model": ModelState.new(fresh)}, checkpoint_id=str(ctx.tmp / "dcp"))
    assert fresh.head.weight is fresh.embed.weight
    torch.testing.assert_close(_full(fresh.head.weight), value)
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(fresh(x), model(x))


class _AE(nn.Module):
    """An autoencoder whose decoder weight is a transform tie (transpose) of the encoder's."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.dec = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.dec(torch.relu(self.enc(x)))
        return out


def check_transform_tie_made_before_fully_shard_keeps_working(ctx: Ctx) -> None:
    """A transpose tie made before fully_shard: ties(), to_dict(), update and forward work."""
    torch.manual_seed(0)
    model = _AE()
    ModelState.new(model).tie("dec.weight", "enc.weight", "transpose")
    fully_shard(model)
    ms = ModelState.new(model)
    assert ms.ties() == {"dec.weight": "enc.weight"}
    assert list(ms.to_dict()) == ["enc.weight", "enc.bias", "dec.weight", "dec.bias"]
    value = torch.arange(12.0).reshape(3, 4)
    ms.update({"enc.weight": value})
    assert isinstance(model.enc.weight, DTensor)
    torch.testing.assert_close(_full(ms.to_dict()["dec.weight"]), value.t())
    ref = _AE()
    ref.load_state_dict({k: _full(v) for k, v in ms.to_dict().items()})
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), ref(x))


def check_a_tie_made_after_fully_shard_is_refused_clearly(ctx: Ctx) -> None:
    """A tie made after fully_shard is a ValueError naming fully_shard; the model still runs."""
    torch.manual_seed(0)
    model = _AE()
    fully_shard(model)
    ms = ModelState.new(model)
    with pytest.raises(ValueError, match="fully_shard"):
        ms.tie("dec.weight", "enc.weight", "transpose")
    assert ms.ties() == {}
    assert model(torch.randn(2, 4)).shape == (2, 4)


def _bytes_read(monkey: list[int]) -> Any:
    """A stand-in for Checkpoint.read_into that also counts the bytes asked for."""
    original = Checkpoint.read_into

    def counting(self: Checkpoint, pairs: Any) -> None:
        monkey[0] += sum(info.nbytes for info, _ in pairs)
        original(self, pairs)

    return counting


def _plain_checkpoint(ctx: Ctx, seed: int, name: str = "m.safetensors") -> Path:
    path = ctx.tmp / name
    if ctx.rank == 0:
        tms.save(_model(seed), path)
    dist.barrier()
    return path


def check_collective_save_writes_one_plain_checkpoint(ctx: Ctx) -> None:
    """tms.save(sharded) on every rank: one safetensors file any reader loads unsharded."""
    ms = ModelState.new(_sharded(seed=1))
    want = _fulls(ModelState.new(_model(seed=1)))
    path = ctx.tmp / "m.safetensors"
    tms.save(ms, path)  # collective: returns on every rank once the file is in place
    got = load_file(path)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, msg=key)
    _assert_equal(tms.load(path).to_dict(), want)
    plain = _model(seed=5)
    tms.load(path, into=plain)
    _assert_equal(ModelState.new(plain).to_dict(), want)


def check_collective_save_of_the_sharded_layout(ctx: Ctx) -> None:
    """tms.save(sharded, dir, max_shard_size=...) writes the index and shards, read by anyone
    (here with Shard(1) placements too)."""
    ms = ModelState.new(_sharded(seed=1, dim=1))
    assert ms.parameters()["0.weight"].placements == (Shard(1),)
    tms.save(ms, ctx.tmp / "ckpt", max_shard_size=64)
    assert (ctx.tmp / "ckpt" / "model.safetensors.index.json").exists()
    _assert_equal(tms.load(ctx.tmp / "ckpt").to_dict(), _fulls(ModelState.new(_model(seed=1))))


def check_collective_save_failure_raises_on_every_rank(ctx: Ctx) -> None:
    """A write failing on rank 0 midway (a full disk) raises the same error on every rank."""

    def failing(path: Any, specs: Any, metadata: Any, fill: Any, **kwargs: Any) -> Any:
        fill(specs[:1])  # the first tensor, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    ms = ModelState.new(_sharded())
    patch = failing if ctx.rank == 0 else _collective.write_checkpoint
    with pytest.raises(OSError) as info, _patched(_collective, "write_checkpoint", patch):
        tms.save(ms, ctx.tmp / "m.safetensors")
    assert not (ctx.tmp / "m.safetensors").exists()
    messages: list[object] = [None, None]
    dist.all_gather_object(messages, [type(info.value).__name__, str(info.value)])
    assert messages[0] == messages[1], messages
    assert "No space left" in str(info.value)


def check_collective_load_reads_only_each_ranks_shards(ctx: Ctx) -> None:
    """tms.load(path, into=sharded): right values, and each rank reads about half the bytes."""
    path = _plain_checkpoint(ctx, seed=1)
    want = _fulls(ModelState.new(_model(seed=1)))
    total = sum(v.numel() * v.element_size() for v in want.values())
    for dim in (0, 1):
        model = _sharded(dim=dim)
        weight = model[0].weight
        count = [0]
        with _patched(Checkpoint, "read_into", _bytes_read(count)):
            tms.load(path, into=model)
        assert model[0].weight is weight
        _assert_equal(_fulls(ModelState.new(model)), want)
        mine = sum(
            _distributed.to_local(t).numel() * t.element_size()
            for t in ModelState.new(model).to_dict().values()
        )
        assert count[0] == mine, (count[0], mine, total)
        assert count[0] < 0.75 * total, (count[0], total)


def check_collective_load_is_all_or_nothing_on_every_rank(ctx: Ctx) -> None:
    """A file that does not fit on one rank: every rank raises, no rank writes (buffers too)."""
    good = _plain_checkpoint(ctx, seed=1, name="good.safetensors")
    bad = ctx.tmp / "bad.safetensors"
    if ctx.rank == 0:
        values = dict(_model(seed=1).state_dict())
        values["1.running_mean"] = torch.zeros(7)
        save_file({k: v.contiguous() for k, v in values.items()}, bad)
    dist.barrier()
    ms = ModelState.new(_sharded())
    before = _fulls(ms)
    with pytest.raises(tms.CheckpointMismatchError, match=r"1\.running_mean"):
        tms.load(bad if ctx.rank == 1 else good, into=ms)
    _assert_equal(_fulls(ms), before)
    with pytest.raises(tms.CheckpointMismatchError, match=r"1\.running_mean"):
        tms.io.check(bad if ctx.rank == 1 else good, into=ms)  # the same collective checks


def check_tied_embeddings_survive_collective_save_and_load(ctx: Ctx) -> None:
    """The identity-tied LM saves collectively with its tie, and loads back into a sharded one."""
    model = _tied_lm()
    ms = ModelState.new(model)
    ms.update({"embed.weight": torch.arange(28.0).reshape(7, 4)})
    path = ctx.tmp / "lm.safetensors"
    tms.save(ms, path)
    assert tms.load(path).ties() == {"head.weight": "embed.weight"}
    fresh = _tied_lm(seed=3)
    tms.load(path, into=fresh)
    assert fresh.head.weight is fresh.embed.weight
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(fresh(x), model(x))


def check_load_refuses_a_model_whose_parameters_are_gathered(ctx: Ctx) -> None:
    """After a forward with no backward FSDP2 holds gathered copies: load, check, save refuse."""
    path = _plain_checkpoint(ctx, seed=1)
    model = _sharded()
    model.eval()
    model(torch.randn(2, 4))  # the root group stays gathered
    with pytest.raises(ValueError, match=r"gathered[\s\S]*reshard\(\)"):
        tms.load(path, into=model)
    with pytest.raises(ValueError, match=r"gathered[\s\S]*reshard\(\)"):
        tms.io.check(path, into=model)
    with pytest.raises(ValueError, match=r"save: [\s\S]*reshard\(\)"):
        tms.save(model, ctx.tmp / "gathered.safetensors")
    assert not (ctx.tmp / "gathered.safetensors").exists()
    model.reshard()
    tms.load(path, into=model)
    _assert_equal(_fulls(ModelState.new(model)), _fulls(ModelState.new(_model(seed=1))))
