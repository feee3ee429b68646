"""ModelState: construction, accessors and the Inspect-style repr."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_modelstate import ModelState

# --------------------------------------------------------------------------- construction


def test_new_over_a_module_is_a_live_view(mlp):
    """`new(module)` exposes the module's own tensors, including later changes of value."""
    ms = ModelState.new(mlp)
    assert ms.parameters()["0.weight"] is mlp[0].weight
    with torch.no_grad():
        mlp[0].bias.fill_(3.0)
    assert torch.equal(ms.to_dict()["0.bias"], torch.full((4,), 3.0))


def test_new_over_a_module_splits_parameters_and_state(mlp):
    """Parameters are `nn.Parameter`s; state is the persistent buffers."""
    ms = ModelState.new(mlp)
    assert list(ms.parameters()) == [n for n, _ in mlp.named_parameters()]
    assert list(ms.state()) == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]


def test_new_from_a_flat_dict():
    """A flat dict gives those keys, the same tensor objects, all trainable parameters."""
    w, b = torch.ones(2, 2), torch.zeros(2)
    ms = ModelState.new({"fc.weight": w, "fc.bias": b})
    assert list(ms.parameters()) == ["fc.weight", "fc.bias"]
    assert ms.parameters()["fc.weight"] is w
    assert list(ms.trainable_parameters()) == ["fc.weight", "fc.bias"]
    assert ms.state() == {}
    assert ms.frozen_parameters() == {}


def test_new_from_a_nested_dict():
    """A nested dict is flattened to dotted keys in order."""
    w, b, h = torch.ones(2, 2), torch.zeros(2), torch.ones(1)
    ms = ModelState.new({"enc": {"0": {"weight": w, "bias": b}}, "head": h})
    assert list(ms.to_dict()) == ["enc.0.weight", "enc.0.bias", "head"]
    assert ms.to_dict()["enc.0.bias"] is b


def test_new_of_a_modelstate_returns_it_as_is(mlp):
    """`new(ms)` is `ms` itself, not a copy."""
    ms = ModelState.new(mlp)
    assert ModelState.new(ms) is ms
    dict_ms = ModelState.new({"w": torch.ones(1)})
    assert ModelState.new(dict_ms) is dict_ms


@pytest.mark.parametrize("obj", [3, "model", [torch.ones(1)], torch.ones(2), None], ids=repr)
def test_new_of_another_type_is_a_type_error(obj):
    """Anything but a module, a dict or a ModelState is a TypeError."""
    with pytest.raises(TypeError, match=r"takes an nn.Module, a dict of tensors or a ModelState"):
        ModelState.new(obj)


def test_new_from_a_dict_with_a_non_tensor_is_a_type_error():
    """A dict value that is not a tensor is a TypeError naming its key."""
    with pytest.raises(TypeError, match=r"`fc.bias` holds a list"):
        ModelState.new({"fc": {"weight": torch.ones(1), "bias": [0.0]}})


def test_new_from_a_dict_with_a_bad_key_is_a_value_error():
    """A key with an empty segment is a ValueError."""
    with pytest.raises(ValueError, match="empty segment"):
        ModelState.new({"fc..weight": torch.ones(1)})


def test_new_over_a_module_without_tensors():
    """A module with no parameters or buffers gives an empty state."""
    ms = ModelState.new(nn.ReLU())
    assert ms.parameters() == {}
    assert ms.to_dict() == {}


def test_empty_has_nothing():
    """`empty()` has no parameters, state or ties."""
    ms = ModelState.empty()
    for accessor in (
        ms.parameters,
        ms.state,
        ms.trainable_parameters,
        ms.frozen_parameters,
        ms.trainable_state,
        ms.frozen_state,
        ms.to_dict,
        ms.ties,
    ):
        assert accessor() == {}, accessor.__name__


def test_empty_returns_a_new_state_each_time():
    """Two calls of `empty()` give independent states."""
    assert ModelState.empty() is not ModelState.empty()


def test_empty_accepts_masks_and_empty_updates():
    """Freezing and empty updates and merges work on an empty state (a glob selects nothing
    there, which only strict=False allows)."""
    ms = ModelState.empty().freeze().unfreeze("**", strict=False).update({})
    assert ms.merge({}, lambda p, a, b: b).to_dict() == {}
    with pytest.raises(KeyError, match="matches no key"):
        ModelState.empty().unfreeze("**")


def test_empty_rejects_unknown_keys():
    """Any key given to `empty().update` is unknown."""
    with pytest.raises(KeyError, match="unknown key `w`"):
        ModelState.empty().update({"w": torch.ones(1)})


def test_accessors_return_plain_dicts(mlp):
    """Accessors return `dict`s the caller may change without changing the state."""
    ms = ModelState.new(mlp)
    params = ms.parameters()
    assert type(params) is dict
    params.clear()
    assert len(ms.parameters()) == 6


def test_ties_of_a_model_without_ties_is_empty(mlp):
    """`ties()` is empty when no tensor is shared."""
    assert ModelState.new(mlp).ties() == {}


# --------------------------------------------------------------------------- repr


def test_repr_of_a_small_model():
    """The repr counts parameters and state, then trainable parameters and trainable state."""
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    assert repr(ModelState.new(model)) == (
        "ModelState<\n"
        "  Parameters: 17 (72 B)\n"
        "  Trainable Parameters: 12 (48 B)\n"
        "  Trainable State: 5 (24 B)\n"
        ">"
    )


def test_repr_follows_freezing():
    """Frozen parameters and state drop out of the trainable lines, not the total."""
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ms = ModelState.new(model).freeze(["0.**", "1.running_*"])
    assert repr(ms) == (
        "ModelState<\n"
        "  Parameters: 17 (72 B)\n"
        "  Trainable Parameters: 4 (16 B)\n"
        "  Trainable State: 1 (8 B)\n"
        ">"
    )


def test_repr_of_empty():
    """An empty state shows zeros."""
    assert repr(ModelState.empty()) == (
        "ModelState<\n"
        "  Parameters: 0 (0 B)\n"
        "  Trainable Parameters: 0 (0 B)\n"
        "  Trainable State: 0 (0 B)\n"
        ">"
    )


def test_repr_counts_a_tied_tensor_once():
    """A tensor under two keys is counted once."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model[1].weight = model[0].weight
    assert "Parameters: 4 (16 B)\n" in repr(ModelState.new(model))


def test_repr_uses_each_dtype_size():
    """Bytes follow each tensor's element size (bf16: 2, float64: 8, int8: 1)."""
    ms = ModelState.new(
        {
            "a": torch.zeros(10, dtype=torch.bfloat16),
            "b": torch.zeros(10, dtype=torch.float64),
            "c": torch.zeros(10, dtype=torch.int8),
        }
    )
    assert "  Parameters: 30 (110 B)\n" in repr(ms)


def meta_state(nbytes: int) -> ModelState:
    """A dict-backed state of `nbytes` one-byte elements, on the meta device (no memory)."""
    return ModelState.new({"w": torch.empty(nbytes, dtype=torch.uint8, device="meta")})


@pytest.mark.parametrize(
    ("nbytes", "shown"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.00 KB"),
        (4840, "4.84 KB"),
        (1_500_000, "1.50 MB"),
        (2_345_000_000, "2.35 GB"),
        (7_000_000_000_000, "7.00 TB"),
        (3_000_000_000_000_000, "3000.00 TB"),
    ],
)
def test_repr_uses_decimal_units_with_two_decimals(nbytes, shown):
    """Sizes use B, KB, MB, GB, TB (powers of 1000), two decimals, and stop at TB."""
    assert f"  Parameters: {nbytes} ({shown})\n" in repr(meta_state(nbytes))


def test_repr_has_no_thousands_separators():
    """Large counts are printed as plain integers, with no stray commas."""
    text = repr(meta_state(1_234_567))
    assert "Parameters: 1234567 (1.23 MB)" in text
    assert "," not in text


def test_repr_rounds_up_into_the_next_unit():
    """A size that rounds to 1000 of a unit is shown in the next unit."""
    assert "(1.00 MB)" in repr(meta_state(999_999))
