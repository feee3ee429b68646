"""`average` (the CLI's merge engine): exact weighted means, streamed with reused staging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import torch_modelstate as tms
from torch_modelstate.checkpoint import _average, _budget


def inputs(tmp_path: Path, n: int = 3) -> list[Path]:
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        tensors = {
            "big": torch.randn(300, 70),
            "half": torch.randn(1000).to(torch.bfloat16),
            "small": torch.randn(3),
            "double": torch.randn(5, dtype=torch.float64),
            "complex": torch.randn(4, dtype=torch.complex64),
            "steps": torch.tensor(10 + i),
            "mask": torch.tensor([True, i % 2 == 0]),
            "empty": torch.empty(0, 2),
        }
        path = tmp_path / f"in{i}.safetensors"
        tms.save(tensors, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("budget", [None, 4096])
def test_average_is_the_weighted_mean_in_every_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int | None
) -> None:
    """Floats average in fp32 (fp64/complex64 in their own), ints come from the first input."""
    if budget is not None:  # many batches, and large tensors summed in slices
        monkeypatch.setattr(_budget, "BUDGET", budget)
        monkeypatch.setattr(_average, "_SLICE", 100)
    paths = inputs(tmp_path)
    weights = [1.0, 2.0, 5.0]
    out = tmp_path / "out.safetensors"
    tms.io.average(paths, out, weights=weights)
    got = tms.load(out).to_dict()
    values = [tms.load(p).to_dict() for p in paths]
    total = sum(weights)
    for key, first in values[0].items():
        if first.is_floating_point() or first.is_complex():
            acc = _average._accumulator(first.dtype)
            expected = sum(
                (w / total) * v[key].to(acc) for w, v in zip(weights, values, strict=True)
            )
            assert isinstance(expected, torch.Tensor)
            torch.testing.assert_close(got[key], expected.to(first.dtype), rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got[key], first), key
        assert got[key].dtype == first.dtype


def test_staging_is_reused_from_batch_to_batch() -> None:
    """The staging buffer is allocated once and grown only when a batch needs more."""
    staging = _average.Staging()
    a = staging.take([(torch.float32, (100,)), (torch.bfloat16, (7, 3))])
    b = staging.take([(torch.float32, (50,))])
    assert a[0].data_ptr() == b[0].data_ptr()
    assert a[1].data_ptr() % 64 == 0 and a[1].shape == (7, 3)
    c = staging.take([(torch.float64, (1000,))])
    assert c[0].numel() == 1000 and c[0].is_contiguous()


def test_average_leaves_the_inputs_unchanged(tmp_path: Path) -> None:
    """The inputs are read through copy-on-write maps; their bytes never change."""
    paths = inputs(tmp_path, 2)
    before = [p.read_bytes() for p in paths]
    tms.io.average(paths, tmp_path / "out.safetensors")
    assert [p.read_bytes() for p in paths] == before
