"""What can be written in place: the checks every update and merge runs before its kernels.

Each check is a C-level pass over all tensors (``map`` over ``Tensor`` methods, sets of dtypes
and layouts); a per-key loop runs only to word the error once a pass has found one. Refused,
with the rule, the key, expected, got and the fix:

- destinations (`check_destinations`): a layout other than strided, elements that overlap in
  memory (an expanded, stride-0 buffer), a lazy conjugate or negative view, an inference
  tensor written outside ``torch.inference_mode()``, memory mapped read-only (``ValueError``);
- values (`check_values`): sparse, nested or another non-strided layout, on the meta device,
  quantized (unless written into a quantized tensor as float32), complex for a real
  destination (``TypeError``); a shape that differs (``ValueError``, `check_shapes`);
- a named merge's arithmetic (lerp, add) into float8 tensors, which torch has no kernel for
  (`check_arithmetic`, ``TypeError``).

>>> import torch
>>> check_destinations("update", ["w"], [torch.zeros(1).expand(3)])
Traceback (most recent call last):
...
ValueError: update: `w` cannot be written in place: several of its elements share one memory...
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from operator import attrgetter
from pathlib import Path

import torch
from torch import Tensor

from torch_modelstate import _distributed
from torch_modelstate._memory import check_extents
from torch_modelstate.merges import Merge

__all__ = [
    "check_arithmetic",
    "check_destinations",
    "check_read_only",
    "check_shapes",
    "check_values",
]

# One C call per pair, where comparing `.shape`s would build two torch.Size objects.
_SAME_SIZE = Tensor.is_same_size
_DTYPE = attrgetter("dtype")
_LAYOUT = attrgetter("layout")
_IS_CPU = attrgetter("is_cpu")
_IS_CONTIGUOUS = Tensor.is_contiguous
_IS_NEG = Tensor.is_neg
# Dtypes torch has no copy kernel for (it raises NotImplementedError mid-write).
_UNCOPYABLE = {
    getattr(torch, f"{sign}int{bits}")
    for sign in ("", "u")
    for bits in range(1, 8)
    if hasattr(torch, f"{sign}int{bits}")
}
_IS_INFERENCE = Tensor.is_inference
_STORAGE = Tensor.untyped_storage
# False for memory torch did not allocate (torch.frombuffer, from_file, from_numpy, mmap):
# only then can a CPU tensor lie in read-only memory, and only then is the memory map read.
_RESIZABLE = torch.UntypedStorage.resizable
_MAPS = Path("/proc/self/maps")
_STRIDED = {torch.strided}
_FLOAT32 = {torch.float32}
_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
_FLOAT8 = {
    getattr(torch, name)
    for name in (
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    )
    if hasattr(torch, name)
}


def check_values(
    verb: str,
    keys: Sequence[str],
    values: Sequence[Tensor],
    targets: Sequence[Tensor],
    *,
    side: str = "value",
    target_dtypes: set[torch.dtype] | None = None,
) -> None:
    """Every value can be written into its target: the same shape, a dense tensor holding
    data, and a dtype the target can take. C-level passes; a loop only words the error.
    `target_dtypes` (as `check_destinations` returns it) saves a pass over the targets."""
    check_shapes(verb, keys, values, targets, side=side)
    if set(map(_LAYOUT, values)) - _STRIDED:
        key, value = next(
            (k, v) for k, v in zip(keys, values, strict=True) if v.layout != torch.strided
        )
        msg = (
            f"{verb}: the {side} for `{key}` is a {value.layout} tensor; only dense "
            "(strided) tensors can be written into a parameter or buffer.\n"
            f"  expected: torch.strided\n  got: {value.layout}\n"
            "  fix: pass value.to_dense()"
        )
        raise TypeError(msg)
    if not all(map(_IS_CPU, values)):
        for key, value in zip(keys, values, strict=True):
            if value.is_meta:
                msg = (
                    f"{verb}: the {side} for `{key}` is on the meta device and holds no data.\n"
                    f"  expected: a tensor with data\n  got: a meta tensor\n"
                    "  fix: materialise it first (e.g. load real values into it)"
                )
                raise TypeError(msg)
    check_extents(verb, keys, values, f"the {side} for ")
    dtypes = set(map(_DTYPE, values))
    _check_copyable(verb, keys, values, dtypes, f"the {side} for ")
    if any(dtype.is_complex for dtype in dtypes):
        for key, value, target in zip(keys, values, targets, strict=True):
            if value.is_complex() and not target.is_complex():
                msg = (
                    f"{verb}: the {side} for `{key}` is complex but the tensor is real.\n"
                    f"  expected: {target.dtype}\n  got: {value.dtype}\n"
                    "  fix: pass value.real (or .abs()) explicitly"
                )
                raise TypeError(msg)
    # float32 values fit any target, quantized ones included: only then is no pass needed.
    if dtypes != _FLOAT32 and (
        not dtypes.isdisjoint(_QUANTIZED)
        or not (target_dtypes or set(map(_DTYPE, targets))).isdisjoint(_QUANTIZED)
    ):
        _check_quantized(verb, keys, values, targets, side)


def check_shapes(
    verb: str,
    keys: Sequence[str],
    values: Sequence[Tensor],
    targets: Sequence[Tensor],
    *,
    side: str = "value",
) -> None:
    """Every value has its target's shape (a `ValueError` naming the first that has not)."""
    try:
        if all(map(_SAME_SIZE, values, targets)):
            return
    except (RuntimeError, ValueError):  # torch refuses to compare a nested tensor's size
        pass
    for key, value in zip(keys, values, strict=True):
        if value.is_nested:
            msg = (
                f"{verb}: the {side} for `{key}` is a nested tensor; only dense tensors can be "
                "written into a parameter or buffer.\n"
                "  expected: a dense Tensor\n  got: a nested tensor\n"
                "  fix: pass one dense tensor of the destination's shape"
            )
            raise TypeError(msg)
    key, value, target = next(
        (k, v, t) for k, v, t in zip(keys, values, targets, strict=True) if v.shape != t.shape
    )
    want, got = tuple(target.shape), tuple(value.shape)
    if side == "rhs":
        head, lines = (
            f"shape mismatch for `{key}`.",
            f"  expected (lhs): {want}\n  got (rhs): {got}",
        )
    elif side == "value":
        head, lines = f"shape mismatch for `{key}`.", f"  expected: {want}\n  got: {got}"
    else:
        head = f"the {side} must be a tensor of the lhs shape; for `{key}`"
        lines = f"  expected: {want}\n  got: {got}"
    raise ValueError(f"{verb}: {head}\n{lines}")


def _check_quantized(
    verb: str, keys: Sequence[str], values: Sequence[Tensor], targets: Sequence[Tensor], side: str
) -> None:
    # torch copies into a quantized tensor from float32 or the same quantized dtype only, and
    # out of a quantized tensor into nothing else.
    for key, value, target in zip(keys, values, targets, strict=True):
        if target.dtype in _QUANTIZED:
            if value.dtype in (torch.float32, target.dtype):
                continue
            expected = f"torch.float32 or {target.dtype}"
            fix = "pass value.float()"
        elif value.dtype in _QUANTIZED:
            expected = str(target.dtype)
            fix = "pass value.dequantize()"
        else:
            continue
        msg = (
            f"{verb}: the {side} for `{key}` cannot be written into its {target.dtype} tensor.\n"
            f"  expected: {expected}\n  got: {value.dtype}\n  fix: {fix}"
        )
        raise TypeError(msg)


def check_destinations(
    verb: str,
    keys: Sequence[str],
    dsts: Sequence[Tensor],
    *,
    kernel: Sequence[bool] | None = None,
) -> set[torch.dtype]:
    """Every destination can be written in place: dense, no element sharing memory with
    another (expanded tensors), no lazy conjugate view, not an inference tensor outside
    inference mode, and not in memory mapped read-only (where a write kills the process).
    `kernel[i]` False says ``dsts[i]`` is filled as raw bytes, not by a torch
    kernel (as load reads straight into a tensor), which an inference tensor allows.
    Returns the destinations' dtypes, for the checks that follow."""
    if set(map(_LAYOUT, dsts)) - _STRIDED:
        key, dst = next(
            (k, d) for k, d in zip(keys, dsts, strict=True) if d.layout != torch.strided
        )
        msg = (
            f"{verb}: `{key}` is a {dst.layout} tensor; only dense (strided) tensors are "
            "written in place.\n"
            f"  expected: torch.strided\n  got: {dst.layout}\n"
            "  fix: make the parameter or buffer dense (.to_dense()), or leave the key out"
        )
        raise ValueError(msg)
    dtypes = set(map(_DTYPE, dsts))
    _check_copyable(verb, keys, dsts, dtypes, "", kernel)
    # A lazy conjugate (complex) or negative (`.conj().imag`) view is not written in place.
    if any(dtype.is_complex for dtype in dtypes) or any(map(_IS_NEG, dsts)):
        _check_lazy_views(verb, keys, dsts)
    contiguous = all(map(_IS_CONTIGUOUS, dsts))
    if not contiguous:
        for key, dst in zip(keys, dsts, strict=True):
            # 1 is "yes"; 2 ("too hard to tell") is what torch's own copy_ lets through.
            if not dst.is_contiguous() and torch._debug_has_internal_overlap(dst) == 1:
                msg = (
                    f"{verb}: `{key}` cannot be written in place: several of its elements "
                    "share one memory location (an expanded or stride-0 tensor).\n"
                    f"  expected: a tensor whose elements do not overlap\n"
                    f"  got: shape {tuple(dst.shape)} with strides {dst.stride()}\n"
                    "  fix: give the module its own copy first (e.g. register "
                    "buffer.clone() instead of an expanded view)"
                )
                raise ValueError(msg)
    try:
        storages: list[torch.UntypedStorage] | None = list(map(_STORAGE, dsts))
    except (RuntimeError, NotImplementedError):  # a subclass (a DTensor) without plain storage
        storages = None
    check_extents(verb, keys, dsts, "", storages, contiguous=contiguous)
    # One C-level pass: torch-allocated storage is writable.
    owned = storages is not None and all(map(_RESIZABLE, storages))
    if not owned:
        check_read_only(verb, keys, dsts)
    if not torch.is_inference_mode_enabled() and any(map(_IS_INFERENCE, dsts)):
        writes = [True] * len(dsts) if kernel is None else kernel
        found = [k for k, d, w in zip(keys, dsts, writes, strict=True) if w and d.is_inference()]
        if not found:
            return dtypes
        key = found[0]
        msg = (
            f"{verb}: `{key}` is an inference tensor (made under torch.inference_mode()), "
            "which torch writes in place only inside inference mode.\n"
            "  expected: a normal tensor, or this call inside torch.inference_mode()\n"
            "  got: an inference tensor outside inference mode\n"
            "  fix: call it under `with torch.inference_mode():`, or build the model under "
            "torch.no_grad() instead"
        )
        raise ValueError(msg)
    return dtypes


def check_read_only(verb: str, keys: Sequence[str], dsts: Sequence[Tensor]) -> None:
    """No CPU destination (a DTensor: its local shard) lies in memory the process may not
    write, as ``torch.frombuffer`` over an ``mmap`` opened with ``ACCESS_READ`` does: torch
    would write it anyway and the process dies (SIGSEGV). Reads ``/proc/self/maps`` (Linux;
    elsewhere nothing is checked) only if some storage was not allocated by torch."""
    candidates: list[tuple[str, int, int]] = []
    for key, dst in zip(keys, dsts, strict=True):
        local = _distributed.to_local(dst)
        if local.device.type != "cpu" or not local.numel():
            continue
        try:
            storage = local.untyped_storage()
            if storage.resizable():
                continue
            lo = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # a subclass without plain storage
            continue
        candidates.append((key, lo, lo + storage.nbytes()))
    writable = _writable_ranges() if candidates else None
    if writable is None:
        return
    starts = [lo for lo, _ in writable]
    for key, lo, hi in candidates:
        i = bisect.bisect_right(starts, lo) - 1
        if i < 0 or writable[i][1] < hi:
            msg = (
                f"{verb}: `{key}` lies in read-only memory, so values cannot be written "
                "into it.\n"
                "  expected: writable memory\n"
                "  got: a read-only memory map (such as torch.frombuffer over an mmap opened "
                "with ACCESS_READ)\n"
                "  fix: give the module a writable copy first (e.g. "
                "module.register_buffer(name, tensor.clone())), or map the file with "
                "mmap.ACCESS_COPY"
            )
            raise ValueError(msg)


def _writable_ranges() -> list[tuple[int, int]] | None:
    """Sorted, merged address ranges the process may write, or None where unknown."""
    try:
        text = _MAPS.read_text()
    except OSError:
        return None
    ranges: list[tuple[int, int]] = []
    for line in text.splitlines():
        fields = line.split(maxsplit=2)
        if len(fields) < 2 or "w" not in fields[1]:
            continue
        lo_text, _, hi_text = fields[0].partition("-")
        lo, hi = int(lo_text, 16), int(hi_text, 16)
        if ranges and ranges[-1][1] == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    return ranges


def _check_copyable(
    verb: str,
    keys: Sequence[str],
    tensors: Sequence[Tensor],
    dtypes: set[torch.dtype],
    what: str,
    kernel: Sequence[bool] | None = None,
) -> None:
    """No tensor copied by a torch kernel (`kernel`, as in `check_destinations`) has a
    dtype torch cannot copy (``uint1``..``uint7``, ``int1``..``int7``: its copy kernel
    raises, after the other tensors of the call were written)."""
    if dtypes.isdisjoint(_UNCOPYABLE):
        return
    copied = [True] * len(tensors) if kernel is None else kernel
    found = [
        (k, t)
        for k, t, c in zip(keys, tensors, copied, strict=True)
        if c and t.dtype in _UNCOPYABLE
    ]
    if not found:
        return
    key, t = found[0]
    msg = (
        f"{verb}: {what}`{key}` is of dtype {t.dtype}, which torch cannot copy.\n"
        "  expected: a dtype with a torch copy kernel (uint8, int8, float, ...)\n"
        f"  got: {t.dtype}\n"
        "  fix: keep the tensor out of the call (a mask, or leave its key out), or store it "
        "as uint8 and view it"
    )
    raise TypeError(msg)


def _check_lazy_views(verb: str, keys: Sequence[str], dsts: Sequence[Tensor]) -> None:
    # A conjugate or negative view (`t.conj()`) is written through a lazy bit that torch's
    # grouped in-place kernels refuse.
    for key, dst in zip(keys, dsts, strict=True):
        if dst.is_conj() or dst.is_neg():
            kind = "conjugate" if dst.is_conj() else "negative"
            msg = (
                f"{verb}: `{key}` is a lazy {kind} view (as made by .conj()), which is not "
                "written in place.\n"
                "  expected: a tensor that owns its values\n"
                f"  got: a {kind} view of shape {tuple(dst.shape)}\n"
                "  fix: register the materialised tensor (t.resolve_conj() / "
                "t.resolve_neg()) instead of the view"
            )
            raise ValueError(msg)


def check_arithmetic(
    keys: list[str], lhs: list[Tensor], fun: Merge, dtypes: set[torch.dtype] | None = None
) -> None:
    """A named merge that computes (lerp, add...) needs a kernel for each lhs dtype: none
    for float8, and no lerp for complex32 on the CPU."""
    if dtypes is None:
        dtypes = set(map(_DTYPE, lhs))
    if getattr(fun, "arithmetic", True) is False:
        return
    if torch.complex32 in dtypes and getattr(fun, "interpolates", False):
        for key, tensor in zip(keys, lhs, strict=True):
            if tensor.dtype == torch.complex32 and tensor.device.type == "cpu":
                msg = (
                    f"merge: {fun!r} cannot compute in torch.complex32 on the CPU: torch has "
                    f"no lerp kernel for it there; `{key}` is one.\n"
                    "  fix: keep the tensor as torch.complex64, or merge a state without it "
                    "(e.g. ModelState.new({k: v for k, v in ms.to_dict().items() if not "
                    "v.is_complex()}))"
                )
                raise TypeError(msg)
    if dtypes.isdisjoint(_FLOAT8):
        return
    key, tensor = next((k, t) for k, t in zip(keys, lhs, strict=True) if t.dtype in _FLOAT8)
    msg = (
        f"merge: {fun!r} cannot compute in {tensor.dtype}: torch has no arithmetic kernel "
        f"for float8 tensors; `{key}` is one.\n"
        "  fix: merge into a higher-precision copy (ms.clone(dtype=torch.float32)) and "
        "copy the result back with merges.replace()"
    )
    raise TypeError(msg)
