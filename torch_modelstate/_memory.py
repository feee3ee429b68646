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
from collections.abc import Sequence
from itertools import compress
from operator import add, attrgetter, gt, not_, sub

import torch
from torch import Tensor

from torch_modelstate import _distributed

__all__ = ["check_extents", "owned_starts", "shared"]

_STORAGE = Tensor.untyped_storage
_START = torch.UntypedStorage.data_ptr
_NBYTES = torch.UntypedStorage.nbytes
_RESIZABLE = torch.UntypedStorage.resizable
_TENSOR_NBYTES = attrgetter("nbytes")
# Dtypes that pack several elements into a byte: their element size says 1. (torch's
# uint1..7 and int1..7 take a byte an element.)
_SUB_BYTE = {getattr(torch, name) for name in ("quint4x2", "quint2x4") if hasattr(torch, name)}


def owned_starts(tensors: Sequence[Tensor]) -> list[int] | None:
    """The start pointer of each tensor's storage if torch allocated every one (then equal
    starts find aliases exactly), else None (also for a tensor without plain storage)."""
    try:
        storages = list(map(_STORAGE, tensors))
        if not all(map(_RESIZABLE, storages)):
            return None
        return list(map(_START, storages))
    except (RuntimeError, NotImplementedError):  # a subclass without plain storage
        return None


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


def check_extents(
    verb: str,
    keys: Sequence[str],
    tensors: Sequence[Tensor],
    what: str,
    storages: list[torch.UntypedStorage] | None = None,
    *,
    contiguous: bool = False,
) -> None:
    """Every tensor's elements lie inside its storage (a DTensor: its local shard's);
    ValueError naming the first that reaches past it (`what` words it: "" or "the value
    for "). `storages`: the tensors' storages, and `contiguous`: that all are, where the
    caller knows it already.

    C-level passes for contiguous tensors (from the storage's start to the tensor's last
    byte); the others' extent is computed from their strides. Empty tensors reach nothing,
    and sub-byte dtypes (``quint4x2``: two elements a byte) are left to torch."""
    local = tensors
    if _distributed.any_dtensor(tensors):
        local, storages = [_distributed.to_local(t) for t in tensors], None
    try:
        if storages is None:
            storages = list(map(_STORAGE, local))
        # The bytes from the storage's start to the end of the tensor, if it is contiguous.
        starts_in = map(sub, map(Tensor.data_ptr, local), map(_START, storages))
        needed = list(map(add, starts_in, map(_TENSOR_NBYTES, local)))
        have = list(map(_NBYTES, storages))
    except (RuntimeError, NotImplementedError):  # a subclass without plain storage
        _check_each(verb, keys, local, what)
        return
    if not contiguous:
        for i in compress(range(len(local)), map(not_, map(Tensor.is_contiguous, local))):
            needed[i] = _reach(local[i])
    for i in compress(range(len(local)), map(gt, needed, have)):
        t = local[i]
        if t.numel() and t.dtype not in _SUB_BYTE:
            _refuse(verb, keys[i], what, t, needed[i], have[i])


def _check_each(verb: str, keys: Sequence[str], tensors: Sequence[Tensor], what: str) -> None:
    # One at a time, leaving out the tensors without plain storage (a wrapper subclass has
    # a storage object whose data pointer cannot be read).
    for key, t in zip(keys, tensors, strict=True):
        try:
            storage = t.untyped_storage()
            needed = t.data_ptr() - storage.data_ptr() + t.nbytes
            have = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            continue
        if not t.is_contiguous():
            needed = _reach(t)
        if needed > have and t.numel() and t.dtype not in _SUB_BYTE:
            _refuse(verb, key, what, t, needed, have)


def _refuse(verb: str, key: str, what: str, t: Tensor, needed: int, have: int) -> None:
    msg = (
        f"{verb}: {what}`{key}` reaches past its memory: its storage holds {have} bytes, "
        f"its shape {tuple(t.shape)} (strides {t.stride()}, offset {t.storage_offset()}) "
        f"needs {needed}.\n"
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
