"""Old home of the tie rules, kept only until `checkpoint/` imports `_ties` directly.

The rules are in `torch_modelstate._ties` (`check_tie`, `fit_problem`, the transform
registry); the transform-tie mechanism is `torch_modelstate._tied_module`.
"""

from __future__ import annotations

from torch import Tensor

from torch_modelstate._ties import Transform, fit_problem
from torch_modelstate._ties import register_transform as register_transform
from torch_modelstate._ties import registered_transforms as registered_transforms
from torch_modelstate._ties import resolve_transform as resolve_transform


def _check_compatible(
    dest: str, target: Tensor, source: str, src: Tensor, fn: Transform | None
) -> None:
    """Raise what `fit_problem` finds (the old interface of `checkpoint._plan`)."""
    problem = fit_problem(dest, target, source, src, fn)
    if problem is not None:
        raise problem.exception("tie")
