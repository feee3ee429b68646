"""`rename=` that skips the source of a transform tie: a mismatch naming both keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import torch_modelstate as tms
from torch_modelstate import ModelState


def tied(path: Path) -> nn.Module:
    """Saves enc/dec with dec.weight = enc.weight transposed; returns the model."""
    model = nn.ModuleDict({"enc": nn.Linear(4, 3), "dec": nn.Linear(3, 4)})
    ms = ModelState.new(model).tie("dec.weight", "enc.weight", "transpose")
    tms.save(ms, path)
    return model


@pytest.mark.parametrize("strict", [True, False])
def test_standalone_rename_skipping_a_tie_source_names_both(tmp_path: Path, strict: bool) -> None:
    """Skipping enc.weight but keeping dec.weight (computed from it) is a mismatch, not KeyError."""
    path = tmp_path / "m.safetensors"
    tied(path)
    with pytest.raises(tms.CheckpointMismatchError, match=r"(?s)`enc\.weight`.*`dec\.weight`.*fix"):
        tms.load(path, rename=lambda k: None if k == "enc.weight" else k, strict=strict)


def test_standalone_rename_skipping_both_tie_keys_loads_the_rest(tmp_path: Path) -> None:
    """Skipping the source and its computed destination leaves the other tensors."""
    path = tmp_path / "m.safetensors"
    model = tied(path)
    skip = {"enc.weight", "dec.weight"}
    ms = tms.load(path, rename=lambda k: None if k in skip else k)
    assert sorted(ms.to_dict()) == ["dec.bias", "enc.bias"]
    assert torch.equal(ms.to_dict()["enc.bias"], model["enc"].bias.detach())
