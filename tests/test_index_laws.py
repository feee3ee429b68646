"""Laws of the kept index: after any edits to the model, a view sees what a fresh walk sees."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from torch_modelstate import ModelState, _guard
from torch_modelstate._index import index_module

SLOTS = ("a", "b", "c")

# One edit: (what, which slot, a number used by some edits).
EDITS = st.tuples(
    st.sampled_from(
        [
            "replace_child_via_modules",
            "assign_child",
            "delete_child",
            "replace_parameter",
            "parameter_to_none",
            "add_parameter",
            "replace_buffer",
            "buffer_not_persistent",
            "buffer_persistent",
            "share_weight",
            "tie",
            "untie_all",
            "unrelated_assignment",
        ]
    ),
    st.sampled_from(SLOTS),
    st.integers(0, 2),
)


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    for name in SLOTS:
        layer = nn.Linear(3, 3)
        layer.register_buffer("count", torch.zeros(()))
        setattr(model, name, layer)
    return model


def apply(model: nn.Module, ms: ModelState, edit: tuple[str, str, int], other: nn.Module) -> None:
    what, slot, n = edit
    layer = model._modules.get(slot)
    if what == "replace_child_via_modules":
        model._modules[slot] = nn.Linear(3, 3)
    elif what == "assign_child":
        setattr(model, slot, nn.Linear(3, 3))
    elif what == "delete_child":
        if slot in model._modules:
            del model._modules[slot]
    elif layer is None:
        return
    elif what == "replace_parameter" and "weight" in layer._parameters:
        layer._parameters["weight"] = nn.Parameter(torch.randn(3, 3))
    elif what == "parameter_to_none" and "bias" in layer._parameters:
        layer._parameters["bias"] = None
    elif what == "add_parameter":
        layer.register_parameter(f"extra{n}", nn.Parameter(torch.zeros(2)))
    elif what == "replace_buffer" and "count" in layer._buffers:
        layer.count = layer.count + 1
    elif what == "buffer_not_persistent" and "count" in layer._buffers:
        layer.register_buffer("count", layer._buffers["count"], persistent=False)
    elif what == "buffer_persistent" and "count" in layer._buffers:
        layer.register_buffer("count", layer._buffers["count"], persistent=True)
    elif what == "share_weight":
        source = model._modules.get(SLOTS[n])
        if source is not None and isinstance(source._parameters.get("weight"), nn.Parameter):
            layer._parameters["weight"] = source._parameters["weight"]
    elif what == "tie":
        source = SLOTS[n]
        transform = "transpose" if n % 2 else None
        with contextlib.suppress(KeyError, ValueError):  # a refused tie changes nothing
            ms.tie(f"{slot}.weight", f"{source}.weight", transform)
    elif what == "untie_all":
        for dest in list(ms.ties()):
            ms.untie(dest)
    elif what == "unrelated_assignment":
        other.n = other.n + 1


def seen(ms: ModelState) -> dict[str, Any]:
    """What a view shows: keys in order, each stored tensor's identity, ties."""
    index = ms._idx()
    return {
        "order": list(index.order),
        "leaves": [(leaf.key, id(leaf.tensor), leaf.is_param) for leaf in index.leaves],
        "ties": ms.ties(),
    }


@contextlib.contextmanager
def dict_guard_mode(versions: bool) -> Iterator[None]:
    """Indexes built inside watch module dicts by version (True) or by identity (False)."""
    if versions and not _guard._versions_work():
        pytest.skip("this Python keeps no dict versions that torch can read")
    saved = list(_guard._VERSIONS_WORK)
    _guard._VERSIONS_WORK[:] = [versions]
    try:
        yield
    finally:
        _guard._VERSIONS_WORK[:] = saved


def walked(model: nn.Module) -> dict[str, Any]:
    index = index_module(model)
    return {
        "order": list(index.order),
        "leaves": [(leaf.key, id(leaf.tensor), leaf.is_param) for leaf in index.leaves],
        "ties": {dest: tie.source for dest, tie in index.ties.items()},
    }


@pytest.mark.parametrize("versions", [True, False], ids=["dict versions", "identity"])
@given(st.lists(EDITS, max_size=8))
def test_a_view_sees_what_a_fresh_walk_sees(
    versions: bool, edits: list[tuple[str, str, int]]
) -> None:
    """After any edits, a view kept from before and a new view both equal a fresh walk,
    and the keys are those of ``state_dict()``: with the module dicts watched by their
    versions, and by the identity of every entry (where a Python keeps no versions)."""
    with dict_guard_mode(versions):
        check_edits(edits)


def check_edits(edits: list[tuple[str, str, int]]) -> None:
    model = build()
    kept = ModelState.new(model)
    kept.to_dict()
    other = nn.Module()
    other.register_buffer("n", torch.zeros(()))
    for edit in edits:
        apply(model, kept, edit, other)
        orphans = list(index_module(model).orphans)
        if orphans:  # a transform tie's source module was replaced: reported, untie recovers
            with pytest.raises(ValueError, match="no longer part of this model"):
                ModelState.new(model).to_dict()
            for dest in orphans:
                kept.untie(dest)
        fresh = walked(model)
        assert seen(kept) == fresh
        assert seen(ModelState.new(model)) == fresh
        assert fresh["order"] == list(model.state_dict())
