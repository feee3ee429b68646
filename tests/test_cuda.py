"""GPU behaviour: cross-device and pinned updates, casting, merges and frozen state on CUDA.

Every test here is marked `cuda` and skips without a GPU (see conftest.py). Run them with
``bash scripts/test -m cuda`` on a machine with one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from strategies import Stat, assert_unchanged, snapshot
from torch import nn

from torch_modelstate import ModelState, merges

pytestmark = pytest.mark.cuda

CUDA = "cuda"


def make_model(device: str = CUDA) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(device)


def values_for(
    model: nn.Module, device: str, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Deterministic new values for every key, on `device` (float keys in `dtype` if given)."""
    out = {}
    for i, (key, t) in enumerate(model.state_dict().items()):
        if t.dtype.is_floating_point:
            value = torch.arange(t.numel(), dtype=torch.float64).reshape(t.shape) / 8 + i
            out[key] = value.to(device=device, dtype=dtype or t.dtype)
        else:
            out[key] = torch.full(t.shape, 7, dtype=t.dtype, device=device)
    return out


def assert_holds(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    torch.cuda.synchronize()
    for key, t in model.state_dict().items():
        assert torch.equal(t.cpu(), values[key].to(t.dtype).cpu()), key


def test_update_cpu_values_into_a_cuda_model():
    """CPU values are moved into the CUDA tensors, which stay on the GPU."""
    model = make_model()
    values = values_for(model, "cpu")
    ModelState.new(model).update(values)
    assert all(t.is_cuda for t in model.state_dict().values())
    assert_holds(model, values)


def test_update_cuda_values_into_a_cpu_model():
    """CUDA values are brought into the CPU tensors, which stay on the CPU."""
    model = make_model("cpu")
    values = values_for(model, CUDA)
    ModelState.new(model).update(values)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert_holds(model, values)


def test_update_from_pinned_host_memory():
    """Pinned CPU values land correctly (the copy may be non-blocking)."""
    model = make_model()
    values = {k: v.pin_memory() for k, v in values_for(model, "cpu").items()}
    ModelState.new(model).update(values)
    assert_holds(model, values)


def test_update_from_mixed_pinned_and_pageable_memory():
    """A mix of pinned and ordinary CPU values lands correctly."""
    model = make_model()
    values = values_for(model, "cpu")
    values = {k: v.pin_memory() if i % 2 else v for i, (k, v) in enumerate(values.items())}
    ModelState.new(model).update(values)
    assert_holds(model, values)


def test_update_keeps_identity_and_data_ptr_on_gpu():
    """CUDA tensors are written in place: same objects, same device addresses."""
    model = make_model()
    before = {k: (t, t.data_ptr()) for k, t in model.state_dict(keep_vars=True).items()}
    ModelState.new(model).update(values_for(model, "cpu", torch.float64))
    for key, t in model.state_dict(keep_vars=True).items():
        assert t is before[key][0]
        assert t.data_ptr() == before[key][1]


@pytest.mark.parametrize(
    ("src_device", "src_dtype", "dst_dtype"),
    [
        ("cpu", torch.float64, torch.bfloat16),
        (CUDA, torch.float32, torch.float16),
        (CUDA, torch.bfloat16, torch.float32),
        ("cpu", torch.float16, torch.float64),
    ],
    ids=str,
)
def test_update_casts_on_gpu(src_device, src_dtype, dst_dtype):
    """Values are cast to the CUDA destination's dtype, from either device."""
    model = make_model().to(dst_dtype)
    values = values_for(model, src_device, src_dtype)
    ModelState.new(model).update(values)
    assert model[0].weight.dtype == dst_dtype
    assert model[1].num_batches_tracked.dtype == torch.long
    assert_holds(model, values)


def test_update_is_atomic_on_gpu():
    """A shape error among CPU->CUDA values writes nothing."""
    model = make_model()
    snap = snapshot(model)
    values = {**values_for(model, "cpu"), "2.bias": torch.zeros(9)}
    with pytest.raises(ValueError, match=r"shape mismatch for `2.bias`"):
        ModelState.new(model).update(values)
    torch.cuda.synchronize()
    assert_unchanged(model, snap)


def test_modelstate_follows_the_model_to_the_gpu():
    """A view made on the CPU sees the CUDA tensors after `model.cuda()`."""
    model = make_model("cpu")
    ms = ModelState.new(model)
    ms.to_dict()
    model.cuda()
    assert all(t.is_cuda for t in ms.to_dict().values())
    values = values_for(model, "cpu")
    ms.update(values)
    assert_holds(model, values)


@pytest.mark.parametrize("rhs_device", [CUDA, "cpu"])
def test_merge_lerp_on_gpu(rhs_device):
    """lerp on CUDA matches hand computation, with rhs on the GPU or the CPU."""
    lhs = make_model()
    lhs(torch.randn(8, 3, device=CUDA))
    before = {k: v.clone() for k, v in lhs.state_dict().items()}
    rhs = values_for(lhs, rhs_device)
    ModelState.new(lhs).merge(rhs, merges.lerp(0.25))
    torch.cuda.synchronize()
    for key, value in lhs.state_dict().items():
        r = rhs[key].to(CUDA)
        if value.dtype.is_floating_point:
            assert torch.allclose(value, before[key] + 0.25 * (r - before[key]), atol=1e-6), key
        else:
            assert torch.equal(value, r), key


def test_merge_mixed_dtypes_on_gpu():
    """A bf16 CUDA lhs merged with a float32 CPU rhs stays bf16 and is correct."""
    lhs = make_model().to(torch.bfloat16)
    before = {k: v.clone() for k, v in lhs.state_dict().items()}
    rhs = values_for(lhs, "cpu", torch.float32)
    ModelState.new(lhs).merge(rhs, merges.ema(0.5))
    torch.cuda.synchronize()
    assert lhs[0].weight.dtype == torch.bfloat16
    expected = 0.5 * before["0.weight"].float() + 0.5 * rhs["0.weight"].to(CUDA)
    assert torch.allclose(lhs[0].weight.float(), expected, atol=0.05)


def test_merge_with_a_custom_function_on_gpu():
    """A custom merge function receives the CUDA lhs and writes results in place."""
    lhs = make_model()
    rhs = make_model()
    with torch.no_grad():
        for param in rhs.parameters():
            param.add_(1.0)
    devices = []

    def fun(path, a, b):
        devices.append(a.device.type)
        return torch.maximum(a, b)

    ModelState.new(lhs).merge(rhs, fun)
    assert set(devices) == {"cuda"}
    assert torch.equal(lhs[2].bias, rhs[2].bias)


def test_frozen_batchnorm_on_gpu():
    """A frozen CUDA BatchNorm keeps its statistics and normalises with batch statistics."""
    bn = nn.BatchNorm1d(4).to(CUDA)
    reference = copy.deepcopy(bn)
    ModelState.new(bn).freeze()
    x = torch.randn(16, 4, device=CUDA) * 3 + 1
    out = bn(x)
    assert torch.allclose(out, reference(x), atol=1e-6)
    assert torch.equal(bn.running_mean, torch.zeros(4, device=CUDA))
    assert bn.num_batches_tracked.item() == 0


def test_batchnorm_frozen_on_cpu_stays_frozen_after_cuda():
    """Freezing before `.cuda()` (which replaces the buffers) still keeps them frozen."""
    model = make_model("cpu")
    ModelState.new(model).freeze("1.**")
    model.cuda()
    model(torch.randn(8, 3, device=CUDA))
    assert model[1].num_batches_tracked.item() == 0
    assert torch.equal(model[1].running_var, torch.ones(4, device=CUDA))


def test_frozen_custom_buffers_on_gpu():
    """Frozen custom buffers on CUDA keep their values through training forwards."""
    stat = Stat(3).to(CUDA)
    ModelState.new(stat).freeze()
    stat(torch.randn(4, 3, device=CUDA))
    assert stat.count.item() == 0
    assert torch.equal(stat.mean, torch.zeros(3, device=CUDA))


@pytest.mark.parametrize("packed", [False, True])
def test_a_repeated_ema_step_on_the_gpu_follows_torch(packed: bool) -> None:
    """Warm EMA steps on CUDA (kept facts, grouped by dtype) match plain torch, including
    after a parameter moves between steps."""
    model = make_model()
    model[2].half()
    ms = ModelState.new(model)
    if packed:
        ms.pack()
    ema = ms.clone()
    expected = {k: v.clone() for k, v in ema.to_dict().items()}
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25)
        if step == 3:
            model[0].weight.data = model[0].weight.data.clone()  # moves: full checks again
        ema.merge(ms, merges.ema(0.75))
        for key, value in ms.to_dict().items():
            if value.is_floating_point():
                expected[key] = torch.lerp(expected[key], value, 0.25)
            else:
                expected[key] = value.clone()
    assert isinstance(ema._idx()._facts, type(ms._idx()._facts))
    torch.cuda.synchronize()
    for key, value in ema.to_dict().items():
        assert torch.allclose(value.float(), expected[key].float(), atol=1e-3), key
