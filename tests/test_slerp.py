"""merges.slerp: spherical interpolation per tensor, grouped, lerp when nearly parallel."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_modelstate import ModelState, _slerp, merges


def reference(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp, one tensor at a time in float64."""
    a, b = v0.double().flatten(), v1.double().flatten()
    na, nb = a.norm(), b.norm()
    u0 = a / na if na > 1e-8 else a
    u1 = b / nb if nb > 1e-8 else b
    dot = float((u0 * u1).sum())
    if abs(dot) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        theta = math.acos(max(-1.0, min(1.0, dot)))
        s0 = math.sin((1 - t) * theta) / math.sin(theta)
        s1 = math.sin(t * theta) / math.sin(theta)
        out = s0 * a + s1 * b
    return out.reshape(v0.shape)


def test_orthogonal_unit_vectors_stay_on_the_circle() -> None:
    """Half way between e1 and e2 is (1, 1)/sqrt(2), not the lerp (0.5, 0.5)."""
    out = merges.slerp(0.5)(["w"], torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert abs(float(out.norm()) - 1.0) < 1e-6


def test_grouped_merge_matches_mergekit_per_tensor() -> None:
    """Many tensors of many shapes (and an empty one) match the per-tensor reference."""
    torch.manual_seed(0)
    shapes = [(3, 4), (7,), (2, 3, 5), (1,), (0, 4), (64, 64)]
    lhs = {f"t{i}": torch.randn(s) for i, s in enumerate(shapes)}
    rhs = {k: torch.randn(v.shape) for k, v in lhs.items()}
    ms = ModelState.new({k: v.clone() for k, v in lhs.items()})
    ms.merge(rhs, merges.slerp(0.3))
    for key, value in ms.to_dict().items():
        torch.testing.assert_close(value, reference(0.3, lhs[key], rhs[key]).float(), msg=key)


def test_nearly_parallel_tensors_fall_back_to_lerp() -> None:
    """A tensor and a slightly scaled copy: exactly the lerp, no division by sin(0)."""
    a = torch.randn(100)
    b = a * 1.5 + 1e-4
    out = merges.slerp(0.25)(["w"], a, b)
    torch.testing.assert_close(out, torch.lerp(a, b, 0.25))
    assert torch.isfinite(merges.slerp(0.5)(["w"], a, a)).all()
    zero = merges.slerp(0.5)(["w"], torch.zeros(3), torch.ones(3))
    torch.testing.assert_close(zero, reference(0.5, torch.zeros(3), torch.ones(3)).float())


def test_low_precision_and_integer_tensors() -> None:
    """bf16 is computed in fp32 and written back; integer buffers follow `nonfloat`."""
    torch.manual_seed(1)
    a, b = torch.randn(50).bfloat16(), torch.randn(50).bfloat16()
    ms = ModelState.new({"w": a.clone(), "n": torch.tensor(3)})
    ms.merge({"w": b, "n": torch.tensor(8)}, merges.slerp(0.5))
    values = ms.to_dict()
    assert values["w"].dtype == torch.bfloat16
    torch.testing.assert_close(values["w"], reference(0.5, a, b).bfloat16())
    assert int(values["n"]) == 8
    ms.merge({"n": torch.tensor(1)}, merges.slerp(0.5, nonfloat="lhs"))
    assert int(ms.to_dict()["n"]) == 8
    with pytest.raises(TypeError, match="complex"):
        ModelState.new({"c": torch.ones(2, dtype=torch.cfloat)}).merge(
            {"c": torch.ones(2, dtype=torch.cfloat)}, merges.slerp(0.5)
        )


def test_mixed_dtype_rhs_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp32 lhs with a bf16 rhs, across several chunks, equals the reference."""
    monkeypatch.setattr(_slerp, "CHUNK", 50)
    torch.manual_seed(2)
    lhs = {f"t{i}": torch.randn(30) for i in range(6)}
    rhs = {k: torch.randn(30).bfloat16() for k in lhs}
    ms = ModelState.new({k: v.clone() for k, v in lhs.items()})
    ms.merge(rhs, merges.slerp(0.7))
    for key, value in ms.to_dict().items():
        torch.testing.assert_close(value, reference(0.7, lhs[key], rhs[key]).float(), msg=key)


@settings(max_examples=40, deadline=None)
@given(
    t=st.floats(0.0, 1.0),
    n=st.integers(1, 20),
    seed=st.integers(0, 2**16),
)
def test_slerp_keeps_ends_and_interpolates_norms(t: float, n: int, seed: int) -> None:
    """t=0 gives lhs, t=1 rhs; for unit vectors the result stays a unit vector."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    a, b = a / a.norm(), b / b.norm()
    torch.testing.assert_close(merges.slerp(0.0)(["w"], a, b), a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(merges.slerp(1.0)(["w"], a, b), b, atol=1e-6, rtol=1e-6)
    out = merges.slerp(t)(["w"], a, b)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference(t, a, b), atol=1e-12, rtol=1e-12)
    if abs(float(a @ b)) <= 0.9995:
        assert abs(float(out.norm()) - 1.0) < 1e-9


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_slerp_runs_on_the_tensors_device() -> None:
    """CUDA tensors are merged on the GPU, matching the CPU result."""
    torch.manual_seed(3)
    lhs = {f"t{i}": torch.randn(40, 40) for i in range(5)}
    rhs = {k: torch.randn(40, 40) for k in lhs}
    gpu = ModelState.new({k: v.cuda() for k, v in lhs.items()})
    gpu.merge({k: v.cuda() for k, v in rhs.items()}, merges.slerp(0.4))
    for key, value in gpu.to_dict().items():
        assert value.is_cuda
        torch.testing.assert_close(value.cpu(), reference(0.4, lhs[key], rhs[key]).float())
