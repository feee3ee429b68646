"""Load planning: every check of a file against the target, before anything is written.

`make_plan` compares the file's keys, shapes, dtypes and ties with the target and returns
what loading will do (a `Plan`, whose `report` is what `check` returns); it raises
`CheckpointMismatchError` on the first problem and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from torch_modelstate import _kernels, _ties
from torch_modelstate._errors import CheckpointError, CheckpointMismatchError
from torch_modelstate._index import Index, Leaf
from torch_modelstate._state import ModelState
from torch_modelstate._ties import Transform
from torch_modelstate.checkpoint._codec import TensorInfo
from torch_modelstate.checkpoint._entry import Saved, transform
from torch_modelstate.checkpoint._files import Checkpoint
from torch_modelstate.checkpoint._hints import broken_ties, broken_ties_message, keys_message
from torch_modelstate.checkpoint._rename import Rename, apply_rename
from torch_modelstate.checkpoint._writable import problems as writability


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What loading a checkpoint into a target does (see `check`); keys in file order.

    Keys are those after `rename`, i.e. the target's.

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> import torch_modelstate as tms
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> tms.save({"weight": torch.ones(2, 2, dtype=torch.float64)}, path)
    >>> report = tms.io.check(path, nn.Linear(2, 2), strict=False)
    >>> report.loaded, report.cast, report.missing
    (('weight',), ('weight',), ('bias',))
    """

    loaded: tuple[str, ...]
    """Keys of the file whose values are written into the target."""
    missing: tuple[str, ...]
    """Keys of the target that the file does not cover (they keep their values)."""
    unexpected: tuple[str, ...]
    """Keys of the file that the target does not have (ignored)."""
    computed: tuple[str, ...]
    """Keys of the file that the target computes from a tie's source (skipped)."""
    cast: tuple[str, ...]
    """Keys whose values are cast to the target's dtype."""
    ties: tuple[str, ...]
    """Tie destinations that loading makes in the target."""


@dataclass(slots=True)
class Plan:
    ms: ModelState
    saved: Saved
    writes: list[tuple[str, TensorInfo, Leaf]]  # (key after `rename`, file tensor, target)
    ties: list[tuple[str, str, str | None]]
    pairs: list[tuple[TensorInfo, TensorInfo]]
    report: LoadReport
    frozen: str = "keep"  # "keep": the target's frozen flags stay; "file": the file's set


def kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "bool" if dtype == torch.bool else "integer"


def make_plan(
    ckpt: Checkpoint,
    saved: Saved,
    ms: ModelState,
    strict: bool,
    *,
    frozen: str = "keep",
    rename: Rename | None = None,
) -> Plan:
    """Check the file against the target (after `rename`) and say what loading will do."""
    file = ckpt.path
    if frozen == "file" and saved.frozen is None:
        msg = (
            f"{file}: frozen='file' applies the file's frozen set, but the file records none "
            "(it was written by another tool).\n"
            "  fix: pass frozen='keep' to keep the target's frozen flags"
        )
        raise CheckpointError(msg)
    saved, stored = apply_rename(file, saved, ckpt.tensors, rename, strict)
    index = ms._idx()
    in_target = set(index.order)
    unexpected: list[str] = []
    computed: list[str] = []
    cast: list[str] = []
    new_ties: list[tuple[str, str, str | None]] = []
    for dest, (source, name) in saved.ties.items():
        fn = transform(file, dest, name)
        if dest not in in_target:
            if not saved.aliases:  # free-form metadata that looks like an alias is no key
                unexpected.append(dest)
            continue
        if source not in in_target:
            continue  # the source is unexpected; `dest` shows up as missing
        if _tie_needed(file, index, dest, source, name, fn):
            new_ties.append((dest, source, name))
    becoming = {dest for dest, _, _ in new_ties}

    problems: list[str] = []
    writes: dict[int, tuple[str, TensorInfo, Leaf]] = {}
    pairs: list[tuple[TensorInfo, TensorInfo]] = []
    covered: set[str] = set(becoming)
    for key, info in stored.items():
        leaf = index.by_key.get(key)
        if leaf is None:
            (computed if key in index.ties else unexpected).append(key)
            continue
        covered.add(leaf.key)
        target = leaf.tensor
        if info.shape != tuple(target.shape):
            problems.append(
                f"shape mismatch for `{key}`.\n"
                f"  expected (target): {tuple(target.shape)}\n  got (file): {info.shape}"
            )
            continue
        dtype = info.torch_dtype
        if dtype != target.dtype:
            if kind(dtype) != kind(target.dtype):
                problems.append(
                    f"dtype mismatch for `{key}`: a {kind(dtype)} value cannot load into a "
                    f"{kind(target.dtype)} tensor.\n"
                    f"  expected (target): {target.dtype}\n  got (file): {dtype}"
                )
                continue
            cast.append(key)
        # Layouts, overlapping elements, lazy views, inference tensors and read-only memory:
        # the rule update and merge use (`_writable`), after the loop.
        if target.is_meta:
            problems.append(
                f"`{key}` is on the meta device in the target and has no memory to load into.\n"
                "  fix: materialize the model first, e.g. model.to_empty(device='cpu')"
            )
            continue
        seen = writes.get(id(leaf))
        if seen is None:
            writes[id(leaf)] = (key, info, leaf)
        else:
            pairs.append((seen[1], info))
    missing = [leaf.key for leaf in index.leaves if leaf.key not in covered]
    broken = broken_ties(ms.module, index, missing, stored)
    if broken:
        raise CheckpointMismatchError(broken_ties_message(file, broken))
    if strict and (missing or unexpected):
        shared = len(covered) - len(becoming)
        msg = keys_message(file, missing, unexpected, shared, list(saved.order), index.order)
        raise CheckpointMismatchError(msg)
    problems += writability([(key, info, leaf.tensor) for key, info, leaf in writes.values()])
    if problems:
        more = f"\n  ({len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise CheckpointMismatchError(f"{file}: {problems[0]}{more}")
    report = LoadReport(
        loaded=tuple(key for key, _, _ in writes.values()),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        computed=tuple(computed),
        cast=tuple(cast),
        ties=tuple(dest for dest, _, _ in new_ties),
    )
    return Plan(ms, saved, list(writes.values()), new_ties, pairs, report, frozen)


def _tie_needed(
    file: Path, index: Index, dest: str, source: str, name: str | None, fn: Transform | None
) -> bool:
    """Whether the file's tie must be made in the target; raise if it cannot be.

    The rules are `ModelState.tie`'s own (`_ties.check_tie`); a tie that is already there,
    either way round, needs nothing.
    """
    check = _ties.check_tie(index, dest, source, fn, name)
    if check.exists or check.reverse:
        return False
    if check.problem is None:
        return True
    what = f"`{source}`" if name is None else f"{name}(`{source}`)"
    theirs = index.ties.get(dest)
    if theirs is not None:
        them = f"`{theirs.source}`" if theirs.fn is None else f"{theirs.fn_name}(`{theirs.source}`)"
        msg = (
            f"{file}: the file ties `{dest}` to {what}, but the target ties it to {them}.\n"
            f"  fix: untie `{dest}` in the target first"
        )
        raise CheckpointMismatchError(msg)
    text = check.problem.text.replace("\n", "\n  ")
    fix = f"\n  fix: {check.problem.fix}" if check.problem.fix else ""
    msg = f"{file}: the file ties `{dest}` to {what}, which does not fit the target: {text}{fix}"
    raise CheckpointMismatchError(msg)


def verify_pairs(ckpt: Checkpoint, pairs: Sequence[tuple[TensorInfo, TensorInfo]]) -> None:
    """A file holding two keys that are one tied tensor in the target must agree on it."""
    for first, second in pairs:
        a, b = ckpt.read(first), ckpt.read(second)
        if not _kernels.same_values(a, b):
            msg = (
                f"{ckpt.path}: `{first.key}` and `{second.key}` hold different values, but they "
                "are one tied tensor in the target.\n"
                f"  fix: untie `{second.key}` in the target before loading"
            )
            raise CheckpointMismatchError(msg)
