"""Memory: which tensors share it, and whether each still has all of its own.

Aliases are found by storage. A storage torch allocated (resizable) starts where its
allocation starts, so two such storages share memory exactly when they start at one
address: C-level passes over start pointers compare them. A storage over memory torch did
not allocate (``torch.from_dlpack``, ``torch.frombuffer``, a memory map, a storage slice)
may start anywhere inside another's memory, so where one takes part, byte ranges are
compared (`shared`).

A tensor's elements must lie inside its storage: ``untyped_storage().resize_(0)`` (which
FSDP does to free unsharded parameters) or a shrinking storage ``resize_`` leaves a tensor
whose shape reaches past its memory, and torch's kernels then read or write freed memory
(the process dies). `check_extents` refuses such a tensor, by key, before any write.

>>> import torch
>>> w = torch.zeros(4)
>>> shared([w], [w[1:], torch.ones(4)])
[[0], []]
>>> shared([w], [torch.ones(4)]) is None
True
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from itertools import compress
from operator import add, gt, mul

import torch
from torch import Tensor

from torch_modelstate import _distributed

__all__ = ["check_extents", "shared", "starts"]

_STORAGE = Tensor.untyped_storage
_START = torch.UntypedStorage.data_ptr
_NBYTES = torch.UntypedStorage.nbytes
_RESIZABLE = torch.UntypedStorage.resizable


def starts(tensors: Sequence[Tensor]) -> Iterator[int]:
    """The start pointer of each tensor's storage."""
    return map(_START, map(_STORAGE, tensors))


def shared(dsts: Sequence[Tensor], srcs: Sequence[Tensor]) -> list[list[int]] | None:
    """For each of `srcs`, the indexes of the `dsts` whose storage shares memory with its
    storage (a src over several dsts' storages lists them all); None if none shares any.

    Raises RuntimeError or NotImplementedError for a tensor without plain storage (a
    subclass)."""
    left = list(map(_STORAGE, dsts))
    right = list(map(_STORAGE, srcs))
    if all(map(_RESIZABLE, left)) and all(map(_RESIZABLE, right)):
        # A zero-size storage holds no memory (its start is 0): it aliases nothing.
        found = set(map(_START, left)) - {0}
        if found.isdisjoint(map(_START, right)):
            return None
        by_start: dict[int, list[int]] = {}
        for i, start in enumerate(map(_START, left)):
            by_start.setdefault(start, []).append(i)
        return [by_start.get(start, []) if start else [] for start in map(_START, right)]
    return _by_ranges(left, right)


def _by_ranges(
    left: list[torch.UntypedStorage], right: list[torch.UntypedStorage]
) -> list[list[int]] | None:
    # The destinations' storages as disjoint regions (overlapping ones merged), each with
    # the destinations in it; a src is over every region its bytes reach.
    spans = sorted(
        (start, start + nbytes, i)
        for i, (start, nbytes) in enumerate(zip(map(_START, left), map(_NBYTES, left), strict=True))
        if nbytes
    )
    regions: list[tuple[int, int, list[int]]] = []
    for lo, hi, i in spans:
        if regions and lo < regions[-1][1]:
            first, end, members = regions[-1]
            regions[-1] = (first, max(end, hi), [*members, i])
        else:
            regions.append((lo, hi, [i]))
    firsts = [lo for lo, _, _ in regions]
    out: list[list[int]] = []
    for start, nbytes in zip(map(_START, right), map(_NBYTES, right), strict=True):
        hits: list[int] = []
        if nbytes:
            end = start + nbytes
            at = max(bisect.bisect_right(firsts, start) - 1, 0)
            for lo, hi, members in regions[at : bisect.bisect_left(firsts, end)]:
                if lo < end and start < hi:
                    hits += members
        out.append(hits)
    return out if any(out) else None


def check_extents(verb: str, keys: Sequence[str], tensors: Sequence[Tensor], what: str) -> None:
    """Every tensor's elements lie inside its storage (a DTensor: its local shard's);
    ValueError naming the first that reaches past it (`what` words it: "" or "the value
    for "). C-level passes for contiguous
    tensors; the others' extent is computed from their strides."""
    local = (
        [_distributed.to_local(t) for t in tensors]
        if _distributed.any_dtensor(tensors)
        else tensors
    )
    try:
        nbytes = list(map(_NBYTES, map(_STORAGE, local)))
    except (RuntimeError, NotImplementedError):  # a subclass without plain storage
        return
    numels = list(map(Tensor.numel, local))
    # Contiguous: (storage offset + numel) elements, for a tensor that holds any.
    ends = map(add, map(Tensor.storage_offset, local), numels)
    needed = list(map(mul, map(mul, ends, map(Tensor.element_size, local)), map(bool, numels)))
    for i in compress(range(len(local)), map(lambda c: not c, map(Tensor.is_contiguous, local))):
        needed[i] = _reach(local[i])
    if not any(map(gt, needed, nbytes)):
        return
    i = next(i for i, (n, have) in enumerate(zip(needed, nbytes, strict=True)) if n > have)
    t = local[i]
    msg = (
        f"{verb}: {what}`{keys[i]}` reaches past its memory: its storage holds "
        f"{nbytes[i]} bytes, its shape {tuple(t.shape)} (strides {t.stride()}, offset "
        f"{t.storage_offset()}) needs {needed[i]}.\n"
        "  expected: a tensor whose storage holds all of its elements\n"
        "  got: a storage freed or shrunk under it (untyped_storage().resize_)\n"
        "  fix: give it memory again (untyped_storage().resize_ back, or a new tensor) first"
    )
    raise ValueError(msg)


def _reach(t: Tensor) -> int:
    """The bytes from the start of `t`'s storage to just past its last element (0 when it
    has none)."""
    if not t.numel():
        return 0
    steps = zip(t.shape, t.stride(), strict=True)
    last = t.storage_offset() + sum((n - 1) * s for n, s in steps if s > 0)
    return int((last + 1) * t.element_size())
