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
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from torch_modelstate import _kernels, _rounding, _slerp
from torch_modelstate._kernels import NonFloat, Prepared

__all__ = ["Merge", "Rounding", "add", "ema", "lerp", "replace", "slerp", "sub"]

Rounding: TypeAlias = Literal["nearest", "stochastic"]


class Merge:
    """A merge function that also runs as grouped in-place kernels.

    Call it like any merge function, ``fun(path, lhs, rhs)``, for one tensor's merged value;
    `ModelState.merge` recognises a `Merge` and applies it to all tensors at once.

    >>> import torch
    >>> from torch_modelstate import merges
    >>> step = merges.ema(0.5)
    >>> isinstance(step, merges.Merge), step(["w"], torch.zeros(2), torch.ones(2))
    (True, tensor([0.5000, 0.5000]))
    """

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

    def apply_prepared_(self, lhs: list[Tensor], rhs: list[Tensor], prepared: Prepared) -> None:
        """`apply_`, given what kept facts proved of the pairs (`_kernels.Prepared`); a
        merge whose kernel cannot use it runs `apply_`."""
        self.apply_(lhs, rhs)

    def _value(self, lhs: Tensor, rhs: Tensor) -> Tensor:
        raise NotImplementedError


class _Lerp(Merge):
    __slots__ = ("_name", "generator", "rounding", "t")
    interpolates = True  # a lerp kernel: none for complex32 on the CPU (`check_arithmetic`)

    def __init__(
        self,
        t: float,
        nonfloat: NonFloat,
        rounding: Rounding = "nearest",
        generator: torch.Generator | None = None,
        name: str = "",
    ) -> None:
        super().__init__(nonfloat)
        self.t = _real("t", t)
        if rounding not in ("nearest", "stochastic"):
            msg = f'`rounding` must be "nearest" or "stochastic".\n  got: {rounding!r}'
            raise ValueError(msg)
        if generator is not None and not isinstance(generator, torch.Generator):
            msg = f"`generator` must be a torch.Generator.\n  got: {type(generator).__name__}"
            raise TypeError(msg)
        self.rounding: Rounding = rounding
        self.generator = generator
        self._name = name or f"lerp({self.t!r}"

    def _value(self, lhs: Tensor, rhs: Tensor) -> Tensor:
        if self.rounding == "stochastic" and lhs.dtype in _rounding.LOW_PRECISION:
            out = lhs.clone()
            _rounding.lerp_([out], [rhs], self.t, self.nonfloat, self.generator)
            return out
        return torch.lerp(lhs, rhs, self.t)

    def apply_(self, lhs: list[Tensor], rhs: list[Tensor]) -> None:
        if self.rounding == "stochastic":
            _rounding.lerp_(lhs, rhs, self.t, self.nonfloat, self.generator)
        else:
            _kernels.lerp_(lhs, rhs, self.t, self.nonfloat)

    def apply_prepared_(self, lhs: list[Tensor], rhs: list[Tensor], prepared: Prepared) -> None:
        if self.rounding == "stochastic":
            self.apply_(lhs, rhs)
        else:
            _kernels.lerp_(lhs, rhs, self.t, self.nonfloat, prepared)

    def __repr__(self) -> str:
        extra = ", rounding='stochastic'" if self.rounding == "stochastic" else ""
        return f"merges.{self._name}{extra})"


class _Slerp(Merge):
    __slots__ = ("t",)

    def __init__(self, t: float, nonfloat: NonFloat) -> None:
        super().__init__(nonfloat)
        self.t = _real("t", t)

    def _value(self, lhs: Tensor, rhs: Tensor) -> Tensor:
        if lhs.is_complex():
            _slerp.slerp_([lhs], [rhs], self.t, self.nonfloat)  # raises the TypeError
        return _slerp.slerp(lhs, rhs, self.t)

    def apply_(self, lhs: list[Tensor], rhs: list[Tensor]) -> None:
        _slerp.slerp_(lhs, rhs, self.t, self.nonfloat)

    def __repr__(self) -> str:
        return f"merges.slerp({self.t!r})"


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

    def apply_prepared_(self, lhs: list[Tensor], rhs: list[Tensor], prepared: Prepared) -> None:
        _kernels.add_(lhs, rhs, self.alpha, self.nonfloat, prepared)

    def __repr__(self) -> str:
        alpha = -self.alpha if self._name == "sub" else self.alpha
        return f"merges.{self._name}({alpha!r})"


class _Replace(Merge):
    __slots__ = ()
    arithmetic = False  # a plain copy: fine into dtypes without arithmetic kernels (float8)

    def __call__(self, path: list[str], lhs: Tensor, rhs: Tensor) -> Tensor:
        return rhs.to(device=lhs.device, dtype=lhs.dtype).clone()

    def apply_(self, lhs: list[Tensor], rhs: list[Tensor]) -> None:
        _kernels.copy_(lhs, rhs)

    def apply_prepared_(self, lhs: list[Tensor], rhs: list[Tensor], prepared: Prepared) -> None:
        _kernels.copy_(lhs, rhs, prepared)

    def __repr__(self) -> str:
        return "merges.replace()"


def lerp(
    t: float,
    *,
    nonfloat: NonFloat = "rhs",
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> Merge:
    """``lhs + t * (rhs - lhs)``: interpolation; ``t=0.5`` averages two models (a soup).

    ``t`` outside [0, 1] extrapolates, which is task arithmetic: ``base.merge(finetuned,
    lerp(1.5))`` moves 1.5 times along the fine-tuning direction.

    ``rounding="stochastic"`` rounds results into bf16 and fp16 tensors up or down at random
    in proportion to the distance (unbiased, as timm's ``ModelEmaV3``), so many small steps
    add up instead of rounding back to the old value; other dtypes round to nearest. Pass a
    `generator` (on the tensors' device) for reproducible rounding.

    >>> import torch
    >>> lerp(0.25)(["w"], torch.zeros(2), torch.ones(2))
    tensor([0.2500, 0.2500])
    >>> w = torch.ones(4, dtype=torch.bfloat16)
    >>> lerp(0.001)(["w"], w, 2 * w)  # nearest: 1.001 rounds back to 1 in bf16
    tensor([1., 1., 1., 1.], dtype=torch.bfloat16)
    """
    return _Lerp(t, nonfloat, rounding, generator)


def ema(
    decay: float,
    *,
    nonfloat: NonFloat = "rhs",
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
) -> Merge:
    """The exponential moving average step ``decay * lhs + (1 - decay) * rhs``.

    Keep an EMA of a model by merging the model into a copy after each optimizer step:
    ``ema_state.merge(model_state, merges.ema(0.999))``. A bf16 or fp16 EMA stalls with
    nearest rounding (each step is below half a unit in the last place): keep the EMA in
    fp32 (``ModelState.new(model).clone(dtype=torch.float32)``, the most accurate), or
    pass ``rounding="stochastic"`` to keep it in the model's dtype, unbiased on average.

    >>> import torch
    >>> ema(0.9)(["w"], torch.zeros(1), torch.ones(1))
    tensor([0.1000])
    """
    decay = _real("decay", decay)
    if not 0.0 <= decay <= 1.0:
        msg = f"`decay` must lie in [0, 1].\n  got: {decay!r}\n  fix: a typical EMA uses 0.999"
        raise ValueError(msg)
    return _Lerp(1.0 - decay, nonfloat, rounding, generator, name=f"ema({decay!r}")


def slerp(t: float, *, nonfloat: NonFloat = "rhs") -> Merge:
    """Spherical interpolation per tensor: along the arc from lhs towards rhs.

    Each tensor is one flat vector; with θ the angle between lhs and rhs, the result is
    ``sin((1-t)θ)/sin θ · lhs + sin(tθ)/sin θ · rhs``, and ``lerp(t)`` where they are
    nearly parallel (``|cos θ| > 0.9995``), as mergekit does. It runs as a few grouped
    kernels per chunk of tensors on their own device (mergekit computes it on the CPU in
    numpy, one tensor at a time); integer tensors follow `nonfloat`.

    >>> import torch
    >>> slerp(0.5)(["w"], torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    tensor([0.7071, 0.7071])
    """
    return _Slerp(t, nonfloat)


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
