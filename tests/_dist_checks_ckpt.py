"""Checks of checkpoints (DCP, tms.save/load) and ties over FSDP2 models, on 2 gloo ranks.

Run by `tests/test_distributed_checkpoint.py` through `_dist_harness`; every rank runs every
check, and ``ctx.tmp`` is shared by the ranks.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from _dist_harness import Ctx
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from torch_modelstate import ModelState


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
