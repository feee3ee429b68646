"""Modules whose state_dict() holds entries that are not parameters or buffers are named."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import torch_modelstate as tms
from torch_modelstate import ModelState


def quantized() -> nn.Module:
    """A dynamically quantised MLP: its Linear layers keep packed weights, not parameters."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notes about quantization
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


class WithExtraState(nn.Module):
    """A module that keeps a step counter as extra state (get_extra_state)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.step = 3

    def get_extra_state(self) -> Any:
        return {"step": self.step}

    def set_extra_state(self, state: Any) -> None:
        self.step = state["step"]


class CustomSave(nn.Module):
    """A module that writes an extra tensor of its own into the state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "scale"] = torch.tensor(2.0)


def test_save_of_a_quantized_model_raises_naming_the_keys(tmp_path: Path) -> None:
    """quantize_dynamic: save refuses, names the packed-weight keys, writes nothing."""
    path = tmp_path / "q.safetensors"
    with pytest.raises(
        ValueError, match=r"(?s)not parameters or buffers.*0\._packed_params\._packed_params"
    ) as err:
        tms.save(quantized(), path)
    assert "2.scale" in str(err.value)
    assert not path.exists()


def test_save_of_a_quantized_model_keeps_the_previous_file(tmp_path: Path) -> None:
    """The refusal happens before anything is replaced."""
    path = tmp_path / "q.safetensors"
    tms.save(nn.Linear(2, 2), path)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        tms.save(ModelState.new(quantized()), path)
    assert path.read_bytes() == before


def test_save_of_get_extra_state_raises(tmp_path: Path) -> None:
    """A module with get_extra_state: the `_extra_state` key is named, with why and a fix."""
    model = nn.Sequential(WithExtraState())
    with pytest.raises(ValueError, match=r"(?s)`0\._extra_state`.*lost.*fix"):
        tms.save(model, tmp_path / "m.safetensors")


def test_save_of_a_custom_save_to_state_dict_raises(tmp_path: Path) -> None:
    """Entries added by a custom _save_to_state_dict are named."""
    model = nn.ModuleDict({"c": CustomSave()})
    with pytest.raises(ValueError, match=r"c\.scale"):
        tms.save(model, tmp_path / "m.safetensors")


def test_save_of_a_state_dict_hook_entry_raises(tmp_path: Path) -> None:
    """A state-dict hook that adds an entry is found the same way."""
    model = nn.Linear(2, 2)

    def hook(module: nn.Module, sd: dict[str, Tensor], prefix: str, local: Any) -> None:
        sd[prefix + "extra"] = torch.zeros(1)

    model._register_state_dict_hook(hook)
    with pytest.raises(ValueError, match=r"`extra`"):
        tms.save(model, tmp_path / "m.safetensors")


def test_new_of_a_quantized_model_neither_raises_nor_warns() -> None:
    """The view holds the float parts (LayerNorm); only save refuses (documented choice)."""
    q = quantized()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms = ModelState.new(q)
    assert list(ms.parameters()) == ["1.weight", "1.bias"]


def test_ordinary_models_save_without_false_alarms(tmp_path: Path) -> None:
    """Ties (identity and transform), non-persistent buffers and BatchNorm save as before."""
    model = nn.ModuleDict(
        {"enc": nn.Linear(4, 2), "dec": nn.Linear(2, 4), "bn": nn.BatchNorm1d(2),
         "emb": nn.Embedding(3, 4), "head": nn.Linear(4, 3, bias=False)}
    )  # fmt: skip
    model["head"].weight = model["emb"].weight
    model["bn"].register_buffer("scratch", torch.zeros(2), persistent=False)
    ms = ModelState.new(model).tie("dec.weight", "enc.weight", "transpose")
    tms.save(ms, tmp_path / "m.safetensors")
    assert set(tms.load(tmp_path / "m.safetensors").to_dict()) == set(model.state_dict())
