"""Keys and paths: to_path / to_key and nested <-> flat dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_modelstate as tms
from torch_modelstate import ModelState


def test_to_path_splits_a_dotted_key():
    """`to_path` splits a dotted key at every dot."""
    assert tms.to_path("a.b.0.w") == ["a", "b", "0", "w"]


def test_to_key_joins_a_path():
    """`to_key` joins a list path with dots."""
    assert tms.to_key(["a", "b", "0", "w"]) == "a.b.0.w"


def test_to_path_of_a_single_segment():
    """A key without dots is a one-segment path."""
    assert tms.to_path("weight") == ["weight"]


def test_to_path_accepts_a_list_or_tuple_path():
    """`to_path` returns a list path as a new list and converts a tuple."""
    path = ["head", "bias"]
    assert tms.to_path(path) == path
    assert tms.to_path(path) is not path
    assert tms.to_path(("head", "bias")) == ["head", "bias"]


def test_to_key_returns_a_valid_key_unchanged():
    """`to_key` of a dotted key is that key."""
    assert tms.to_key("enc.0.weight") == "enc.0.weight"


def test_round_trips_for_every_key_of_a_nested_model(nested):
    """`to_key(to_path(k)) == k` and back for every key of a ModuleList/ModuleDict tree."""
    keys = list(nested.state_dict())
    assert "encoder.1.0.weight" in keys
    assert "heads.reg1.weight" in keys
    for key in keys:
        assert tms.to_key(tms.to_path(key)) == key
        assert tms.to_path(tms.to_key(key.split("."))) == key.split(".")


def test_round_trips_for_every_key_of_a_deep_sequential():
    """Keys with multi-digit indices through nested Sequentials round trip exactly."""
    model = nn.Sequential(*[nn.Sequential(nn.Linear(1, 1)) for _ in range(12)])
    keys = list(model.state_dict())
    assert "11.0.bias" in keys
    assert [tms.to_key(tms.to_path(k)) for k in keys] == keys


@pytest.mark.parametrize("key", ["", "a..b", ".a", "a."])
def test_to_path_rejects_empty_segments(key):
    """An empty key or an empty segment is a ValueError."""
    with pytest.raises(ValueError, match="empty"):
        tms.to_path(key)


def test_to_key_rejects_an_empty_path():
    """An empty list is no path."""
    with pytest.raises(ValueError, match="must not be empty"):
        tms.to_key([])


def test_to_key_rejects_non_str_segments():
    """Integer segments are a TypeError that says to write indices as strings."""
    with pytest.raises(TypeError, match="'0', not 0"):
        tms.to_key(["layers", 0, "weight"])


def test_to_path_rejects_non_str_segments():
    """`to_path` checks the segments of a list path too."""
    with pytest.raises(TypeError, match="holds a int"):
        tms.to_path(["layers", 0])


@pytest.mark.parametrize("segment", ["", "a.b"])
def test_to_key_rejects_empty_or_dotted_segments(segment):
    """A segment that is empty or holds a dot is a ValueError."""
    with pytest.raises(ValueError, match="non-empty segments without dots"):
        tms.to_key(["fc", segment])


@pytest.mark.parametrize("key", [3, None, b"a.b", {"a": 1}])
def test_to_path_rejects_other_types(key):
    """Anything but a string or a list/tuple of strings is a TypeError."""
    with pytest.raises(TypeError, match="dotted string or a list of strings"):
        tms.to_path(key)


def test_to_flat_flattens_nested_dicts():
    """Nested dicts become dotted keys in order."""
    assert tms.to_flat({"fc": {"weight": 1, "bias": 2}, "out": {"0": {"w": 3}}}) == {
        "fc.weight": 1,
        "fc.bias": 2,
        "out.0.w": 3,
    }


def test_to_flat_passes_dotted_keys_through():
    """A dict that mixes dotted and nested keys is accepted."""
    assert tms.to_flat({"a.b": 1, "c": {"d": 2}}) == {"a.b": 1, "c.d": 2}


def test_to_nested_builds_nested_dicts():
    """Dotted keys become nested dicts, sharing common prefixes."""
    assert tms.to_nested({"a.b.c": 1, "a.b.d": 2, "e": 3}) == {"a": {"b": {"c": 1, "d": 2}}, "e": 3}


def test_flat_nested_round_trip_of_a_state_dict(nested):
    """`to_flat(to_nested(sd))` gives back the state dict's keys, order and tensors."""
    sd = nested.state_dict()
    back = tms.to_flat(tms.to_nested(sd))
    assert list(back) == list(sd)
    assert all(back[k] is sd[k] for k in sd)


def test_nested_flat_round_trip():
    """`to_nested(to_flat(n)) == n` for a nested dict."""
    tree = {"enc": {"0": {"w": 1, "b": 2}, "1": {"w": 3}}, "head": {"w": 4}}
    assert tms.to_nested(tms.to_flat(tree)) == tree


def test_to_nested_rejects_a_leaf_that_is_also_a_prefix():
    """A key below another key that is a leaf is a ValueError."""
    with pytest.raises(ValueError, match="itself a leaf"):
        tms.to_nested({"a": 1, "a.b": 2})


def test_to_nested_rejects_a_prefix_that_is_also_a_leaf():
    """A leaf whose key is a prefix of an earlier key is a ValueError."""
    with pytest.raises(ValueError, match="both a leaf and a prefix"):
        tms.to_nested({"a.b": 2, "a": 1})


def test_to_nested_rejects_empty_segments():
    """Keys with empty segments are refused when nesting."""
    with pytest.raises(ValueError, match="empty segment"):
        tms.to_nested({"a..b": 1})


def test_to_flat_rejects_a_key_given_twice():
    """The same leaf given nested and dotted is a ValueError."""
    with pytest.raises(ValueError, match="given twice"):
        tms.to_flat({"a.b": 1, "a": {"b": 2}})


def test_to_flat_rejects_non_str_keys():
    """Integer keys are a TypeError."""
    with pytest.raises(TypeError, match="Keys must be strings"):
        tms.to_flat({"layers": {0: torch.ones(1)}})


def test_modelstate_from_nested_and_flat_dicts_agree():
    """A nested dict and its flat form give a ModelState with the same keys and tensors."""
    w, b = torch.ones(2, 2), torch.zeros(2)
    nested = ModelState.new({"fc": {"weight": w, "bias": b}}).to_dict()
    flat = ModelState.new({"fc.weight": w, "fc.bias": b}).to_dict()
    assert list(nested) == list(flat) == ["fc.weight", "fc.bias"]
    assert nested["fc.weight"] is flat["fc.weight"] is w
