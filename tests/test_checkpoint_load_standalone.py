"""Standalone loads map the file copy-on-write: writable tensors, the file never changed."""

from __future__ import annotations

import gc
import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import torch_modelstate as tms
from torch_modelstate import ModelState


def mapped_files(t: torch.Tensor) -> set[str]:
    """The files whose mappings hold `t`'s first byte (from /proc/self/maps)."""
    ptr = t.data_ptr()
    found = set()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi and len(fields) > 5:
                found.add(fields[5])
    return found


def test_standalone_tensors_are_mapped_from_the_file(tmp_path: Path) -> None:
    """The values come from a mapping of the file (no page faults on fresh memory)."""
    path = tmp_path / "m.safetensors"
    tms.save(nn.Linear(64, 64), path)
    loaded = tms.load(path).to_dict()
    assert str(path) in mapped_files(loaded["weight"])


def test_standalone_tensors_are_writable_and_the_file_is_not_changed(tmp_path: Path) -> None:
    """Writes land in private copies of the pages (copy-on-write): the file keeps its bytes."""
    path = tmp_path / "m.safetensors"
    model = nn.Linear(8, 8)
    tms.save(model, path)
    before = path.read_bytes()
    loaded = tms.load(path)
    loaded.to_dict()["weight"].add_(1.0)
    loaded.update({"bias": torch.zeros(8)})
    assert path.read_bytes() == before
    assert torch.equal(loaded.to_dict()["weight"], model.weight.detach() + 1.0)
    again = tms.load(path).to_dict()
    assert torch.equal(again["weight"], model.weight.detach())


def test_standalone_tensors_outlive_the_state_and_the_file(tmp_path: Path) -> None:
    """A tensor keeps the mapping alive after the ModelState is gone and the file deleted."""
    path = tmp_path / "m.safetensors"
    model = nn.Linear(16, 16)
    tms.save(model, path)
    weight = tms.load(path).to_dict()["weight"]
    gc.collect()
    path.unlink()
    assert torch.equal(weight, model.weight.detach())


def test_standalone_load_of_every_dtype_ties_and_empty_tensors(tmp_path: Path) -> None:
    """Mixed dtypes, an empty tensor and a transform tie come back exactly."""
    tensors = {
        "f": torch.randn(3, 5),
        "h": torch.randn(7).to(torch.bfloat16),
        "i": torch.arange(5, dtype=torch.int64),
        "b": torch.tensor([True, False, True]),
        "u": torch.arange(3, dtype=torch.uint8),
        "e": torch.empty(0, 4),
        "c": torch.randn(2, dtype=torch.complex64),
        "t": torch.zeros(5, 3),
    }
    ms = ModelState.new(tensors).tie("t", "f", "transpose")
    path = tmp_path / "m.safetensors"
    tms.save(ms, path)
    loaded = tms.load(path)
    got = loaded.to_dict()
    for key, value in ms.to_dict().items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert loaded.ties() == {"t": "f"}


def test_standalone_load_of_a_misaligned_foreign_file(tmp_path: Path) -> None:
    """A file whose float data starts at an odd offset is still read correctly (copied)."""
    a = torch.tensor([1, 2, 3], dtype=torch.uint8)
    w = torch.arange(4.0)
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "w": {"dtype": "F32", "shape": [4], "data_offsets": [3, 19]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + a.numpy().tobytes() + w.numpy().tobytes())
    got = tms.load(path).to_dict()
    assert torch.equal(got["a"], a) and torch.equal(got["w"], w)


def test_standalone_load_of_shards(tmp_path: Path) -> None:
    """Each shard is mapped; every key comes back."""
    tensors = {f"w{i}": torch.full((256,), float(i)) for i in range(6)}
    tms.save(tensors, tmp_path / "ck", max_shard_size=2048)
    got = tms.load(tmp_path / "ck").to_dict()
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def test_standalone_load_of_a_safetensors_file(tmp_path: Path) -> None:
    """A file written by safetensors itself loads standalone with its values."""
    path = tmp_path / "st.safetensors"
    tensors = {"x": torch.randn(4, 4), "y": torch.arange(3)}
    save_file(tensors, path)
    got = tms.load(path).to_dict()
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
