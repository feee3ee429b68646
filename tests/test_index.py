"""The index: kept with its module, stale by identity only, and wrappers seen through."""

from __future__ import annotations

import copy
import gc
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn

import torch_modelstate as tms
from torch_modelstate import ModelState, _guard
from torch_modelstate._guard import DictGuard


class Net(nn.Module):
    """Two layers and a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.b = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.bn(self.a(x)))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


PLAIN_KEYS = list(net().state_dict())
X = torch.linspace(-1.0, 1.0, 12).reshape(4, 3)


# --------------------------------------------------------------------------- staleness by identity


MODES = pytest.mark.parametrize("versions", [True, False], ids=["dict versions", "identity"])


@pytest.fixture
def mode(monkeypatch: pytest.MonkeyPatch, versions: bool) -> None:
    """DictGuards built in the test watch by dict version (True) or entry identity."""
    if versions and not _guard._versions_work():
        pytest.skip("this Python keeps no dict versions that torch can read")
    monkeypatch.setattr(_guard, "_VERSIONS_WORK", [versions])


def _dicts() -> tuple[dict[str, object], dict[str, object], dict[str, object]]:
    return {"w": torch.zeros(1), "b": None}, {}, {"child": object()}


CHANGES = {
    "entry added to an empty dict": lambda d: d[1].__setitem__("x", 1),
    "entry added": lambda d: d[0].__setitem__("x", 1),
    "entry replaced": lambda d: d[0].__setitem__("w", torch.zeros(1)),
    "None replaced": lambda d: d[0].__setitem__("b", torch.zeros(1)),
    "entry set to None": lambda d: d[0].__setitem__("w", None),
    "entry deleted": lambda d: d[2].pop("child"),
    "None entry deleted": lambda d: d[0].pop("b"),
    "one deleted, one added": lambda d: (d[2].pop("child"), d[1].__setitem__("c", 1)),
    "renamed": lambda d: d[2].__setitem__("other", d[2].pop("child")),
    "cleared": lambda d: d[0].clear(),
}


@MODES
@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.usefixtures("mode")
def test_a_dict_guard_sees_every_change_of_its_dicts(change: str) -> None:
    dicts = _dicts()
    guard = DictGuard(dicts)
    assert guard.check()
    CHANGES[change](dicts)
    assert not guard.check()


@MODES
@pytest.mark.usefixtures("mode")
def test_a_dict_guard_holds_through_reads_and_same_object_writes() -> None:
    dicts = _dicts()
    guard = DictGuard(dicts)
    _ = [list(d.items()) for d in dicts], dicts[0].get("w"), "x" in dicts[1]
    dicts[0]["w"] = dicts[0]["w"]  # the same object again: nothing changed
    assert guard.check()
    weight = dicts[0]["w"]
    dicts[0]["w"] = torch.ones(1)  # swapped out and back, as a hook does around a forward
    dicts[0]["w"] = weight
    assert guard.check()
    assert guard.check()  # (by version: the new version recorded)


def test_dict_versions_are_used_only_where_every_change_moves_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The probe refuses a version that stands still on a change, or moves on a read."""
    assert _guard._probe_versions() == (_guard._dict_version is not None)
    monkeypatch.setattr(_guard, "_dict_version", lambda d: 0)
    assert not _guard._probe_versions()
    reads = iter(range(10**6))
    monkeypatch.setattr(_guard, "_dict_version", lambda d: next(reads))
    assert not _guard._probe_versions()
    monkeypatch.setattr(_guard, "_dict_version", lambda d: len(d))  # misses a replacement
    assert not _guard._probe_versions()


def test_child_replaced_through_modules_is_followed() -> None:
    """After ``parent._modules[name] = prebuilt``, update writes the new child, not the old."""
    model = net()
    prebuilt = nn.Linear(3, 2)
    ms = ModelState.new(model)
    ms.to_dict()
    old = model.b
    before = old.bias.detach().clone()
    model._modules["b"] = prebuilt
    ms.update({"b.bias": torch.ones(2)})
    assert torch.equal(prebuilt.bias, torch.ones(2))
    assert torch.equal(old.bias, before)
    assert ms["b.bias"] is prebuilt.bias


def test_parameter_replaced_in_place_is_followed() -> None:
    """A parameter object replaced under its name (as fully_shard or to_empty do) is followed."""
    model = net()
    ms = ModelState.new(model)
    ms.to_dict()
    fresh = nn.Parameter(torch.zeros(3))
    model.a._parameters["bias"] = fresh
    assert ms["a.bias"] is fresh
    ms.update({"a.bias": torch.ones(3)})
    assert torch.equal(fresh, torch.ones(3))


def test_parameter_set_from_none_is_followed() -> None:
    """A parameter slot that held None and now holds a tensor appears in the view."""
    model = net()
    model.b = nn.Linear(3, 2, bias=False)
    model.b.register_parameter("bias", None)
    ms = ModelState.new(model)
    assert "b.bias" not in ms.to_dict()
    model.b._parameters["bias"] = nn.Parameter(torch.zeros(2))
    assert "b.bias" in ms.to_dict()


def test_buffer_re_registered_as_non_persistent_leaves_the_state() -> None:
    """Re-registering a buffer as non-persistent (the same tensor) removes it from the view."""
    model = net()
    ms = ModelState.new(model)
    assert "bn.running_mean" in ms.state()
    model.bn.register_buffer("running_mean", model.bn.running_mean, persistent=False)
    assert "bn.running_mean" not in ms.state()
    assert list(ms.to_dict()) == list(model.state_dict())


def test_buffer_replaced_by_assignment_is_followed() -> None:
    """A buffer replaced by assignment (``self.n = self.n + 1``) is the one the view returns."""
    model = net()
    ms = ModelState.new(model)
    ms.to_dict()
    model.bn.num_batches_tracked = model.bn.num_batches_tracked + 1
    assert ms["bn.num_batches_tracked"] is model.bn.num_batches_tracked


# --------------------------------------------------------------------------- scoped and kept


def test_views_of_one_module_share_its_index() -> None:
    """`ModelState.new(model)` at every step reuses the index kept with the model."""
    model = net()
    first = ModelState.new(model)._idx()
    assert ModelState.new(model)._idx() is first
    assert ModelState.new(model).to_dict() == ModelState.new(model).to_dict()
    assert ModelState.new(model)._idx() is first


def test_assignment_in_an_unrelated_module_keeps_the_index() -> None:
    """A buffer or parameter assigned in another model invalidates nothing here."""
    model = net()
    index = ModelState.new(model)._idx()
    other = nn.Linear(2, 2)
    other.register_buffer("n", torch.zeros(()))
    other.n = other.n + 1
    other.weight = nn.Parameter(torch.zeros(2, 2))
    nn.Linear(5, 5)
    assert index.is_current()
    assert ModelState.new(model)._idx() is index


def test_assignment_in_the_model_makes_its_index_stale() -> None:
    """A buffer replaced inside the model makes its index stale, and only its own."""
    model, other = net(), net()
    index, other_index = ModelState.new(model)._idx(), ModelState.new(other)._idx()
    model.bn.num_batches_tracked = model.bn.num_batches_tracked + 1
    assert not index.is_current()
    assert other_index.is_current()


def test_a_kept_index_does_not_travel_with_copies() -> None:
    """deepcopy and pickling of a viewed model give copies with their own tensors and keys."""
    model = net()
    ModelState.new(model).to_dict()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        view = ModelState.new(clone)
        assert list(view.to_dict()) == PLAIN_KEYS
        assert view["a.weight"] is clone.a.weight
        assert list(clone.state_dict()) == PLAIN_KEYS


def test_a_kept_index_does_not_enter_the_state_dict() -> None:
    """The module's state_dict keys are unchanged by a view."""
    model = net()
    ModelState.new(model).to_dict()
    assert list(model.state_dict()) == PLAIN_KEYS
    model.load_state_dict(net().state_dict())


# --------------------------------------------------------------------------- wrappers


def test_compiled_model_shows_the_plain_keys() -> None:
    """`ModelState.new(torch.compile(m))` has m's keys and tensors, not `_orig_mod.` ones."""
    model = net()
    ms = ModelState.new(torch.compile(model, backend="eager"))
    assert list(ms.to_dict()) == PLAIN_KEYS
    assert ms.module is model
    assert ms["a.weight"] is model.a.weight


def test_save_of_a_compiled_model_writes_the_plain_keys(tmp_path: Path) -> None:
    """`tms.save` of a compiled model writes the plain model's keys."""
    model = net()
    path = tmp_path / "model.safetensors"
    tms.save(torch.compile(model, backend="eager"), path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(PLAIN_KEYS)
    tms.load(path, into=torch.compile(net(), backend="eager"))


def test_data_parallel_shows_the_plain_keys() -> None:
    """DataParallel (on the CPU) is seen through: keys without `module.`."""
    model = net()
    ms = ModelState.new(nn.DataParallel(model))
    assert list(ms.to_dict()) == PLAIN_KEYS
    ms.freeze("a.**")
    assert not model.a.weight.requires_grad


def test_nested_wrappers_are_seen_through() -> None:
    """A compiled DataParallel model is seen through both wrappers."""
    model = net()
    ms = ModelState.new(torch.compile(nn.DataParallel(model), backend="eager"))
    assert ms.module is model


def test_ddp_shows_the_plain_keys(one_rank: None) -> None:
    """DistributedDataParallel (one gloo process) is seen through: keys without `module.`."""
    model = net()
    ddp = nn.parallel.DistributedDataParallel(model)
    ms = ModelState.new(ddp)
    assert list(ms.to_dict()) == PLAIN_KEYS
    ms.update({"b.bias": torch.ones(2)})
    assert torch.equal(model.b.bias, torch.ones(2))


# --------------------------------------------------------------------------- meta, to_empty


def test_to_empty_then_repairing_ties_with_tie() -> None:
    """After to_empty of a meta model splits an identity tie, `tie` repairs it."""
    with torch.device("meta"):
        model = net()
        model.b = nn.Linear(3, 3)
    ms = ModelState.new(model).tie("b.weight", "a.weight")
    assert ms.ties() == {"b.weight": "a.weight"}
    model.to_empty(device="cpu")
    assert ms.ties() == {}
    ms.tie("b.weight", "a.weight")
    assert model.b.weight is model.a.weight
    assert model.a.weight.device.type == "cpu"
    assert ms.ties() == {"b.weight": "a.weight"}


def test_to_empty_keeps_transform_ties_and_their_devices() -> None:
    """A transform tie made on the meta device computes on the CPU after to_empty."""
    with torch.device("meta"):
        model = nn.ModuleDict({"enc": nn.Linear(4, 3), "dec": nn.Linear(3, 4)})
    ms = ModelState.new(model).tie("dec.weight", "enc.weight", "transpose")
    model.to_empty(device="cpu")
    # to_empty leaves memory uninitialised (it may hold NaN, which torch.equal never matches).
    known = torch.arange(12.0).reshape(3, 4)
    with torch.no_grad():
        model["enc"].weight.copy_(known)
    computed = ms.to_dict()["dec.weight"]
    assert computed.device.type == "cpu"
    assert torch.equal(computed, known.t())
    ms.untie("dec.weight").tie("dec.weight", "enc.weight", "transpose")
    assert torch.equal(model["dec"].weight, known.t())


def test_replacing_a_transform_ties_source_module_is_reported_and_untie_recovers() -> None:
    """A source module replaced under a transform tie: the view says so, and untie keeps the
    value the destination has now."""
    model = nn.ModuleDict({"enc": nn.Linear(4, 3), "dec": nn.Linear(3, 4)})
    ms = ModelState.new(model).tie("dec.weight", "enc.weight", "transpose")
    old = model["enc"]
    model["enc"] = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="no longer part of this model"):
        ms.to_dict()
    ms.untie("dec.weight")
    assert torch.equal(model["dec"].weight, old.weight.t())
    assert ms.ties() == {}
    ms.tie("dec.weight", "enc.weight", "transpose")
    assert torch.equal(model["dec"].weight, model["enc"].weight.t())


def test_a_shallow_copy_does_not_use_its_originals_index() -> None:
    """A module whose __dict__ was copied (copy.copy, DataParallel replicas) gets its own index."""
    model = net()
    ModelState.new(model).to_dict()
    twin = copy.copy(model)
    twin._modules = dict(model._modules)
    twin._modules["b"] = nn.Linear(3, 2)
    assert ModelState.new(twin)["b.weight"] is twin.b.weight
    assert ModelState.new(model)["b.weight"] is model.b.weight


# --------------------------------------------------------------------------- stale kept indexes


def test_a_stale_kept_index_is_dropped_by_the_next_view() -> None:
    """The index kept with a model holds its tensors. After `load_state_dict(assign=True)`
    replaced them, the next ModelState call on the model drops the stale index, and the
    old tensors go; a current index stays."""
    from torch.multiprocessing.reductions import StorageWeakRef

    model = nn.Linear(64, 64)
    ModelState.new(model).freeze("bias")
    old = StorageWeakRef(model.weight.untyped_storage())
    fresh = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(fresh, assign=True)
    index = ModelState.new(model)._idx()
    gc.collect()
    assert old.expired()
    assert ModelState.new(model)._idx() is index


def test_a_model_whose_class_defines_eq_keeps_its_index() -> None:
    """A module class that defines __eq__ (and so has no hash) keeps its index as any
    other."""

    class Compared(nn.Linear):
        def __eq__(self, other: object) -> bool:
            return isinstance(other, Compared) and self.in_features == other.in_features

    model = Compared(2, 2)
    ms = ModelState.new(model)
    assert ms._idx() is ModelState.new(model)._idx()
    assert list(ms.to_dict()) == ["weight", "bias"]


def test_a_full_collection_does_not_change_a_models_dict_under_iteration() -> None:
    """A garbage collection changes nothing of a model, even with a stale kept index (a
    callback that dropped stale indexes at full collections was tried and removed: it
    changed ``vars(model)`` under code iterating it)."""
    model = nn.Linear(3, 3)
    ModelState.new(model).to_dict()
    model.load_state_dict({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)}, assign=True)
    names = []
    for name in vars(model):  # e.g. a walker that allocates while it goes
        names.append(name)
        gc.collect()
    assert "_parameters" in names


def test_identity_mode_sees_a_parameter_reordered_in_its_dict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where dict versions are unavailable (`_VERSIONS_WORK` False: the identity pass),
    ``m._parameters["weight"] = m._parameters.pop("weight")`` keeps every object and the
    count, so the index stays "current" with the old order. With versions the moved dict
    is compared key by key and the index is rebuilt. Both modes (the `_index`
    invariant: keys of a current index are exactly those a fresh walk gives):
    ``list(ms.to_dict()) == list(model.state_dict())`` == ["bias", "weight"].
    (Before: ["weight", "bias"] in identity mode.)"""
    monkeypatch.setattr(_guard, "_VERSIONS_WORK", [False])
    model = nn.Linear(2, 2)
    ms = ModelState.new(model)
    assert list(ms.to_dict()) == ["weight", "bias"]
    model._parameters["weight"] = model._parameters.pop("weight")
    assert list(ms.to_dict()) == list(model.state_dict()) == ["bias", "weight"]


def test_dict_versions_are_not_used_without_the_gil(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a free-threaded build torch keeps dict versions in a map other threads may change
    under a read: the identity pass serves there."""
    monkeypatch.setattr(_guard, "_VERSIONS_WORK", [])
    monkeypatch.setattr(_guard.sys, "_is_gil_enabled", lambda: False, raising=False)
    assert not _guard._versions_work()
