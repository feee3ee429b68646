"""Read-only mapping access on a ModelState and constructor guidance (issue 12, item 4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_modelstate import ModelState


def _tied() -> tuple[nn.ModuleDict, ModelState]:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(5, 3),
            "head": nn.Linear(3, 5, bias=False),
            "enc": nn.Linear(4, 2),
            "dec": nn.Linear(2, 4),
            "bn": nn.BatchNorm1d(2),
        }
    )
    ms = ModelState.new(model).tie("head.weight", "embed.weight")
    ms.tie("dec.weight", "enc.weight", "transpose")
    return model, ms


def test_getitem_is_the_live_tensor() -> None:
    """`ms[key]` is the module's own tensor; a path list works too."""
    model, ms = _tied()
    assert ms["enc.bias"] is model["enc"].bias
    assert ms["bn.running_mean"] is model["bn"].running_mean
    assert ms[["enc", "bias"]] is model["enc"].bias


def test_getitem_resolves_tie_destinations_as_to_dict() -> None:
    """An identity destination is its source; a transform destination is computed, detached."""
    model, ms = _tied()
    assert ms["head.weight"] is model["embed"].weight
    value = ms["dec.weight"]
    assert torch.equal(value, ms.to_dict()["dec.weight"])
    assert torch.equal(value, model["enc"].weight.t()) and not value.requires_grad


def test_getitem_unknown_key_is_a_key_error_with_did_you_mean() -> None:
    """A typo is a KeyError naming the key and the closest keys."""
    _, ms = _tied()
    with pytest.raises(KeyError, match=r"ModelState\['enc.bais'\]: unknown key") as info:
        ms["enc.bais"]
    assert "did you mean: enc.bias" in str(info.value)


def test_contains_len_and_iter_follow_to_dict() -> None:
    """`in`, `len` and iteration see to_dict's keys in its order, tie destinations included."""
    model, ms = _tied()
    keys = list(ms.to_dict())
    assert list(ms) == keys and len(ms) == len(keys)
    assert "head.weight" in ms and "dec.weight" in ms and "bn.num_batches_tracked" in ms
    assert "nope" not in ms and 3 not in ms and ("enc", "bias") not in ms
    model["extra"] = nn.Linear(1, 1)  # the view is live
    assert "extra.weight" in ms and len(ms) == len(keys) + 2


def test_mapping_access_on_a_standalone_state() -> None:
    """A state built from a dict reads the same way; an empty one has length 0."""
    w = torch.ones(2)
    ms = ModelState.new({"fc": {"weight": w}})
    assert ms["fc.weight"] is w and list(ms) == ["fc.weight"] and len(ms) == 1
    assert len(ModelState.empty()) == 0 and list(ModelState.empty()) == []


def test_constructor_with_a_model_points_to_new() -> None:
    """`ModelState(model)` is a TypeError that shows `ModelState.new(model)`."""
    with pytest.raises(TypeError, match=r"takes no arguments: build a ModelState with") as info:
        ModelState(nn.Linear(2, 2))  # type: ignore[call-arg]
    message = str(info.value)
    assert "got: ModelState(Linear)" in message and "ModelState.new(model)" in message
    with pytest.raises(TypeError, match=r"ModelState\.new"):
        ModelState(obj={"w": torch.ones(1)})  # type: ignore[call-arg]


def test_constructor_without_arguments_still_makes_an_empty_state() -> None:
    """`ModelState()` (used internally) is an empty standalone state."""
    ms = ModelState()
    assert ms.to_dict() == {} and ms.module is None and len(ms) == 0
