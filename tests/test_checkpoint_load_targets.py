"""Load refuses targets it cannot write by the rule update and merge use (`_writable`)."""

from __future__ import annotations

import mmap
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import torch_modelstate as tms


def pair(b: torch.Tensor) -> nn.Module:
    """A module with a float buffer `a` (zeros) and the given buffer `b`."""
    m = nn.Module()
    m.register_buffer("a", torch.zeros(2))
    m.register_buffer("b", b)
    return m


def test_a_sparse_target_is_named_as_sparse_and_nothing_is_written(tmp_path: Path) -> None:
    """A sparse buffer is reported by its layout (not as an expanded tensor); `a` is untouched."""
    path = tmp_path / "m.safetensors"
    tms.save(pair(torch.ones(2)), path)
    target = pair(torch.zeros(2).to_sparse())
    with pytest.raises(tms.CheckpointMismatchError, match=r"(?s)sparse_coo.*fix:") as info:
        tms.load(path, into=target)
    assert "share memory" not in str(info.value)
    assert torch.equal(target.a, torch.zeros(2))


def test_a_read_only_target_is_reported_once_before_any_write(tmp_path: Path) -> None:
    """A target in a read-only memory map: one message from the shared rule; `a` untouched."""
    path = tmp_path / "m.safetensors"
    tms.save({"a": torch.ones(4), "b": torch.ones(4)}, path)
    with tempfile.TemporaryFile() as f:
        f.write(bytes(16))
        f.flush()
        mm = mmap.mmap(f.fileno(), 16, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # torch warns (once) that the buffer is read-only
            warnings.simplefilter("ignore")
            b = torch.frombuffer(mm, dtype=torch.float32)
        target = pair(b)
        target.register_buffer("a", torch.zeros(4))
        with pytest.raises(tms.CheckpointMismatchError, match="read-only memory") as info:
            tms.load(path, into=target)
        assert "more mismatches" not in str(info.value)
        assert torch.equal(target.a, torch.zeros(4))
        del b, target
