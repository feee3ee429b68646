"""Packed storage: each (device, dtype) group of a state's tensors in one flat buffer.

`pack` copies the values of every stored tensor of a group into one flat buffer and points
the tensor at its slice (``tensor.data = flat.as_strided(shape, strides, offset)``, with the
tensor's own strides when it is dense, as ``channels_last`` is), so every parameter and
buffer keeps its identity (optimizers, hooks and ``state_dict()`` see the same objects)
while the group's bytes are contiguous.

A `Layout` records where each tensor sits: per group its device, dtype and length; per
tensor its group, offset, address, shape and strides. It holds no tensor and no buffer (the
tensors' views keep the buffers' memory alive, and `Layout.flats` rebuilds the buffers from
it), so a packed model moved by ``.half()`` or ``.to()`` frees its old memory (its old
buffers once the index kept with the model is renewed), a deleted packed state
is freed at once (no reference cycle), and copies and pickles of the tensors carry nothing
of it. It is kept in a table keyed by the storage of the first packed tensor, next to a weak
reference to that storage (a weak reference to the tensor would make
``torch.utils.swap_tensors`` refuse it); entries whose storage died are dropped at the
next `pack`.

`flat_pairs` is the kernels' fast path: when both sides of an update or merge are packed
states of one layout and still *intact* (each tensor still a view of its flat buffer at its
offset, with its dtype, shape and strides: a pass of ``data_ptr`` and one of
`_guard.Guard`), the write runs as one op per group on the flat buffers. Anything that
replaces a tensor or its storage (``.to()``, ``fully_shard``,
``load_state_dict(assign=True)``) breaks intactness and the per-tensor ops serve, with the
same results.

>>> import torch
>>> a, b = torch.zeros(2), torch.ones(3)
>>> layout = pack([a, b])
>>> layout.intact([a, b]), a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
(True, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from torch_modelstate._guard import Guard
from torch_modelstate._memory import check_extents

__all__ = ["Layout", "flat_pairs", "layout_of", "pack"]

_PLAIN = (Tensor, torch.nn.Parameter, torch.nn.Buffer)
# The storage of the first packed tensor (its StorageImpl address) -> a weak reference to
# it (while that holds, no other storage has the address) and the Layout.
_LAYOUTS: dict[int, tuple[StorageWeakRef, Layout]] = {}


class Layout:
    """Where `pack` put each tensor: its group (one flat buffer per device and dtype), its
    offset there, its address, shape and strides."""

    __slots__ = ("_firsts", "_sizes", "guard", "members", "ptrs", "signature")

    def __init__(
        self,
        tensors: list[Tensor],
        members: list[list[int]],
        places: list[tuple[int, int]],
    ) -> None:
        self.members = members  # per group, the indexes of its tensors in buffer order
        self.ptrs = list(map(Tensor.data_ptr, tensors))  # each tensor's expected address
        groups = [_group_of(tensors, group) for group in members]
        # Per group: the member at offset 0 (the flat buffer is rebuilt from its storage)
        # and the buffer's size in bytes.
        self._firsts = [group[0] for group in members]
        self._sizes = [numel * dtype.itemsize for _, dtype, numel in groups]
        # The dtype, shape and strides of each tensor: a view of its slice at the same
        # address but transposed (`t_()`), expanded or of another dtype is not its slice.
        self.guard = Guard(tensors)
        # Two packings run as one op per group only if they match group for group and
        # member for member (same group, offset, shape, strides).
        self.signature = (
            tuple(groups),
            tuple(places),
            tuple(tuple(t.shape) for t in tensors),
            tuple(t.stride() for t in tensors),
            tuple(t.dtype for t in tensors),
        )

    def intact(self, tensors: Sequence[Tensor]) -> bool:
        """Whether each of `tensors` is still the view of its slice (same address, dtype,
        shape and strides), and each group's first tensor still views the whole buffer."""
        if not (
            len(tensors) == len(self.ptrs)
            and list(map(Tensor.data_ptr, tensors)) == self.ptrs
            and self.owns(tensors)
        ):
            return False
        if self.guard.check(tensors):
            return True
        # The guard also sees what does not matter here (requires_grad after a freeze):
        # look at what does, and if it holds, guard the tensors as they are now.
        if _views_of_slices(tensors, self.signature):
            self.guard = Guard(tensors)
            return True
        return False

    def owns(self, tensors: Sequence[Tensor]) -> bool:
        """Whether each group's first tensor still views a storage that starts at it and
        spans the whole group: the flat buffer (so `flats` cannot reach past it). Not seen
        by a tensor's address and metadata: ``p.data = torch.from_dlpack(p.data)`` gives it
        a storage of its own over the same memory."""
        for first, nbytes in zip(self._firsts, self._sizes, strict=True):
            storage = tensors[first].untyped_storage()
            if storage.data_ptr() != self.ptrs[first] or storage.nbytes() != nbytes:
                return False
        return True

    def flats(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The flat buffer of each group, in group order (views of the memory of
        `tensors`, which must be `intact`)."""
        out = []
        for first, (_, dtype, numel) in zip(self._firsts, self.signature[0], strict=True):
            storage = tensors[first].untyped_storage()
            flat = torch.empty(0, dtype=dtype, device=storage.device)
            out.append(flat.set_(storage, 0, (numel,), (1,)))
        return out


def _views_of_slices(tensors: Sequence[Tensor], signature: tuple[tuple[object, ...], ...]) -> bool:
    _, _, shapes, strides, dtypes = signature
    return (
        tuple(tuple(t.shape) for t in tensors) == shapes
        and tuple(t.stride() for t in tensors) == strides
        and tuple(t.dtype for t in tensors) == dtypes
        and not any(t.is_conj() or t.is_neg() for t in tensors)
    )


def _refusal(t: object) -> str | None:
    """Why `t` cannot be packed (None: it can)."""
    if type(t) not in _PLAIN:
        return f"a {type(t).__name__}"
    assert isinstance(t, Tensor)
    if t.layout != torch.strided:
        return f"a tensor of layout {t.layout}"
    if t.device.type == "meta":
        return "a tensor on the meta device"
    if t.is_quantized:
        return f"a quantized tensor ({t.dtype})"
    if t.is_inference():
        return "an inference tensor (made under torch.inference_mode)"
    return None


def _group_of(tensors: list[Tensor], group: list[int]) -> tuple[torch.device, torch.dtype, int]:
    first = tensors[group[0]]
    return first.device, first.dtype, sum(tensors[i].numel() for i in group)


def _grouping(tensors: list[Tensor]) -> list[list[int]]:
    """The groups `pack` makes: one per device and dtype, in order of first appearance."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def _slot_strides(t: Tensor) -> tuple[int, ...]:
    """The strides `t` gets in its slice: its own when it is dense (``channels_last``
    included), else contiguous (a tensor with gaps or overlaps is packed dense)."""
    return torch.empty_like(t, device="meta").stride()


@torch.no_grad()
def pack(
    tensors: list[Tensor], keys: Sequence[str] | None = None, like: Layout | None = None
) -> Layout:
    """Re-home `tensors` into one flat buffer per (device, dtype) group; identity kept.
    `like`: the layout of a state these are a copy of (same devices, dtypes, shapes),
    repeated group for group, so the two run as one op per group.

    Raises ValueError (nothing changed) if a tensor cannot be packed: not strided, on the
    meta device, quantized, an inference tensor, a subclass (DTensor), listed twice, or
    reaching past its storage (freed under it).
    `keys` name the tensors in that message.
    """
    names = list(keys) if keys is not None else [f"tensor {i}" for i in range(len(tensors))]
    seen: dict[int, str] = {}
    for name, t in zip(names, tensors, strict=True):
        why = _refusal(t)
        if why is None and id(t) in seen:
            why = f"the tensor of `{seen[id(t)]}` again"
        if why is not None:
            msg = (
                f"pack: `{name}` cannot be packed.\n"
                "  expected: plain strided tensors off the meta device, each once\n"
                f"  got: {why}\n"
                "  fix: pack before fully_shard, after materialising the model, outside "
                "inference mode; keep quantized or sparse tensors out of the state"
            )
            raise ValueError(msg)
        seen[id(t)] = name
    check_extents("pack", names, tensors, "")
    members = like.members if like is not None else _grouping(tensors)
    places: list[tuple[int, int]] = [(0, 0)] * len(tensors)
    views: list[Tensor] = list(tensors)
    # Outside inference mode: the buffers must be normal tensors, as the ones they replace.
    with torch.inference_mode(False):
        for g, group in enumerate(members):
            device, dtype, total = _group_of(tensors, group)
            flat = torch.empty(total, device=device, dtype=dtype)
            offset = 0
            for i in group:
                t = tensors[i]
                view = flat.as_strided(t.shape, _slot_strides(t), offset)
                view.copy_(t)
                views[i] = view
                places[i] = (g, offset)
                offset += t.numel()
        for t, slot in zip(tensors, views, strict=True):
            t.data = slot
    layout = Layout(tensors, members, places)
    for key in [key for key, (ref, _) in list(_LAYOUTS.items()) if _expired(ref)]:
        _LAYOUTS.pop(key, None)  # (another thread packing may have dropped it already)
    if tensors:
        storage = tensors[0].untyped_storage()
        _LAYOUTS[storage._cdata] = (StorageWeakRef(storage), layout)  # type: ignore[no-untyped-call]
    return layout


def _expired(ref: StorageWeakRef) -> bool:
    return bool(ref.expired())  # type: ignore[no-untyped-call]


def layout_of(tensors: Sequence[Tensor]) -> Layout | None:
    """The intact layout `tensors` were packed with, or None."""
    if not tensors:
        return None
    try:
        entry = _LAYOUTS.get(tensors[0].untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError):  # a subclass without plain storage
        return None
    if entry is None or _expired(entry[0]) or not entry[1].intact(tensors):
        return None
    return entry[1]


def flat_pairs(lhs: Sequence[Tensor], rhs: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]] | None:
    """The (lhs flat, rhs flat) pairs of two intact packings of one layout, or None."""
    left = layout_of(lhs)
    if left is None:
        return None
    right = layout_of(rhs)
    if right is None or right is left or right.signature != left.signature:
        return None
    return list(zip(left.flats(lhs), right.flats(rhs), strict=True))
