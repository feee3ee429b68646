"""`load` and `check`: a checkpoint into a target (checked, then streamed) or standalone."""

from __future__ import annotations

import logging
import os
from typing import Literal, TypeAlias

from torch import nn

from torch_modelstate import _distributed
from torch_modelstate._state import ModelState
from torch_modelstate.checkpoint._apply import apply
from torch_modelstate.checkpoint._entry import read_entry
from torch_modelstate.checkpoint._files import open_checkpoint
from torch_modelstate.checkpoint._hints import some
from torch_modelstate.checkpoint._plan import LoadReport, make_plan, verify_pairs
from torch_modelstate.checkpoint._rename import Rename, apply_rename, check_rename, prefix_fix
from torch_modelstate.checkpoint._standalone import load_standalone

logger = logging.getLogger("torch_modelstate")

PathLike: TypeAlias = "str | os.PathLike[str]"
Frozen: TypeAlias = Literal["keep", "file"]

FROZEN_CHOICES = ("keep", "file")


def load(
    path: PathLike,
    into: nn.Module | ModelState | None = None,
    *,
    strict: bool = True,
    frozen: Frozen = "keep",
    rename: Rename | None = None,
) -> ModelState:
    """Load a checkpoint (a file, a directory or an index): values, frozen set and ties.

    Without `into`, returns a standalone ModelState holding the file's tensors (on the
    CPU, in the file's dtypes, mapped from the file copy-on-write: writing them never
    changes the file), its frozen set and its ties. With `into` (a module or a
    ModelState), loads in place: everything is checked first, then tensors are streamed
    one at a time into the existing parameters and buffers, on their devices and in their
    dtypes, so memory stays near one copy of the model and parameter identity is kept; the
    file's ties are made. Returns the ModelState of `into`.

    `frozen` (with `into`): ``"keep"`` leaves the target's frozen flags as they are
    (loading weights never changes what trains, as with ``load_state_dict``); ``"file"``
    applies the file's frozen set. `rename` maps the file's keys to the target's before
    matching: a mapping ``{file_key: target_key}`` or a callable
    ``file_key -> target_key | None`` (None skips the key). See the `torch_modelstate.io`
    docs for `strict`, dtypes and errors.

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> import torch_modelstate as tms
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> tms.save(tms.ModelState.new(nn.Linear(2, 2)).freeze("bias"), path)
    >>> model = nn.Linear(2, 2)
    >>> weight = model.weight
    >>> ms = tms.load(path, into=model, frozen="file")
    >>> model.weight is weight, list(ms.frozen_parameters())
    (True, ['bias'])
    >>> wrapped = nn.Sequential(nn.Linear(2, 2))  # keys "0.weight", "0.bias"
    >>> _ = tms.load(path, into=wrapped, rename=lambda k: "0." + k)
    """
    if into is not None and not isinstance(into, (nn.Module, ModelState)):
        msg = (
            "`into` must be an nn.Module or a ModelState (or None).\n"
            f"  got: {type(into).__name__}\n"
            "  fix: for a dict of tensors, pass ModelState.new(tensors)"
        )
        raise TypeError(msg)
    chosen = _check_frozen(frozen)
    check_rename(rename)
    with open_checkpoint(path) as ckpt:
        saved = read_entry(ckpt)
        if into is None:
            saved, stored = apply_rename(ckpt.path, saved, ckpt.tensors, rename, strict)
            return load_standalone(ckpt, saved, stored)
        target = ModelState.new(into)
        # FSDP2 targets: the checks are collective; if one rank fails, every rank raises (dist)
        with _distributed.agreement(target.state_dict().values()):
            _distributed.check_sharded(target.module, "load")
            plan = make_plan(ckpt, saved, target, strict, frozen=chosen, rename=rename)
            verify_pairs(ckpt, plan.pairs)
        apply(ckpt, plan)
    report = plan.report
    if report.missing or report.unexpected:
        fix = prefix_fix(plan.saved.order, plan.ms._idx().order)
        logger.warning(
            "load %s (strict=False): %d keys missing from the file kept their values: %s; "
            "%d keys of the file not in the target were ignored: %s%s",
            ckpt.path,
            len(report.missing),
            some(report.missing),
            len(report.unexpected),
            some(report.unexpected),
            "" if fix is None else f"; the keys differ by a prefix: pass {fix[0]}",
        )
    return plan.ms


def check(
    path: PathLike,
    into: nn.Module | ModelState,
    *,
    strict: bool = True,
    frozen: Frozen = "keep",
    rename: Rename | None = None,
) -> LoadReport:
    """Check that ``load(path, into=into, ...)`` with these keywords would succeed; change nothing.

    Raises the errors `load` would raise, else returns a `LoadReport`: which keys (after
    `rename`) would be loaded, cast, skipped, missing or ignored, and which ties made.

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> import torch_modelstate as tms
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> tms.save({"weight": torch.ones(2, 2)}, path)
    >>> tms.io.check(path, nn.Linear(2, 2), strict=False).missing
    ('bias',)
    """
    chosen = _check_frozen(frozen)
    check_rename(rename)
    with open_checkpoint(path) as ckpt:
        saved = read_entry(ckpt)
        target = ModelState.new(into)
        with _distributed.agreement(target.state_dict().values()):  # as in load (dist)
            _distributed.check_sharded(target.module, "check")
            plan = make_plan(ckpt, saved, target, strict, frozen=chosen, rename=rename)
            verify_pairs(ckpt, plan.pairs)
    return plan.report


def _check_frozen(frozen: object) -> Frozen:
    if frozen == "keep" or frozen == "file":
        return "keep" if frozen == "keep" else "file"
    msg = (
        "`frozen` must be 'keep' (the target's frozen flags stay as they are) or 'file' "
        "(the file's frozen set is applied).\n"
        f"  got: {frozen!r}"
    )
    raise ValueError(msg)
