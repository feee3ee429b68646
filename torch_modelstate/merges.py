"""Named merge functions for `ModelState.merge`.

Each is a `Merge`: callable as ``fun(path, lhs, rhs)`` like any merge function, and also
applied by `ModelState.merge` to all tensors at once as grouped in-place kernels
(``torch._foreach_lerp_`` / ``_foreach_add_`` per device and dtype), with no Python call
per tensor.

Integer and bool tensors (``num_batches_tracked``, masks) are never interpolated or scaled:
by default they take the right-hand value, so an EMA follows its model's counters; pass
``nonfloat="lhs"`` to keep the left-hand value instead.

>>> import torch
>>> from torch_modelstate import ModelState, merges
>>> ema = ModelState.new({"w": torch.zeros(2)})
>>> ema.merge({"w": torch.ones(2)}, merges.ema(0.75)).to_dict()["w"]
tensor([0.2500, 0.2500])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torch_modelstate import _kernels
from torch_modelstate._kernels import NonFloat

__all__ = ["Merge", "add", "ema", "lerp", "replace", "sub"]


class Merge:
    """A merge function that also runs as grouped in-place kernels."""

    __slots__ = ("nonfloat",)

    def __init__(self, nonfloat: NonFloat = "rhs") -> None:
        if nonfloat not in ("rhs", "lhs"):
            msg = f'`nonfloat` must be "rhs" or "lhs".\n  got: {nonfloat!r}'
            raise ValueError(msg)
        self.nonfloat: NonFloat = nonfloat

    def __call__(self, path: list[str], lhs: Tensor, rhs: Tensor) -> Tensor:
        """The merged value of one tensor, out of place."""
        rhs = rhs.to(device=lhs.device, dtype=lhs.dtype)
        if not (lhs.dtype.is_floating_point or lhs.dtype.is_complex):
            return (rhs if self.nonfloat == "rhs" else lhs).clone()
        return self._value(lhs, rhs)

    def apply_(self, lhs: list[Tensor], rhs: list[Tensor]) -> None:
        """Merge ``rhs[i]`` into ``lhs[i]`` in place for all i."""
        raise NotImplementedError

    def _value(self, lhs: Tensor, rhs: Tensor) -> Tensor:
        raise NotImplementedError


class _Lerp(Merge):
    __slots__ = ("t",)

    def __init__(self, t: float, nonfloat: NonFloat) -> None:
        super().__init__(nonfloat)
        self.t = _real("t", t)

    def _value(self, lhs: Tensor, rhs: Tensor) -> Tensor:
        return torch.lerp(lhs, rhs, self.t)

    def apply_(self, lhs: list[Tensor], rhs: list[Tensor]) -> None:
        _kernels.lerp_(lhs, rhs, self.t, self.nonfloat)

    def __repr__(self) -> str:
        return f"merges.lerp({self.t!r})"


class _Add(Merge):
    __slots__ = ("_name", "alpha")

    def __init__(self, alpha: float, nonfloat: NonFloat, name: str = "add") -> None:
        super().__init__(nonfloat)
        self.alpha = _real("alpha", alpha)
        self._name = name

    def _value(self, lhs: Tensor, rhs: Tensor) -> Tensor:
        return torch.add(lhs, rhs, alpha=self.alpha)

    def apply_(self, lhs: list[Tensor], rhs: list[Tensor]) -> None:
        _kernels.add_(lhs, rhs, self.alpha, self.nonfloat)

    def __repr__(self) -> str:
        alpha = -self.alpha if self._name == "sub" else self.alpha
        return f"merges.{self._name}({alpha!r})"


class _Replace(Merge):
    __slots__ = ()

    def __call__(self, path: list[str], lhs: Tensor, rhs: Tensor) -> Tensor:
        return rhs.to(device=lhs.device, dtype=lhs.dtype).clone()

    def apply_(self, lhs: list[Tensor], rhs: list[Tensor]) -> None:
        _kernels.copy_(lhs, rhs)

    def __repr__(self) -> str:
        return "merges.replace()"


def lerp(t: float, *, nonfloat: NonFloat = "rhs") -> Merge:
    """``lhs + t * (rhs - lhs)``: interpolation; ``t=0.5`` averages two models (a soup).

    ``t`` outside [0, 1] extrapolates, which is task arithmetic: ``base.merge(finetuned,
    lerp(1.5))`` moves 1.5 times along the fine-tuning direction.

    >>> import torch
    >>> lerp(0.25)(["w"], torch.zeros(2), torch.ones(2))
    tensor([0.2500, 0.2500])
    """
    return _Lerp(t, nonfloat)


def ema(decay: float, *, nonfloat: NonFloat = "rhs") -> Merge:
    """The exponential moving average step ``decay * lhs + (1 - decay) * rhs``.

    Keep an EMA of a model by merging the model into a copy after each optimizer step:
    ``ema_state.merge(model_state, merges.ema(0.999))``.

    >>> import torch
    >>> ema(0.9)(["w"], torch.zeros(1), torch.ones(1))
    tensor([0.1000])
    """
    decay = _real("decay", decay)
    if not 0.0 <= decay <= 1.0:
        msg = f"`decay` must lie in [0, 1].\n  got: {decay!r}\n  fix: a typical EMA uses 0.999"
        raise ValueError(msg)
    return _Lerp(1.0 - decay, nonfloat)


def add(alpha: float = 1.0, *, nonfloat: NonFloat = "rhs") -> Merge:
    """``lhs + alpha * rhs``: add a (scaled) task vector.

    >>> import torch
    >>> add(0.5)(["w"], torch.ones(2), torch.ones(2))
    tensor([1.5000, 1.5000])
    """
    return _Add(alpha, nonfloat)


def sub(alpha: float = 1.0, *, nonfloat: NonFloat = "rhs") -> Merge:
    """``lhs - alpha * rhs``: e.g. a task vector, ``finetuned.merge(base, sub())``.

    >>> import torch
    >>> sub()(["w"], torch.ones(2), torch.ones(2))
    tensor([0., 0.])
    """
    return _Add(-_real("alpha", alpha), nonfloat, name="sub")


def replace() -> Merge:
    """Take rhs's value: copy the keys both states share.

    >>> import torch
    >>> replace()(["w"], torch.zeros(1), torch.ones(1))
    tensor([1.])
    """
    return _Replace()


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        msg = f"`{name}` must be a real number.\n  got: {type(value).__name__} {value!r}"
        raise TypeError(msg)
    if not math.isfinite(value):
        msg = f"`{name}` must be finite.\n  got: {value!r}"
        raise ValueError(msg)
    return float(value)
