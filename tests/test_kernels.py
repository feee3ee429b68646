"""The CPU split path of `_kernels.lerp_`/`add_`: floats of several dtypes with integer buffers."""

from __future__ import annotations

import pytest
import torch

from torch_modelstate import _kernels


def _pairs() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    lhs = [torch.randn(3), torch.randn(2, 2).bfloat16(), torch.tensor(5), torch.randn(4).double()]
    rhs = [torch.randn(3), torch.randn(2, 2).bfloat16(), torch.tensor(9), torch.randn(4).double()]
    return lhs, rhs


@pytest.mark.parametrize("nonfloat", ["rhs", "lhs"])
def test_lerp_split_matches_per_tensor(nonfloat: str) -> None:
    """lerp_ of mixed float dtypes and an int64 buffer equals per-tensor lerp (ints: nonfloat)."""
    lhs, rhs = _pairs()
    expected = [
        a.lerp(r, 0.25) if a.is_floating_point() else (r if nonfloat == "rhs" else a).clone()
        for a, r in zip(lhs, rhs, strict=True)
    ]
    _kernels.lerp_(lhs, rhs, 0.25, nonfloat)  # type: ignore[arg-type]
    for got, want in zip(lhs, expected, strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


def test_add_split_matches_per_tensor() -> None:
    """add_ over mixed float dtypes and an int64 buffer equals per-tensor add; ints take rhs."""
    lhs, rhs = _pairs()
    expected = [
        a.add(r, alpha=0.5) if a.is_floating_point() else r.clone()
        for a, r in zip(lhs, rhs, strict=True)
    ]
    _kernels.add_(lhs, rhs, 0.5, "rhs")
    for got, want in zip(lhs, expected, strict=True):
        assert torch.equal(got, want)


def test_only_integers() -> None:
    """A list of integer buffers alone is copied (rhs) and no float kernel runs."""
    lhs, rhs = [torch.tensor(1)], [torch.tensor(7)]
    _kernels.lerp_(lhs, rhs, 0.5, "rhs")
    assert lhs[0].item() == 7


def test_mixed_rhs_dtype_keeps_grouped_path() -> None:
    """A bf16 rhs into fp32 lhs (a cast per pair) still gives the converted result."""
    lhs, rhs = [torch.zeros(4), torch.tensor(1)], [torch.ones(4).bfloat16(), torch.tensor(3)]
    _kernels.lerp_(lhs, rhs, 0.5, "rhs")
    assert torch.equal(lhs[0], torch.full((4,), 0.5))
    assert lhs[1].item() == 3
