"""A ModelState as a DCP `Stateful` in one process: state_dict / load_state_dict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from torch_modelstate import ModelState
from torch_modelstate._errors import KeyNotFoundError


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))


def test_state_dict_holds_the_live_tensors_each_once() -> None:
    """state_dict() maps keys to the module's own tensors; tie destinations are left out."""
    model = _model()
    ms = ModelState.new(model).tie("2.weight", "0.weight", "transpose")
    out = ms.state_dict()
    assert out["0.weight"] is model[0].weight
    assert out["1.running_mean"] is model[1].running_mean
    assert "2.weight" not in out
    assert list(out) == [k for k in ms.to_dict() if k != "2.weight"]


def test_load_state_dict_writes_in_place() -> None:
    """load_state_dict copies into the existing tensors, identities kept."""
    model, other = _model(), _model(seed=1)
    weight = model[0].weight
    ModelState.new(model).load_state_dict(other.state_dict())
    assert model[0].weight is weight
    for key, value in other.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)


def test_load_state_dict_refuses_missing_keys_and_writes_nothing() -> None:
    """A state dict without every key is a KeyError naming them; nothing is written."""
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    values = _model(seed=1).state_dict()
    del values["2.bias"]
    with pytest.raises(KeyNotFoundError, match=r"1 key\(s\) missing: `2.bias`"):
        ModelState.new(model).load_state_dict(values)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_load_state_dict_refuses_a_wrong_shape_and_writes_nothing() -> None:
    """Values are checked as update checks them: all or nothing."""
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    values = dict(_model(seed=1).state_dict(), **{"2.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"shape mismatch for `2\.bias`"):
        ModelState.new(model).load_state_dict(values)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_round_trip_in_one_process(tmp_path: Path) -> None:
    """dcp.save / dcp.load of {"model": ms} without a process group, loaded in place."""
    saved = ModelState.new(_model(seed=1))
    dcp.save({"model": saved}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    model = _model()
    weight = model[0].weight
    dcp.load({"model": ModelState.new(model)}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert model[0].weight is weight
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
