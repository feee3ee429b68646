"""What the write checks proved about one index's tensors, kept while nothing moves.

Every update and merge checks its destinations and values before it writes (`_writable`).
Run every step between the same two views (an EMA, a copy into a shadow model), those checks
find the same things each time: the tensors are the same objects (the index proves it,
`Index.is_current`), and what the checks read (device, dtype, shape, strides, storage) has
not moved. `Facts` keeps what they found, with a *signature* of that metadata; `Facts.holds`
revalidates it in two C-level passes and no Python call per tensor:

- the data pointers, compared as one list: ``.data =``, ``set_``, a growing ``resize_``,
  ``.to()`` or ``.half()`` keeping a parameter, ``pack`` all move them;
- a guard over dtype, device, layout, shape, strides and dispatch keys (`_guard.Guard`:
  torch.compile's C++ tensor guard, or plain passes where that is missing). ``t_()``, a
  shrinking ``resize_``, ``.data =`` a view of the same memory (transposed, expanded,
  conjugate, of another dtype), ``requires_grad_`` or an entry into inference mode all
  fail it.

When a signature does not hold, the full checks run again and the facts are rebuilt. Facts
are built only for an index whose tensors are plain (no DTensor) and only the second time it
is planned for, so a one-off update pays nothing for them.

What a pair of indexes proved (a merge between the same two views: matching keys, shapes,
dtypes, storage kept apart) is kept on the left-hand facts, next to a weak reference to the
right-hand ones, so a finished merge keeps no right-hand tensor alive.

>>> import torch
>>> w = torch.zeros(2, 2)
>>> facts = Facts([w])
>>> facts.holds()
True
>>> _ = w.t_()
>>> facts.holds()
False
"""

from __future__ import annotations

import weakref
from itertools import compress
from operator import attrgetter, not_
from typing import NamedTuple

import torch
from torch import Tensor

from torch_modelstate import _pack
from torch_modelstate._guard import Guard
from torch_modelstate._kernels import Prepared, Split
from torch_modelstate._memory import owned_starts

__all__ = ["Facts", "KeptUpdate", "PairFacts"]

_DATA_PTR = Tensor.data_ptr
_DTYPE = attrgetter("dtype")
_DEVICE = attrgetter("device")
_IS_CPU = attrgetter("is_cpu")


class KeptUpdate(NamedTuple):
    """The last update from a dict: its keys, their destinations, a guard of its values'
    metadata, which of them hold elements (None: all; a value that does must not sit at
    address 0, as a freed storage does; the guard keeps the shapes), and what the kernel may
    skip (None: the full copy kernel runs)."""

    keys: list[str]
    dsts: list[Tensor]
    guard: Guard
    held: list[bool] | None
    prepared: Prepared | None


class Facts:
    """The tensors of one index, a signature of their metadata, and what checks found.

    `owned` says every storage was allocated by torch (only then is nothing re-read from
    the memory map: a destination in memory torch did not allocate could be unmapped or
    made read-only between calls, so it is checked every time); `update`
    holds the last update's key list and destinations; `pair` what a merge with one
    right-hand side proved (`PairFacts`); `storages` the start pointers of the storages
    (meaningful where `owned`). `floats` is computed on first use.
    """

    __slots__ = (
        "__weakref__",
        "_floats",
        "_guard",
        "_inference",
        "_ptrs",
        "all_cpu",
        "dtypes",
        "layout",
        "owned",
        "pair",
        "served",
        "storages",
        "tensors",
        "update",
    )

    def __init__(self, tensors: list[Tensor]) -> None:
        self.tensors = tensors
        self._ptrs = list(map(_DATA_PTR, tensors))
        self._guard = Guard(tensors)
        self._inference = torch.is_inference_mode_enabled()
        self.dtypes = set(map(_DTYPE, tensors))
        self.all_cpu = all(map(_IS_CPU, tensors))
        self.layout = _pack.layout_of(tensors)
        # Storages now, while the signature holds: torch-allocated ones (`owned`) cannot
        # become read-only under us, and start where their memory starts, so their start
        # pointers (`storages`) find aliases exactly as long as no tensor moves. A
        # zero-size tensor holds no bytes (its pointer is 0): it aliases nothing.
        starts = owned_starts(tensors)
        self.owned = starts is not None
        self.storages = frozenset(starts or ()) - {0}
        self.update: KeptUpdate | None = None
        self.served = 0  # calls these facts stood in for the checks (`Index.facts`)
        self.pair: PairFacts | None = None
        self._floats: list[bool] | None = None

    def holds(self) -> bool:
        """Whether every tensor still has the data pointer and metadata these facts were
        found for (and inference mode is as it was)."""
        tensors = self.tensors
        return (
            torch.is_inference_mode_enabled() == self._inference
            and list(map(_DATA_PTR, tensors)) == self._ptrs
            and self._guard.check(tensors)
        )

    def floats(self) -> list[bool]:
        """For each tensor, whether it is floating point (or complex)."""
        if self._floats is None:
            floating = {dt for dt in self.dtypes if dt.is_floating_point or dt.is_complex}
            self._floats = list(map(floating.__contains__, map(_DTYPE, self.tensors)))
        return self._floats


class PairFacts:
    """What a merge of one right-hand side into these facts' tensors proved.

    Valid while both sides' facts hold and `rhs` is still the right-hand facts (a weak
    reference: the pair keeps no right-hand tensor alive). The kernels run on the flat
    buffers of two packed states of one layout (`packed`); otherwise they take the float
    pairs grouped by the device and dtype of both sides (grouped once, here: a C-level
    `compress` per group and call, where grouping each call would be a Python step per
    tensor) and the other pairs apart (`prepared`).
    """

    __slots__ = ("_groups", "_other_lhs", "_others", "packed", "rhs")

    def __init__(self, lhs: Facts, rhs: Facts) -> None:
        self.rhs = weakref.ref(rhs)
        self.packed = _pack.flat_pairs(lhs.tensors, rhs.tensors) is not None
        flags = lhs.floats()
        self._others = list(map(not_, flags))
        self._other_lhs = list(compress(lhs.tensors, self._others))
        left, right = lhs.tensors, rhs.tensors
        columns = (map(_DEVICE, left), map(_DTYPE, left), map(_DEVICE, right), map(_DTYPE, right))
        kinds = list(zip(*columns, strict=True))
        found = set(compress(kinds, flags))
        self._groups: list[tuple[list[bool], list[Tensor]]] = []
        for kind in found:  # usually one: then the float flags are its mask (a float
            # kind's dtype is floating, so no other tensor equals it)
            mask = flags if len(found) == 1 else list(map(kind.__eq__, kinds))
            self._groups.append((mask, list(compress(left, mask))))

    @staticmethod
    def possible(lhs: Facts, rhs: Facts) -> bool:
        """Whether the kernels can take the pairs as proven: both sides in memory torch
        allocated, and no storage shared between them (else the kernels copy the shared
        values first, every call)."""
        return lhs.owned and rhs.owned and lhs.storages.isdisjoint(rhs.storages)

    def prepared(self, lhs: Facts, rhs: Facts) -> Prepared:
        """What the kernels take (the right-hand groups: C-level `compress` passes)."""
        left, right = lhs.layout, rhs.layout
        # `owns` each call: a storage re-homed at the same address passes the signatures.
        if (
            self.packed
            and left is not None
            and right is not None
            and left.owns(lhs.tensors)
            and right.owns(rhs.tensors)
        ):
            flats = zip(left.flats(lhs.tensors), right.flats(rhs.tensors), strict=True)
            return Prepared(flats=list(flats))
        values = rhs.tensors
        groups = [(lhs_group, list(compress(values, mask))) for mask, lhs_group in self._groups]
        split = Split(groups, self._other_lhs, list(compress(values, self._others)))
        return Prepared(split=split)
