"""update: in-place copies with casting, every argument form, errors, atomicity, live views."""

from __future__ import annotations

import pytest
import torch
from strategies import Stat, assert_unchanged, snapshot
from torch import nn

from torch_modelstate import ModelState


def randn_like_all(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """New values for every key: random floats, and 7 for integer tensors."""
    out = {}
    for key, t in model.state_dict().items():
        if t.dtype.is_floating_point:
            out[key] = torch.randn(t.shape, dtype=dtype or t.dtype)
        else:
            out[key] = torch.full(t.shape, 7, dtype=t.dtype)
    return out


# --------------------------------------------------------------------------- writing


def test_update_with_a_flat_dict_writes_values(mlp):
    """A flat `{key: tensor}` is copied into the model."""
    values = randn_like_all(mlp)
    ModelState.new(mlp).update(values)
    for key, t in mlp.state_dict().items():
        assert torch.equal(t, values[key]), key


def test_update_loads_a_whole_state_dict(mlp):
    """`ms.update(other.state_dict())` makes the model equal to the other, state included."""
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    other(torch.randn(5, 3))
    ModelState.new(mlp).update(other.state_dict())
    for key, t in mlp.state_dict().items():
        assert torch.equal(t, other.state_dict()[key]), key


def test_update_returns_the_same_state(mlp):
    """`update` returns the ModelState itself."""
    ms = ModelState.new(mlp)
    assert ms.update({}) is ms


def test_update_with_a_subset_leaves_the_rest(mlp):
    """Keys not given keep their values."""
    snap = snapshot(mlp)
    ModelState.new(mlp).update({"3.bias": torch.ones(2)})
    assert torch.equal(mlp[3].bias, torch.ones(2))
    for key, (_, clone, _) in snap.items():
        if key != "3.bias":
            assert torch.equal(mlp.state_dict()[key], clone), key


def test_update_with_a_nested_dict(mlp):
    """A nested `{name: {...}}` dict is accepted like its flat form."""
    ModelState.new(mlp).update({"3": {"bias": torch.ones(2), "weight": torch.zeros(2, 4)}})
    assert torch.equal(mlp[3].bias, torch.ones(2))
    assert torch.equal(mlp[3].weight, torch.zeros(2, 4))


def test_update_with_a_nested_dict_as_updated_state(mlp):
    """The second argument may be nested too."""
    ModelState.new(mlp).update({}, {"1": {"running_mean": torch.ones(4)}})
    assert torch.equal(mlp[1].running_mean, torch.ones(4))


def test_update_with_a_mixed_nested_and_flat_dict():
    """A dict that mixes dotted keys and nested dicts is flattened."""
    ms = ModelState.new({"a": torch.zeros(1), "b.c": torch.zeros(2)})
    ms.update({"a": torch.ones(1), "b": {"c": torch.ones(2)}})
    assert torch.equal(ms.to_dict()["b.c"], torch.ones(2))
    assert torch.equal(ms.to_dict()["a"], torch.ones(1))


def test_update_with_a_dict_backed_modelstate(mlp):
    """A ModelState built from a dict is a valid source."""
    ModelState.new(mlp).update(ModelState.new({"3.bias": torch.ones(2)}))
    assert torch.equal(mlp[3].bias, torch.ones(2))


def test_update_with_a_module_backed_modelstate(mlp):
    """A ModelState over another model copies that model's parameters and state."""
    torch.manual_seed(3)
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    other(torch.randn(5, 3))
    src = ModelState.new(other)
    ModelState.new(mlp).update(src.parameters(), src.state())
    for key, t in mlp.state_dict().items():
        assert torch.equal(t, other.state_dict()[key]), key
    ModelState.new(mlp).update(ModelState.new(other))
    assert torch.equal(mlp[1].running_var, other[1].running_var)


def test_update_of_a_dict_backed_state_writes_its_tensors():
    """For a dict-backed state the dict's own tensors are written in place."""
    w = torch.zeros(3)
    ModelState.new({"w": w}).update({"w": torch.arange(3.0)})
    assert torch.equal(w, torch.arange(3.0))


def test_update_preserves_identity_and_data_ptr(mlp):
    """Every tensor is the same object at the same address after an update."""
    before = {k: (t, t.data_ptr()) for k, t in mlp.state_dict(keep_vars=True).items()}
    ModelState.new(mlp).update(randn_like_all(mlp, torch.float64))
    for key, t in mlp.state_dict(keep_vars=True).items():
        assert t is before[key][0], key
        assert t.data_ptr() == before[key][1], key


def test_update_keeps_the_optimizer_working(mlp):
    """An optimizer made before an update steps the updated parameters."""
    opt = torch.optim.SGD(mlp.parameters(), lr=1.0)
    ModelState.new(mlp).update({"3.bias": torch.zeros(2)})
    mlp[3].bias.grad = torch.ones(2)
    opt.step()
    assert torch.equal(mlp[3].bias, -torch.ones(2))


def test_update_preserves_requires_grad(mlp):
    """Trainable parameters stay trainable and frozen ones stay frozen."""
    ms = ModelState.new(mlp).freeze("0.weight")
    values = {k: v.detach().clone() for k, v in ms.parameters().items()}
    ms.update({k: v.requires_grad_(k == "0.weight") for k, v in values.items()})
    assert not mlp[0].weight.requires_grad
    assert all(p.requires_grad for n, p in mlp.named_parameters() if n != "0.weight")
    assert mlp[0].weight.is_leaf


def test_update_does_not_record_autograd_history(mlp):
    """Copying a value that requires grad leaves the parameter a leaf with no grad_fn."""
    source = torch.randn(2, requires_grad=True)
    ModelState.new(mlp).update({"3.bias": source * 2})
    assert mlp[3].bias.grad_fn is None
    assert mlp[3].bias.is_leaf


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (torch.float64, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float64),
        (torch.int64, torch.float32),
        (torch.float16, torch.float32),
    ],
    ids=str,
)
def test_update_casts_to_the_destination_dtype(src, dst):
    """Values are cast to the destination's dtype; the destination keeps its dtype."""
    lin = nn.Linear(3, 2).to(dst)
    value = (
        torch.arange(6).reshape(2, 3).to(src) / 4
        if src.is_floating_point
        else torch.ones(2, 3, dtype=src)
    )
    ModelState.new(lin).update({"weight": value})
    assert lin.weight.dtype == dst
    assert torch.equal(lin.weight, value.to(dst))


def test_update_casts_floats_into_integer_state(mlp):
    """A float value for `num_batches_tracked` is cast to its integer dtype."""
    ModelState.new(mlp).update({"1.num_batches_tracked": torch.tensor(5.0)})
    assert mlp[1].num_batches_tracked.dtype == torch.long
    assert mlp[1].num_batches_tracked.item() == 5


def test_updated_state_writes_trainable_state(mlp):
    """Trainable state in the second argument is written."""
    ModelState.new(mlp).update({}, {"1.running_mean": torch.ones(4)})
    assert torch.equal(mlp[1].running_mean, torch.ones(4))


def test_updated_state_skips_frozen_state(mlp):
    """Frozen state in the second argument is ignored, as in Axon."""
    ms = ModelState.new(mlp).freeze("1.running_mean")
    ms.update({}, {"1.running_mean": torch.ones(4), "1.running_var": torch.full((4,), 2.0)})
    assert torch.equal(mlp[1].running_mean, torch.zeros(4))
    assert torch.equal(mlp[1].running_var, torch.full((4,), 2.0))


def test_first_argument_writes_frozen_state_and_parameters(mlp):
    """The first argument writes frozen leaves too, so `ms.update(sd)` loads everything."""
    ms = ModelState.new(mlp).freeze()
    ms.update({"1.running_mean": torch.ones(4), "0.bias": torch.ones(4)})
    assert torch.equal(mlp[1].running_mean, torch.ones(4))
    assert torch.equal(mlp[0].bias, torch.ones(4))
    assert not mlp[0].bias.requires_grad


def test_both_arguments_together(mlp):
    """Parameters from the first argument and state from the second are both written."""
    ModelState.new(mlp).update({"3.bias": torch.ones(2)}, {"1.running_var": torch.zeros(4)})
    assert torch.equal(mlp[3].bias, torch.ones(2))
    assert torch.equal(mlp[1].running_var, torch.zeros(4))


def test_update_through_an_identity_tie_writes_the_source():
    """Writing an identity-tie destination writes the shared tensor."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model[1].weight = model[0].weight
    ModelState.new(model).update({"1.weight": torch.ones(2, 2)})
    assert torch.equal(model[0].weight, torch.ones(2, 2))


def test_update_with_values_that_alias_other_destinations():
    """Swapping two tensors by update writes the values as they were at the call."""
    a, b = torch.zeros(2), torch.ones(2)
    ModelState.new({"a": a, "b": b}).update({"a": b, "b": a})
    assert torch.equal(a, torch.ones(2))
    assert torch.equal(b, torch.zeros(2))


# --------------------------------------------------------------------------- errors


def test_unknown_key_is_a_key_error_naming_it(mlp):
    """An unknown key is a KeyError whose message names the key."""
    with pytest.raises(KeyError, match=r"unknown key `3.weigth`"):
        ModelState.new(mlp).update({"3.weigth": torch.zeros(2, 4)})


def test_unknown_key_error_suggests_a_close_match(mlp):
    """The message suggests the nearest real key."""
    with pytest.raises(KeyError, match=r"did you mean: 3.weight"):
        ModelState.new(mlp).update({"3.weigth": torch.zeros(2, 4)})


def test_unknown_key_error_prints_unquoted(mlp):
    """`str()` of the KeyError is the readable message (not a repr with escaped newlines)."""
    with pytest.raises(KeyError) as info:
        ModelState.new(mlp).update({"3.weigth": torch.zeros(2, 4)})
    assert str(info.value).startswith("update: unknown key")
    assert "\n" in str(info.value)


def test_unknown_key_in_updated_state_is_a_key_error(mlp):
    """The second argument is checked for unknown keys too."""
    with pytest.raises(KeyError, match=r"unknown key `1.running_men`"):
        ModelState.new(mlp).update({}, {"1.running_men": torch.zeros(4)})


def test_parameter_in_updated_state_is_a_key_error(mlp):
    """A parameter key in the second argument is a KeyError that says where it belongs."""
    with pytest.raises(KeyError, match=r"`0.bias` is a parameter"):
        ModelState.new(mlp).update({}, {"0.bias": torch.zeros(4)})


def test_shape_mismatch_is_a_value_error(mlp):
    """A wrong shape is a ValueError that shows expected and given shapes."""
    with pytest.raises(ValueError, match=r"`3.weight`.\n  expected: \(2, 4\)\n  got: \(4, 2\)"):
        ModelState.new(mlp).update({"3.weight": torch.zeros(4, 2)})


def test_non_tensor_value_is_a_type_error(mlp):
    """A value that is not a tensor is a TypeError naming the key."""
    with pytest.raises(TypeError, match=r"value for `3.bias` is not a tensor"):
        ModelState.new(mlp).update({"3.bias": [0.0, 0.0]})


@pytest.mark.parametrize("arg", [[("3.bias", torch.zeros(2))], torch.zeros(2), "3.bias"], ids=repr)
def test_argument_that_is_no_dict_is_a_type_error(mlp, arg):
    """The arguments must be dicts or ModelStates."""
    with pytest.raises(TypeError, match="must be a dict of tensors"):
        ModelState.new(mlp).update(arg)


def test_two_values_for_one_tied_tensor_is_a_value_error():
    """Different values for the two keys of an identity tie are a ValueError."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model[1].weight = model[0].weight
    with pytest.raises(ValueError, match="one tied tensor"):
        ModelState.new(model).update({"0.weight": torch.zeros(2, 2), "1.weight": torch.ones(2, 2)})


def _tied_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    model[2].weight = model[0].weight
    return model


def _good(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, 3) for k, v in model.state_dict().items() if k != "2.weight"}


ERRORS = {
    "unknown key": (KeyError, lambda m: ({**_good(m), "2.wieght": torch.zeros(2, 2)}, None)),
    "shape": (ValueError, lambda m: ({**_good(m), "2.bias": torch.zeros(3)}, None)),
    "not a tensor": (TypeError, lambda m: ({**_good(m), "2.bias": 1.0}, None)),
    "tie conflict": (ValueError, lambda m: ({**_good(m), "2.weight": torch.zeros(2, 2)}, None)),
    "state unknown": (KeyError, lambda m: (_good(m), {"1.running_meen": torch.zeros(2)})),
    "state shape": (ValueError, lambda m: (_good(m), {"1.running_mean": torch.zeros(5)})),
    "state not a tensor": (TypeError, lambda m: (_good(m), {"1.running_mean": "x"})),
    "state parameter": (KeyError, lambda m: (_good(m), {"1.weight": torch.zeros(2)})),
    "state arg type": (TypeError, lambda m: (_good(m), [1])),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_update_is_atomic_for_every_error(case):
    """On any error nothing has been written: every tensor keeps its object, address, value."""
    model = _tied_model()
    error, make = ERRORS[case]
    first, second = make(model)
    ms = ModelState.new(model)
    snap = snapshot(model)
    with pytest.raises(error):
        ms.update(first, second)
    assert_unchanged(model, snap)


def test_meta_tensor_value_is_refused_before_writing():
    """A value with no data (meta device) is refused before anything is written."""
    model = nn.Linear(2, 2)
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError, NotImplementedError), match=r"(?i)meta"):
        ModelState.new(model).update(
            {"weight": torch.ones(2, 2), "bias": torch.ones(2, device="meta")}
        )
    assert_unchanged(model, snap)


def test_dict_backed_update_is_atomic():
    """A dict-backed state is unchanged after a failing update, too."""
    a, b = torch.zeros(2), torch.zeros(3)
    ms = ModelState.new({"a": a, "b": b})
    with pytest.raises(ValueError, match="shape mismatch for `b`"):
        ms.update({"a": torch.ones(2), "b": torch.ones(2)})
    assert torch.equal(a, torch.zeros(2))


# --------------------------------------------------------------------------- a live view


def test_sees_parameters_after_load_state_dict_assign():
    """After `load_state_dict(assign=True)` the same ModelState writes the new parameters."""
    model = nn.Linear(2, 2)
    new_sd = {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
    ms = ModelState.new(model)
    ms.to_dict()
    model.load_state_dict(new_sd, assign=True)
    ms.update({"weight": torch.ones(2, 2)})
    assert torch.equal(model.weight, torch.ones(2, 2))
    assert ms.parameters()["weight"] is model.weight


def test_sees_tensors_after_to_empty():
    """After `to_empty` from the meta device the ModelState writes the materialised tensors."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ms = ModelState.new(model)
    assert ms.to_dict()["0.weight"].is_meta
    model.to_empty(device="cpu")
    values = randn_like_all(model)
    ms.update(values)
    for key, t in model.state_dict().items():
        assert t.device.type == "cpu"
        assert torch.equal(t, values[key]), key


def test_sees_tensors_after_to_dtype(mlp):
    """After `.to(float64)` (which replaces buffers) the ModelState uses the new tensors."""
    ms = ModelState.new(mlp)
    ms.to_dict()
    mlp.to(torch.float64)
    assert all(t.dtype == torch.float64 for k, t in ms.to_dict().items() if "num_batches" not in k)
    ms.update({"1.running_mean": torch.ones(4)})
    assert torch.equal(mlp[1].running_mean, torch.ones(4, dtype=torch.float64))
    assert ms.state()["1.running_mean"] is mlp[1].running_mean


def test_sees_an_added_submodule(mlp):
    """A submodule added after the first use shows up and can be written."""
    extra = nn.Linear(2, 1)
    ms = ModelState.new(mlp)
    ms.to_dict()
    mlp.append(extra)
    assert list(ms.parameters())[-2:] == ["4.weight", "4.bias"]
    ms.update({"4.bias": torch.ones(1)})
    assert torch.equal(extra.bias, torch.ones(1))


def test_forgets_a_deleted_submodule(nested):
    """A deleted submodule's keys disappear and are unknown to update."""
    ms = ModelState.new(nested)
    ms.to_dict()
    del nested["heads"]["cls"]
    assert not any(k.startswith("heads.cls.") for k in ms.to_dict())
    with pytest.raises(KeyError, match=r"unknown key `heads.cls.bias`"):
        ms.update({"heads.cls.bias": torch.zeros(3)})


def test_sees_a_replaced_submodule(mlp):
    """A submodule replaced by attribute assignment is the one written to."""
    replacement = nn.Linear(4, 2)
    ms = ModelState.new(mlp)
    ms.to_dict()
    mlp[3] = replacement
    ms.update({"3.bias": torch.ones(2)})
    assert torch.equal(replacement.bias, torch.ones(2))
    assert ms.parameters()["3.weight"] is replacement.weight


def test_sees_a_submodule_replaced_by_set_submodule(nested):
    """`set_submodule` with a module made before the view is picked up."""
    replacement = nn.Linear(2, 3)
    ms = ModelState.new(nested)
    ms.to_dict()
    nested.set_submodule("heads.cls", replacement)
    ms.update({"heads.cls.bias": torch.ones(3)})
    assert torch.equal(replacement.bias, torch.ones(3))


def test_sees_a_newly_registered_buffer(stat):
    """A buffer registered after the first use is state and can be written."""
    ms = ModelState.new(stat)
    ms.to_dict()
    stat.register_buffer("extra", torch.zeros(2))
    assert list(ms.state()) == ["count", "mean", "extra"]
    ms.update({}, {"extra": torch.ones(2)})
    assert torch.equal(stat.extra, torch.ones(2))


def test_sees_a_replaced_parameter(mlp):
    """A parameter replaced by attribute assignment is the one written to."""
    ms = ModelState.new(mlp)
    ms.to_dict()
    mlp[0].bias = nn.Parameter(torch.zeros(4))
    ms.update({"0.bias": torch.ones(4)})
    assert torch.equal(mlp[0].bias, torch.ones(4))


def test_sees_a_replaced_buffer(stat):
    """A buffer replaced by attribute assignment is the one written to."""
    ms = ModelState.new(stat)
    ms.to_dict()
    stat.mean = torch.zeros(3)
    ms.update({"mean": torch.ones(3)})
    assert torch.equal(stat.mean, torch.ones(3))


def test_forgets_a_deleted_parameter():
    """A parameter set to None is no longer a leaf."""
    model = nn.Linear(2, 2)
    ms = ModelState.new(model)
    ms.to_dict()
    model.bias = None
    assert list(ms.parameters()) == ["weight"]


def test_sees_a_non_persistent_buffer_made_persistent():
    """Re-registering a buffer as persistent makes it state."""
    module = Stat(2)
    ms = ModelState.new(module)
    assert "scratch" not in ms.state()
    module.register_buffer("scratch", module.scratch, persistent=True)
    assert "scratch" in ms.state()


def test_update_with_a_transposed_view_of_the_destination() -> None:
    """A value that is a transposed view of its own destination is read before writing."""
    w = torch.arange(9.0).reshape(3, 3)
    expected = w.t().clone()
    ModelState.new({"w": w}).update({"w": w.t()})
    assert torch.equal(w, expected)


def test_updated_state_as_a_modelstate_gives_its_state() -> None:
    """A ModelState as `updated_state` contributes its state, not its parameters."""
    target = nn.BatchNorm1d(2)
    source = nn.BatchNorm1d(2)
    with torch.no_grad():
        source.running_mean.fill_(3.0)
        source.weight.fill_(5.0)
    ModelState.new(target).update({}, ModelState.new(source))
    assert torch.equal(target.running_mean, torch.full((2,), 3.0))
    assert torch.equal(target.weight, torch.ones(2))
