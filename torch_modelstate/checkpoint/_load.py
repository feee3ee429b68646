"""`load` and `check`: a checkpoint into a target (checked, then streamed) or standalone."""

from __future__ import annotations

import logging
import os
from typing import TypeAlias

from torch import nn

from torch_modelstate._state import ModelState
from torch_modelstate.checkpoint._apply import apply
from torch_modelstate.checkpoint._entry import read_entry
from torch_modelstate.checkpoint._files import open_checkpoint
from torch_modelstate.checkpoint._plan import LoadReport, make_plan, some, verify_pairs
from torch_modelstate.checkpoint._standalone import load_standalone

logger = logging.getLogger("torch_modelstate")

PathLike: TypeAlias = "str | os.PathLike[str]"


FROZEN_CHOICES = ("keep", "file")


def load(
    path: PathLike,
    into: nn.Module | ModelState | None = None,
    *,
    strict: bool = True,
    frozen: str | None = None,
) -> ModelState:
    """Load a checkpoint (a file, a directory or an index): values, frozen set and ties.

    Without `into`, returns a standalone ModelState holding the file's tensors (on the
    CPU, in the file's dtypes). With `into` (a module or a ModelState), loads in place:
    everything is checked first, then tensors are streamed one at a time into the existing
    parameters and buffers, on their devices and in their dtypes, so memory stays near one
    copy of the model and parameter identity is kept; the file's ties are made and its
    frozen flags restored. Returns the ModelState of `into`. See the module docs for
    `strict`, dtypes and errors.

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> import torch_modelstate as tms
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> tms.save(tms.ModelState.new(nn.Linear(2, 2)).freeze("bias"), path)
    >>> model = nn.Linear(2, 2)
    >>> weight = model.weight
    >>> ms = tms.load(path, into=model)
    >>> model.weight is weight, list(ms.frozen_parameters())
    (True, ['bias'])
    """
    if into is not None and not isinstance(into, (nn.Module, ModelState)):
        msg = (
            "`into` must be an nn.Module or a ModelState (or None).\n"
            f"  got: {type(into).__name__}\n"
            "  fix: for a dict of tensors, pass ModelState.new(tensors)"
        )
        raise TypeError(msg)
    chosen = None if frozen is None else _check_frozen(frozen)
    with open_checkpoint(path) as ckpt:
        saved = read_entry(ckpt)
        if into is None:
            return load_standalone(ckpt, saved)
        # Until the callers that rely on the old default pass frozen="file", None keeps it.
        frozen = chosen or ("file" if saved.frozen is not None else "keep")
        plan = make_plan(ckpt, saved, ModelState.new(into), strict, frozen=frozen)
        verify_pairs(ckpt, plan.pairs)
        apply(ckpt, plan)
    report = plan.report
    if report.missing or report.unexpected:
        logger.warning(
            "load %s (strict=False): %d keys missing from the file kept their values: %s; "
            "%d keys of the file not in the target were ignored: %s",
            ckpt.path,
            len(report.missing),
            some(report.missing),
            len(report.unexpected),
            some(report.unexpected),
        )
    return plan.ms


def check(path: PathLike, into: nn.Module | ModelState, *, strict: bool = True) -> LoadReport:
    """Check that `load(path, into=into, strict=strict)` would succeed; change nothing.

    Raises the errors `load` would raise, else returns a `LoadReport`: which keys would be
    loaded, cast, skipped, missing or ignored, and which ties made.

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> import torch_modelstate as tms
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> tms.save({"weight": torch.ones(2, 2)}, path)
    >>> tms.io.check(path, nn.Linear(2, 2), strict=False).missing
    ('bias',)
    """
    with open_checkpoint(path) as ckpt:
        plan = make_plan(ckpt, read_entry(ckpt), ModelState.new(into), strict)
        verify_pairs(ckpt, plan.pairs)
    return plan.report


def _check_frozen(frozen: object) -> str:
    if isinstance(frozen, str) and frozen in FROZEN_CHOICES:
        return frozen
    msg = (
        "`frozen` must be 'keep' (the target's frozen flags stay as they are) or 'file' "
        "(the file's frozen set is applied).\n"
        f"  got: {frozen!r}"
    )
    raise ValueError(msg)
