"""A guard over the metadata of a list of tensors: what a kept check read, in one pass.

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

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

__all__ = ["Guard", "plain"]

_PLAIN = frozenset({Tensor, torch.nn.Parameter, torch.nn.Buffer})
_SIZE = Tensor.size
_STRIDE = Tensor.stride
_FIELDS = attrgetter("dtype", "device", "layout")
_BITS = (Tensor.is_conj, Tensor.is_neg, Tensor.is_inference)

_TensorGuards: Any
try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - every torch this supports has it
    _TensorGuards = None


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
