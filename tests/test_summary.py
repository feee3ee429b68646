"""`_summary`: the repr, format_bytes and constructor guidance, split out of `_state`."""

from __future__ import annotations

import pytest
from torch import nn

import torch_modelstate as tms
from torch_modelstate import _state, _summary, cli


def test_repr_is_the_summary_of_its_counts() -> None:
    """ModelState's repr is `summary` of (elements, bytes): all, trainable params, state."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ms = tms.ModelState.new(model).freeze("0.**")
    assert repr(ms) == _summary.summary((15, 64), (4, 16), (5, 24))


def test_format_bytes_is_one_function_everywhere() -> None:
    """tms.format_bytes, the CLI's and _state's re-export are the one in _summary."""
    assert tms.format_bytes is _summary.format_bytes is _state.format_bytes
    assert cli.format_bytes is _summary.format_bytes
    assert tms.format_bytes(1_500_000_000) == "1.50 GB"


def test_constructor_arguments_are_refused_with_the_fix() -> None:
    """ModelState(model) is a TypeError pointing to ModelState.new."""
    with pytest.raises(TypeError, match=r"(?s)ModelState\.new.*fix:"):
        tms.ModelState(nn.Linear(2, 2))  # type: ignore[call-arg]
