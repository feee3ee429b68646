"""Grouped in-place tensor operations: the one place that loops over tensors.

``torch._foreach_*`` ops take one device and one dtype per call, so every operation here
first groups its operands by (device, dtype) and then issues one fused call per group.
Copies across devices and dtypes are grouped by both ends; a copy from pinned host memory
to an accelerator is issued with ``non_blocking=True``. Nothing here validates user input:
callers check keys and shapes first, so a kernel is only reached when every write will
succeed.

DTensors (FSDP2 parameters) are written through their local shards: `_distributed.local_pairs`
turns every pair into plain tensors first, so a sharded write costs what a write of one
rank's shard costs and needs no communication.

A caller that proved what a kernel would find (`Prepared`, from `_facts`: the pairs are
plain, unaliased and grouped) hands it in, and the kernel skips finding it. Conversions of a
mixed merge's rhs run chunk by chunk (`_chunks`).

Integer and bool tensors (``num_batches_tracked``, masks) are never interpolated: the
arithmetic kernels take ``nonfloat`` to say whether such a tensor takes the right-hand value
(``"rhs"``) or keeps its own (``"lhs"``).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import compress
from operator import attrgetter, not_
from typing import Literal, NamedTuple, TypeAlias

import torch
from torch import Tensor

from torch_modelstate import _chunks, _distributed, _memory, _pack

NonFloat: TypeAlias = Literal["rhs", "lhs"]

_GroupKey: TypeAlias = tuple[torch.device, torch.dtype, torch.device, torch.dtype]

_IS_CPU = attrgetter("is_cpu")
_IS_VIEW = Tensor._is_view
_DTYPE = attrgetter("dtype")
_DEVICE = attrgetter("device")


def _all_cpu(*lists: list[Tensor]) -> bool:
    # On the CPU a foreach op is a C++ loop over tensors and needs no grouping for speed:
    # one call, whatever the mix of dtypes, with no Python work per tensor.
    return all(all(map(_IS_CPU, tensors)) for tensors in lists)


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _pairs_by_device_dtype(
    dsts: list[Tensor], srcs: list[Tensor]
) -> dict[_GroupKey, tuple[list[Tensor], list[Tensor]]]:
    columns = (map(_DEVICE, dsts), map(_DTYPE, dsts), map(_DEVICE, srcs), map(_DTYPE, srcs))
    keys = list(zip(*columns, strict=True))
    if len(set(keys)) == 1:  # the common case: one group, built without a Python loop
        return {keys[0]: (list(dsts), list(srcs))}
    groups: dict[_GroupKey, tuple[list[Tensor], list[Tensor]]] = {}
    for dst, src, key in zip(dsts, srcs, keys, strict=True):
        group = groups.get(key)
        if group is None:
            groups[key] = ([dst], [src])
        else:
            group[0].append(dst)
            group[1].append(src)
    return groups


def _unaliased(dsts: list[Tensor], srcs: list[Tensor]) -> list[Tensor]:
    """`srcs`, with a copy of each one whose memory is written before it is read.

    ``update({"a": b, "b": a})`` must read both values before writing either, and
    ``update({"w": w.t()})`` must not copy a tensor onto a transposed view of itself. The
    check is cheap unless a source shares storage with a destination (`_memory.shared`:
    C-level passes over storage pointers, byte ranges where memory torch did not allocate
    takes part); then sources sharing storage with a destination are copied first, except a
    source that is exactly the view it is written to. Aliases are found by storage, so
    ``t.detach()``, ``t.data`` and ``state_dict()`` values of another destination count too.
    """
    try:
        hits = _memory.shared(dsts, srcs)
    except (RuntimeError, NotImplementedError):  # a subclass without plain storage:
        written = set(map(id, dsts))  # copy each source that is a destination or a view
        return [s.clone() if id(s) in written or s._is_view() else s for s in srcs]
    if hits is None:
        return srcs
    out = []
    for i, (s, found) in enumerate(zip(srcs, hits, strict=True)):
        d = dsts[i]
        same_view = found == [i] and (s.data_ptr(), s.stride()) == (d.data_ptr(), d.stride())
        out.append(s.clone() if found and not same_view else s)
    return out


class Split(NamedTuple):
    """The pairs of an operation as the kernels take them: the float pairs in groups of one
    device and dtype on each side (one foreach call each, rhs converted a chunk at a time
    where its device or dtype differs), and the other pairs apart."""

    float_groups: list[tuple[list[Tensor], list[Tensor]]]
    other_lhs: list[Tensor]
    other_rhs: list[Tensor]


class Prepared(NamedTuple):
    """What a caller proved of the pairs it hands a kernel, so the kernel skips finding it.

    Every pair is two plain tensors and no source shares memory with a destination.
    `flats`: the flat buffers of two packed states of one layout (one op per group).
    `split`: the pairs grouped (`Split`). Neither: every pair is on the CPU (one copy call
    serves). Built from `_facts`, whose signatures prove these still hold.
    """

    flats: list[tuple[Tensor, Tensor]] | None = None
    split: Split | None = None


@torch.no_grad()
def copy_(dsts: list[Tensor], srcs: list[Tensor], prepared: Prepared | None = None) -> None:
    """Copy ``srcs[i]`` into ``dsts[i]`` for all i, casting and moving as needed."""
    if not dsts:
        return
    flats = _pack.flat_pairs(dsts, srcs) if prepared is None else prepared.flats
    if flats is not None:  # two packed states of one layout: one copy per group
        for dst_flat, src_flat in flats:
            dst_flat.copy_(src_flat)
        return
    if prepared is not None:  # plain and unaliased
        if prepared.split is None:  # all on the CPU: one call, whatever the dtypes
            torch._foreach_copy_(dsts, srcs)
            return
        groups, others_l, others_r = prepared.split
        for d, s in [*groups, (others_l, others_r)]:
            if d:
                torch._foreach_copy_(d, s)
        return
    dsts, srcs = _distributed.local_pairs(dsts, srcs)
    srcs = _unaliased(dsts, srcs)
    if _all_cpu(dsts, srcs):
        torch._foreach_copy_(dsts, srcs)
        return
    for (ddev, _, sdev, _), (d, s) in _pairs_by_device_dtype(dsts, srcs).items():
        if sdev.type == "cpu" and ddev.type != "cpu":
            pinned = list(map(Tensor.is_pinned, s))
            if all(pinned):
                torch._foreach_copy_(d, s, non_blocking=True)
                continue
            if any(pinned):
                fast = [i for i, p in enumerate(pinned) if p]
                slow = [i for i, p in enumerate(pinned) if not p]
                torch._foreach_copy_([d[i] for i in fast], [s[i] for i in fast], non_blocking=True)
                torch._foreach_copy_([d[i] for i in slow], [s[i] for i in slow])
                continue
        torch._foreach_copy_(d, s)


def _uniform_float_cpu(lhs: list[Tensor], rhs: list[Tensor]) -> bool:
    """One floating dtype on both sides, all on the CPU: a single foreach call serves."""
    if not lhs:
        return False
    dtypes = set(map(_DTYPE, lhs))
    if len(dtypes) != 1 or set(map(_DTYPE, rhs)) != dtypes or not _is_float(next(iter(dtypes))):
        return False
    return _all_cpu(lhs, rhs)


def _cpu_split(lhs: list[Tensor], rhs: list[Tensor]) -> Split | None:
    """On the CPU, with each rhs of its lhs's dtype: the float pairs as one group and the
    others apart, split by C-level passes (one int64 buffer among floats costs no Python per
    tensor). None when a pair needs a cast or a tensor is off the CPU (the grouped path
    serves)."""
    dtypes = list(map(_DTYPE, lhs))
    if dtypes != list(map(_DTYPE, rhs)) or not _all_cpu(lhs, rhs):
        return None
    floating = {dt for dt in set(dtypes) if _is_float(dt)}
    flags = list(map(floating.__contains__, dtypes))
    others = list(map(not_, flags))
    floats = (list(compress(lhs, flags)), list(compress(rhs, flags)))
    return Split([floats], list(compress(lhs, others)), list(compress(rhs, others)))


def _binary_groups(
    lhs: list[Tensor], rhs: list[Tensor]
) -> tuple[list[tuple[list[Tensor], list[Tensor]]], list[Tensor], list[Tensor]]:
    """Group float pairs by (device, dtype) of both sides; set non-float pairs apart."""
    floats: list[tuple[list[Tensor], list[Tensor]]] = []
    int_l: list[Tensor] = []
    int_r: list[Tensor] = []
    for (_, ldt, _, _), (ls, rs) in _pairs_by_device_dtype(lhs, rhs).items():
        if not _is_float(ldt):
            int_l += ls
            int_r += rs
            continue
        floats.append((ls, rs))  # rhs converted lazily, chunk by chunk: `_chunks.float_chunks`
    return floats, int_l, int_r


def _nonfloat(int_l: list[Tensor], int_r: list[Tensor], nonfloat: NonFloat) -> None:
    if int_l and nonfloat == "rhs":
        copy_(int_l, int_r)


def _binary(
    lhs: list[Tensor],
    rhs: list[Tensor],
    nonfloat: NonFloat,
    prepared: Prepared | None,
    flat_op: Callable[[Tensor, Tensor], object],
    foreach_op: Callable[[list[Tensor], list[Tensor]], object],
) -> None:
    """Run an arithmetic merge: `flat_op` on the flat buffers of two packed states of one
    layout, else `foreach_op` per (device, dtype) group of float pairs (rhs converted a
    chunk at a time where its device or dtype differs); other pairs per `nonfloat`."""
    flats = _pack.flat_pairs(lhs, rhs) if prepared is None else prepared.flats
    if flats is not None:
        for lf, rf in flats:
            if _is_float(lf.dtype):
                flat_op(lf, rf)
            elif nonfloat == "rhs":
                lf.copy_(rf)
        return
    split = None if prepared is None else prepared.split
    if split is None:
        lhs, rhs = _distributed.local_pairs(lhs, rhs)
        rhs = _unaliased(lhs, rhs)
        if _uniform_float_cpu(lhs, rhs):
            foreach_op(lhs, rhs)
            return
        split = _cpu_split(lhs, rhs)
    if split is None:
        split = Split(*_binary_groups(lhs, rhs))
    groups, int_l, int_r = split
    for ls, rs in _chunks.float_chunks(groups):
        foreach_op(ls, rs)
    _nonfloat(int_l, int_r, nonfloat)


@torch.no_grad()
def lerp_(
    lhs: list[Tensor],
    rhs: list[Tensor],
    weight: float,
    nonfloat: NonFloat,
    prepared: Prepared | None = None,
) -> None:
    """``lhs[i] += weight * (rhs[i] - lhs[i])`` in place, as grouped ``_foreach_lerp_``."""
    _binary(
        lhs,
        rhs,
        nonfloat,
        prepared,
        lambda lf, rf: lf.lerp_(rf, weight),
        lambda ls, rs: torch._foreach_lerp_(ls, rs, weight),
    )


@torch.no_grad()
def add_(
    lhs: list[Tensor],
    rhs: list[Tensor],
    alpha: float,
    nonfloat: NonFloat,
    prepared: Prepared | None = None,
) -> None:
    """``lhs[i] += alpha * rhs[i]`` in place, as grouped ``_foreach_add_``."""
    _binary(
        lhs,
        rhs,
        nonfloat,
        prepared,
        lambda lf, rf: lf.add_(rf, alpha=alpha),
        lambda ls, rs: torch._foreach_add_(ls, rs, alpha=alpha),
    )


def set_requires_grad(tensors: list[Tensor], flag: bool) -> None:
    """Set ``requires_grad`` on each tensor (there is no fused op for a flag)."""
    for tensor in tensors:
        tensor.requires_grad_(flag)


@torch.no_grad()
def clone(tensors: list[Tensor]) -> list[Tensor]:
    """Detached copies with the same device, dtype and layout."""
    return [t.detach().clone() for t in tensors]


def same_values(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors hold the same values (the same tensor object, view or data)."""
    if a is b:
        return True
    if a.shape != b.shape:
        return False
    if _distributed.any_dtensor((a, b)):  # compare whole values (a collective, as update is)
        a, b = _distributed.full(a), _distributed.full(b)
    if (
        a.device == b.device
        and a.dtype == b.dtype
        and a.data_ptr() == b.data_ptr()
        and a.stride() == b.stride()
    ):
        return True
    a = a.detach().to(b.device, b.dtype)
    b = b.detach()
    if _is_float(b.dtype):  # NaN where both have NaN is the same value here
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return bool(torch.equal(a, b))
