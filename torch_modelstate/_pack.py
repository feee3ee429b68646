"""Packed storage: each (device, dtype) group of a state's tensors in one flat buffer.

`pack` copies the values of every stored tensor of a group into one flat buffer and points
the tensor at its slice (``tensor.data = flat[offset:offset + n].view(shape)``), so every
parameter and buffer keeps its identity (optimizers, hooks and ``state_dict()`` see the
same objects) while the group's bytes are contiguous. A `Layout` remembers each tensor's
address and, per group, its first tensor and length; it hangs on the first tensor of the
state (``_tms_pack``), so it lives as long as the tensors do. It holds no flat buffer: the
tensors' views keep that memory alive, and `Layout.flats` rebuilds the buffers from it, so
a packed model moved by ``.half()`` or ``.to()`` frees its old memory.

`flat_pairs` is the kernels' fast path: when both sides of an update or merge are packed
states of one layout and still *intact* (each tensor is the object packed, and still a view
of its flat buffer at its offset, with its dtype, shape and strides: a pass of ``data_ptr``
and one of `_guard.Guard`), the write runs as one op
per group on the flat buffers. Anything that replaces a tensor or its storage (``.to()``,
``fully_shard``, ``load_state_dict(assign=True)``) breaks intactness and the per-tensor ops
serve, with the same results.

>>> import torch
>>> a, b = torch.zeros(2), torch.ones(3)
>>> layout = pack([a, b])
>>> layout.intact([a, b]), a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
(True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import is_

import torch
from torch import Tensor

from torch_modelstate._guard import Guard

__all__ = ["Layout", "flat_pairs", "layout_of", "pack"]

_ATTR = "_tms_pack"
_PLAIN = (Tensor, torch.nn.Parameter, torch.nn.Buffer)


class Layout:
    """The packing of a list of tensors: per (device, dtype) group, a flat buffer."""

    __slots__ = ("_dtypes", "_groups", "guard", "ptrs", "signature", "tensors")

    def __init__(
        self, tensors: list[Tensor], flats: list[Tensor], ptrs: list[int], firsts: list[int]
    ) -> None:
        self.tensors = tensors  # in the order packed (the state's key order)
        self.ptrs = ptrs  # each tensor's expected data_ptr
        # Per group: its first tensor (at offset 0 of the flat buffer), length and dtype. The
        # flat buffers themselves are not held: their memory lives as long as the tensors
        # view it, and `flats` rebuilds them from the first tensor's storage. (Held, a
        # packed model moved by `.half()` or `.to()` would keep its old buffers alive.)
        self._groups = [(i, f.numel(), f.dtype) for i, f in zip(firsts, flats, strict=True)]
        # ...and its dtype, shape and contiguous strides: a view of its slice at the same
        # address but transposed (`t_()`), expanded or of another dtype is not its slice.
        self.guard = Guard(tensors)
        self._dtypes = [t.dtype for t in tensors]
        self.signature = (
            tuple((f.device, f.dtype, f.numel()) for f in flats),
            tuple(tuple(t.shape) for t in tensors),
        )

    def intact(self, tensors: Sequence[Tensor]) -> bool:
        """Whether `tensors` are exactly the packed ones, each still the view of its slice
        (same address, dtype, shape and strides)."""
        if not (
            len(tensors) == len(self.tensors)
            and all(map(is_, tensors, self.tensors))
            and list(map(Tensor.data_ptr, tensors)) == self.ptrs
            and all(map(self._owns_group, self._groups))
        ):
            return False
        if self.guard.check(tensors):
            return True
        # The guard also sees what does not matter here (requires_grad after a freeze):
        # look at what does, and if it holds, guard the tensors as they are now.
        if _views_of_slices(tensors, self.signature[1], self._dtypes):
            self.guard = Guard(tensors)
            return True
        return False

    def _owns_group(self, group: tuple[int, int, torch.dtype]) -> bool:
        # The group's first tensor still views a storage that starts at it and spans the
        # whole group: the flat buffer (so `flats` cannot reach past it).
        first, numel, dtype = group
        storage = self.tensors[first].untyped_storage()
        return storage.data_ptr() == self.ptrs[first] and storage.nbytes() == numel * (
            dtype.itemsize
        )

    @property
    def flats(self) -> list[Tensor]:
        """The flat buffer of each group, in group order (views of the tensors' memory;
        valid while `intact`)."""
        out = []
        for first, numel, dtype in self._groups:
            storage = self.tensors[first].untyped_storage()
            flat = torch.empty(0, dtype=dtype, device=storage.device)
            out.append(flat.set_(storage, 0, (numel,), (1,)))
        return out


def _views_of_slices(
    tensors: Sequence[Tensor], shapes: tuple[tuple[int, ...], ...], dtypes: list[torch.dtype]
) -> bool:
    return (
        all(map(Tensor.is_contiguous, tensors))
        and list(map(tuple, map(Tensor.size, tensors))) == list(shapes)
        and [t.dtype for t in tensors] == dtypes
        and not any(t.is_conj() or t.is_neg() for t in tensors)
    )


def _packable(t: Tensor) -> bool:
    plain = type(t) in _PLAIN
    return plain and t.layout == torch.strided and t.device.type != "meta"


@torch.no_grad()
def pack(tensors: list[Tensor]) -> Layout:
    """Re-home `tensors` into one flat buffer per (device, dtype) group; identity kept.

    Raises ValueError (nothing changed) if a tensor cannot be packed: not strided, on the
    meta device, a subclass (DTensor), or listed twice.
    """
    bad = [i for i, t in enumerate(tensors) if not _packable(t)]
    if bad or len(set(map(id, tensors))) != len(tensors):
        what = "a tensor listed twice" if not bad else f"a {type(tensors[bad[0]]).__name__}"
        msg = (
            "pack: only plain strided tensors off the meta device, each once, can be packed.\n"
            f"  got: {what}\n  fix: pack before fully_shard / after materialising the model"
        )
        raise ValueError(msg)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    flats: list[Tensor] = []
    views: list[Tensor | None] = [None] * len(tensors)
    for (device, dtype), members in groups.items():
        total = sum(tensors[i].numel() for i in members)
        flat = torch.empty(total, device=device, dtype=dtype)
        offset = 0
        for i in members:
            t = tensors[i]
            n = t.numel()
            view = flat[offset : offset + n].view(t.shape)
            view.copy_(t)
            views[i] = view
            offset += n
        flats.append(flat)
    for t, slot in zip(tensors, views, strict=True):
        assert slot is not None
        t.data = slot
    firsts = [members[0] for members in groups.values()]
    layout = Layout(list(tensors), flats, list(map(Tensor.data_ptr, tensors)), firsts)
    if tensors:
        setattr(tensors[0], _ATTR, layout)
    return layout


def layout_of(tensors: Sequence[Tensor]) -> Layout | None:
    """The intact layout `tensors` were packed with, or None."""
    if not tensors:
        return None
    layout = getattr(tensors[0], _ATTR, None)
    if isinstance(layout, Layout) and layout.intact(tensors):
        return layout
    return None


def flat_pairs(lhs: Sequence[Tensor], rhs: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]] | None:
    """The (lhs flat, rhs flat) pairs of two intact packings of one layout, or None."""
    left = layout_of(lhs)
    if left is None:
        return None
    right = layout_of(rhs)
    if right is None or right is left or right.signature != left.signature:
        return None
    return list(zip(left.flats, right.flats, strict=True))
