"""Guards: what a kept check read, checked again in one pass.

`Guard` watches the metadata of a list of tensors, `DictGuard` the entries of a list of dicts
(a model's ``_parameters``, ``_buffers`` and ``_modules``).

`Guard(tensors)` remembers each tensor's dtype, device, layout, shape, strides and the lazy
conjugate / negative / inference bits; `check(tensors)` says whether a list of tensors
matches it. The pass is torch.compile's own C++ tensor guard (``TensorGuards``, which
compares dispatch keys, dtype, device, shape and strides in one call at about 70 ns per
tensor); it is private to torch, so `Guard` checks that it works when built and otherwise
compares plain per-attribute passes, which see the same properties.

>>> import torch
>>> w = torch.zeros(2, 2)
>>> guard = Guard([w])
>>> guard.check([w]), guard.check([w.t()]), guard.check([w.double()]), guard.check([1.0])
(True, False, False, False)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from itertools import chain, compress
from operator import attrgetter, is_, ne
from typing import Any

import torch
from torch import Tensor

__all__ = ["DictGuard", "Guard", "plain"]

_PLAIN = frozenset({Tensor, torch.nn.Parameter, torch.nn.Buffer})
_SIZE = Tensor.size
_STRIDE = Tensor.stride
_FIELDS = attrgetter("dtype", "device", "layout")
_BITS = (Tensor.is_conj, Tensor.is_neg, Tensor.is_inference)

_TensorGuards: Any
_dict_version: Any
try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - every torch this supports has it
    _TensorGuards = None
try:
    from torch._C._dynamo.guards import dict_version as _dict_version
except ImportError:  # pragma: no cover - every torch this supports has it
    _dict_version = None


def plain(tensors: Sequence[object]) -> bool:
    """Whether every item is a plain tensor, parameter or buffer (no subclass, no DTensor)."""
    return set(map(type, tensors)) <= _PLAIN


def _neutral() -> AbstractContextManager[Any]:
    # The C++ guard reads dispatch keys; autocast adds some that say nothing of the tensors.
    disable = getattr(torch._C, "_DisableAutocast", None)
    return disable() if disable is not None else nullcontext()


_SIZES_IMPLIED: list[bool] = []  # whether the C++ guard, given no sizes, keeps them static


def _static_guard(tensors: Sequence[Tensor]) -> Any:
    """A C++ guard that checks every size and stride as it is now.

    Given no sizes, torch's guard takes each tensor's own (static) sizes and strides, which
    saves building them in Python (2 of the 3 ms at 4500 tensors); whether this torch does
    is tested once, on a probe, and otherwise they are passed."""
    if not _SIZES_IMPLIED:
        probe = torch.zeros(2, 3)
        implied = _TensorGuards(probe, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        _SIZES_IMPLIED.append(
            implied.check(probe)
            and not implied.check(torch.zeros(3, 2))
            and not implied.check(torch.zeros(3, 2).t())
        )
    if _SIZES_IMPLIED[0]:
        return _TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    sizes = list(map(list, map(_SIZE, tensors)))
    strides = list(map(list, map(_STRIDE, tensors)))
    return _TensorGuards(*tensors, dynamic_dims_sizes=sizes, dynamic_dims_strides=strides)


def _passes(tensors: Sequence[Tensor]) -> list[list[Any]] | None:
    """The plain-pass signature of `tensors` (None if one has no strides, as sparse)."""
    try:
        return [
            list(map(_FIELDS, tensors)),
            list(map(_SIZE, tensors)),
            list(map(_STRIDE, tensors)),
            *(list(map(bit, tensors)) for bit in _BITS),
        ]
    except (RuntimeError, NotImplementedError):
        return None


class Guard:
    """The metadata of a list of plain tensors, checked again in one pass (`check`)."""

    __slots__ = ("_count", "_guard", "_passes")

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self._count = len(tensors)
        self._guard: Any = None
        self._passes: list[list[Any]] | None = None
        if _TensorGuards is not None and plain(tensors):
            try:
                with _neutral():
                    guard = _static_guard(tensors)
                    if guard.check(*tensors):
                        self._guard = guard
                        return
            except (TypeError, RuntimeError, SystemError):  # another torch's signature
                pass
        self._passes = _passes(tensors)

    def check(self, tensors: Sequence[Tensor]) -> bool:
        """Whether `tensors` match, one for one (False for a non-tensor or a subclass)."""
        if len(tensors) != self._count:
            return False
        if self._guard is not None:
            with _neutral():
                return bool(self._guard.check(*tensors))
        if self._passes is None or not plain(tensors):
            return False
        return _passes(tensors) == self._passes


_VERSIONS_WORK: list[bool] = []  # whether `_dict_version` sees every change (probed once)


def _versions_work() -> bool:
    """Whether this Python and torch give each dict a version that every change moves and a
    read does not (what torch.compile's guards read: CPython's private dict version, or on
    3.12 and later torch's own count kept by dict watchers)."""
    if not _VERSIONS_WORK:
        # Without the GIL (free-threaded builds) torch keeps versions in a map that other
        # threads may change under a read: not used there.
        gil = getattr(sys, "_is_gil_enabled", lambda: True)()
        _VERSIONS_WORK.append(_dict_version is not None and gil and _probe_versions())
    return _VERSIONS_WORK[0]


def _probe_versions() -> bool:
    probe: dict[str, object] = {"a": 1}
    changes: tuple[Callable[[], object], ...] = (
        lambda: probe.__setitem__("b", 2),
        lambda: probe.__setitem__("b", object()),
        lambda: probe.pop("b"),
        lambda: probe.update(c=3),
        lambda: probe.setdefault("d", 4),
        lambda: probe.__delitem__("d"),
        lambda: probe.popitem(),
        lambda: probe.clear(),
    )
    try:
        for change in changes:
            before = _dict_version(probe)
            _ = probe.get("a"), list(probe.items())
            if _dict_version(probe) != before:
                return False
            change()
            if _dict_version(probe) == before:
                return False
    except (TypeError, RuntimeError, SystemError):  # another torch's signature
        return False
    return True


class DictGuard:
    """The entries of a list of dicts, checked again in one pass (`check`): whether every
    dict still holds exactly the objects it held (by identity), under the same keys.

    Where this Python keeps a version for each dict that every change moves, the pass
    compares the versions of the dicts that held something, and a count of entries (an
    empty dict that gained one): 0.54 ms for a model of 4000 modules, where looking up every
    entry costs 0.89 (warm in cache; `benchmarks/bench_step.py` prints both). A dict whose
    version moved is then compared entry by entry with what it held, and if it holds the
    same objects (a buffer swapped out and back by a hook, an attribute assigned its own
    value) its new version is recorded. Elsewhere every entry is
    compared: its keys in order, and its objects by identity. (A dict object replaced
    wholesale is not seen: the caller keeps the dicts it watches.)

    >>> held = {"w": 1}
    >>> guard = DictGuard([held, {}])
    >>> guard.check()
    True
    >>> held["w"] = 2
    >>> guard.check()
    False
    """

    __slots__ = ("_dicts", "_full", "_keys", "_objects", "_size", "_values", "_versions")

    def __init__(self, dicts: Sequence[dict[Any, Any]]) -> None:
        self._dicts = list(dicts)
        self._size = sum(map(len, self._dicts))
        self._full = [held for held in self._dicts if held]
        # What each dict that held something held: its keys in order, and its values.
        self._keys = list(map(tuple, self._full))
        self._values = [tuple(held.values()) for held in self._full]
        self._objects = [value for values in self._values for value in values]
        self._versions = list(map(_dict_version, self._full)) if _versions_work() else None

    def check(self) -> bool:
        """Whether every dict holds what it held when the guard was built."""
        if sum(map(len, self._dicts)) != self._size:
            return False
        if self._versions is not None:
            now = list(map(_dict_version, self._full))
            return now == self._versions or self._same_where_moved(now)
        # Same count, the same keys in the same order, and the same objects under them.
        return list(map(tuple, self._full)) == self._keys and all(
            map(is_, chain.from_iterable(map(dict.values, self._full)), self._objects)
        )

    def _same_where_moved(self, now: list[int]) -> bool:
        """Whether each dict whose version moved holds the same objects under the same
        keys as before (then its new version is recorded)."""
        assert self._versions is not None
        for i in compress(range(len(now)), map(ne, now, self._versions)):
            held = self._full[i]
            if tuple(held) != self._keys[i] or not all(map(is_, held.values(), self._values[i])):
                return False
        self._versions = now
        return True
