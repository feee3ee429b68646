"""ms.pack(): a flat buffer per (device, dtype) group, identity kept, fast merges, safe fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_modelstate import ModelState, _pack, merges


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _storages(model: nn.Module) -> set[int]:
    tensors = list(model.parameters()) + list(model.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_pack_keeps_identity_and_values() -> None:
    """Parameters and buffers stay the same objects with the same values, in 2 flat buffers."""
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objects = list(model.parameters()) + list(model.buffers())
    ModelState.new(model).pack()
    after = list(model.parameters()) + list(model.buffers())
    assert all(a is b for a, b in zip(objects, after, strict=True))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(_storages(model)) == 2  # float32 and int64 (num_batches_tracked)


def test_grads_and_optimizer_steps_work_packed() -> None:
    """Backward and an SGD step on a packed model equal those of an unpacked twin."""
    packed, plain = _model(), _model()
    ModelState.new(packed).pack()
    x = torch.randn(5, 3)
    for model in (packed, plain):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).sum().backward()
        opt.step()
    for (k, a), b in zip(packed.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    ms = ModelState.new(packed)
    assert _pack.layout_of([leaf.tensor for leaf in ms._idx().leaves]) is not None


def test_clone_of_packed_is_packed_with_the_same_layout() -> None:
    """clone() of a packed state is packed alike, so merges take the flat path."""
    ms = ModelState.new(_model()).pack()
    ema = ms.clone()
    lhs = [leaf.tensor for leaf in ema._idx().leaves]
    rhs = [leaf.tensor for leaf in ms._idx().leaves]
    assert _pack.flat_pairs(lhs, rhs) is not None


@pytest.mark.parametrize("how", ["ema", "add", "update"])
def test_packed_results_equal_unpacked(how: str) -> None:
    """ema/add merges and update between packed states give what unpacked ones give."""
    results = []
    for packed in (True, False):
        model = _model()
        ms = ModelState.new(model)
        if packed:
            ms.pack()
        other = ms.clone()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
            model[1].num_batches_tracked.add_(3)
        if how == "ema":
            other.merge(ms, merges.ema(0.75))
        elif how == "add":
            other.merge(ms, merges.add())
        else:
            other.update(ms)
        results.append(other.to_dict())
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), key


def test_replacing_a_tensor_drops_the_fast_path() -> None:
    """After .to(float64) or load_state_dict(assign=True) the merge still gives right values."""
    model = _model()
    ms = ModelState.new(model).pack()
    ema = ms.clone()
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()}, assign=True)
    fresh = ModelState.new(model)
    rhs = [leaf.tensor for leaf in fresh._idx().leaves]
    assert _pack.layout_of(rhs) is None
    expected = {k: v.lerp(fresh[k], 0.5) if v.is_floating_point() else fresh[k]
                for k, v in ema.to_dict().items()}  # fmt: skip
    ema.merge(fresh, merges.lerp(0.5))
    assert all(torch.equal(ema[k], v) for k, v in expected.items())
    model.double()  # replaces .data: no longer at the packed slices
    assert _pack.layout_of([leaf.tensor for leaf in ms._idx().leaves]) is None


def test_data_reassigned_drops_the_fast_path() -> None:
    """A parameter whose .data is replaced is no longer intact; merges fall back correctly."""
    model = _model()
    ms = ModelState.new(model).pack()
    ema = ms.clone()
    model[0].weight.data = torch.full((4, 3), 2.0)
    ema.merge(ms, merges.lerp(1.0))
    assert torch.equal(ema["0.weight"], torch.full((4, 3), 2.0))


def test_pack_refuses_meta_and_changes_nothing() -> None:
    """A meta tensor cannot be packed: ValueError, and no tensor was moved."""
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    weight = model.weight
    with pytest.raises(ValueError, match="pack"):
        ModelState.new(model).pack()
    assert model.weight is weight and model.weight.is_meta


def test_packed_merge_runs_one_op_per_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """An EMA merge between a packed state and its packed clone uses no per-tensor foreach op."""
    ms = ModelState.new(_model()).pack()
    ema = ms.clone()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("per-tensor path taken")

    monkeypatch.setattr(torch, "_foreach_lerp_", refuse)
    monkeypatch.setattr(torch, "_foreach_copy_", refuse)
    ema.merge(ms, merges.ema(0.5))
    ema.update(ms)
    assert all(torch.equal(ema[k], v) for k, v in ms.to_dict().items())


def test_swap_within_one_packed_buffer_reads_before_writing() -> None:
    """Values that alias other destinations in the same flat buffer are read first (a swap)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    ms = ModelState.new(model).pack()
    a, b = ms["0.weight"].clone(), ms["1.weight"].clone()
    ms.update({"0.weight": ms["1.weight"], "1.weight": ms["0.weight"]})
    assert torch.equal(ms["0.weight"], b) and torch.equal(ms["1.weight"], a)


def test_a_packed_model_moved_by_half_frees_its_old_buffers() -> None:
    """`.half()` on a packed model re-homes every tensor; the packing keeps no reference to
    the old fp32 buffer (it held the flat buffers: a model-sized copy kept alive)."""
    import gc

    from torch import nn
    from torch.multiprocessing.reductions import StorageWeakRef

    from torch_modelstate import ModelState

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    ms = ModelState.new(model)
    ms.pack()
    old = StorageWeakRef(model[0].weight.untyped_storage())
    assert not old.expired()
    model.half()
    gc.collect()
    assert old.expired()
    assert ms.to_dict()["0.weight"].dtype == torch.float16
