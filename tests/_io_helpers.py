"""Shared helpers of the checkpoint tests (`test_io.py`, `test_io_errors.py`)."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

import torch_modelstate as tms
from torch_modelstate import ModelState

__all__ = ["assert_values", "build", "header_of", "saved", "snapshot", "write_raw"]


def build(seed: int = 0, tie: bool = True) -> nn.ModuleDict:
    """Linear pairs with a transpose tie, BatchNorm state, and an identity-tied embedding."""
    torch.manual_seed(seed)
    model = nn.ModuleDict(
        {
            "enc": nn.Linear(4, 2),
            "dec": nn.Linear(2, 4),
            "bn": nn.BatchNorm1d(3),
            "emb": nn.Embedding(5, 4),
            "head": nn.Linear(4, 5, bias=False),
        }
    )
    with torch.no_grad():
        model["bn"].running_mean.uniform_()
        model["bn"].num_batches_tracked.fill_(7)
    if tie:
        model["head"].weight = model["emb"].weight
        ModelState.new(model).tie("dec.weight", "enc.weight", "transpose")
    return model


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_values(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def saved(
    tmp_path: Path,
    model: nn.Module | ModelState | Mapping[str, Tensor] | None = None,
    name: str = "m.safetensors",
) -> Path:
    path = tmp_path / name
    tms.save(build() if model is None else model, path)
    return path


def write_raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    """A file with exactly this header (JSON-encoded unless bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def header_of(path: Path) -> tuple[dict[str, object], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]
