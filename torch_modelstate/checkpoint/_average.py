"""`average`: the weighted average of checkpoints, streamed tensor by tensor (CLI `merge`)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TypeAlias

import torch
from torch import Tensor

from torch_modelstate import _kernels
from torch_modelstate._errors import CheckpointMismatchError
from torch_modelstate.checkpoint import _budget
from torch_modelstate.checkpoint._codec import Spec, dtype_name
from torch_modelstate.checkpoint._entry import read_entry
from torch_modelstate.checkpoint._files import Checkpoint, open_checkpoint
from torch_modelstate.checkpoint._hints import some
from torch_modelstate.checkpoint._layout import parse_size
from torch_modelstate.checkpoint._plan import kind
from torch_modelstate.checkpoint._writer import write_checkpoint

PathLike: TypeAlias = "str | os.PathLike[str]"


def average(
    inputs: Sequence[PathLike],
    output: PathLike,
    *,
    weights: Sequence[float] | None = None,
    max_shard_size: int | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the weighted average of checkpoints, streamed tensor by tensor.

    Keys, shapes and dtypes of all inputs are checked to agree before anything is
    written. `weights` (uniform by default) are normalised to sum to 1; floating tensors
    are accumulated in float32 (float64 and complex64 in their own dtype) and written in
    their dtype. Integer and bool tensors (counters, masks) are not averaged: they are
    taken from the first input, as are the metadata (state keys, frozen set, ties).
    Memory stays near a few copies of the largest tensor. `output` is as `path` in `save`.
    `progress(done, total)` is called with byte counts as the output is written.
    Returns the file or index written.

    >>> import os, tempfile, torch
    >>> import torch_modelstate as tms
    >>> d = tempfile.mkdtemp()
    >>> a, b, out = (
    ...     os.path.join(d, n) for n in ("a.safetensors", "b.safetensors", "out.safetensors")
    ... )
    >>> tms.save({"w": torch.zeros(2)}, a)
    >>> tms.save({"w": torch.ones(2)}, b)
    >>> _ = tms.io.average([a, b], out, weights=[1, 3])
    >>> tms.load(out).to_dict()["w"]
    tensor([0.7500, 0.7500])
    """
    if not inputs:
        msg = "average: give at least one input checkpoint."
        raise ValueError(msg)
    factors = _normalised(weights, len(inputs))
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    with ExitStack() as stack:
        ckpts = [stack.enter_context(open_checkpoint(p)) for p in inputs]
        first = ckpts[0]
        saved = read_entry(first)
        for ckpt in ckpts[1:]:
            _check_same(first, ckpt)
            if read_entry(ckpt).ties != saved.ties:
                msg = (
                    f"{ckpt.path}: its ties differ from those of {first.path}; "
                    "averaging them is ambiguous."
                )
                raise CheckpointMismatchError(msg)
        specs = [Spec(key, info.torch_dtype, info.shape) for key, info in first.tensors.items()]
        total = sum(spec.nbytes for spec in specs)
        done = [0]

        def fill(batch: Sequence[Spec]) -> list[Tensor]:
            floats = [s for s in batch if kind(s.dtype) in ("floating", "complex")]
            accs = [torch.zeros(s.shape, dtype=_accumulator(s.dtype)) for s in floats]
            for ckpt, factor in zip(ckpts, factors, strict=True):
                values = [torch.empty(s.shape, dtype=s.dtype) for s in floats]
                infos = [ckpt.tensors[s.key] for s in floats]
                ckpt.read_into(list(zip(infos, values, strict=True)))
                _kernels.add_(accs, values, factor, "lhs")
                del values
            result = dict(zip((s.key for s in floats), accs, strict=True))
            out: list[Tensor] = []
            dsts: list[Tensor] = []
            srcs: list[Tensor] = []
            for spec in batch:
                acc = result.get(spec.key)
                if acc is None:
                    out.append(first.read(first.tensors[spec.key]))
                elif acc.dtype == spec.dtype:
                    out.append(acc)
                else:
                    out.append(torch.empty(spec.shape, dtype=spec.dtype))
                    dsts.append(out[-1])
                    srcs.append(acc)
            _kernels.copy_(dsts, srcs)
            return out

        def report(nbytes: int) -> None:
            done[0] += nbytes
            if progress is not None:
                progress(done[0], total)

        metadata = {**first.metadata, "format": "pt"}
        if progress is not None:
            progress(0, total)
        return write_checkpoint(
            output,
            specs,
            metadata,
            fill,
            max_shard_size=limit,
            budget=_budget.BUDGET,
            progress=report,
        )


def _normalised(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    values = [float(w) for w in weights]
    if len(values) != n:
        msg = f"average: give one weight per input.\n  expected: {n} weights\n  got: {len(values)}"
        raise ValueError(msg)
    total = math.fsum(values)
    if not all(math.isfinite(w) for w in values) or total == 0:
        msg = f"average: the weights must be finite numbers with a non-zero sum.\n  got: {values}"
        raise ValueError(msg)
    return [w / total for w in values]


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float64, torch.complex64) else torch.float32


def _check_same(first: Checkpoint, other: Checkpoint) -> None:
    if list(other.tensors) != list(first.tensors) and set(other.tensors) != set(first.tensors):
        absent = [k for k in first.tensors if k not in other.tensors]
        extra = [k for k in other.tensors if k not in first.tensors]
        msg = (
            f"{other.path}: its keys differ from those of {first.path}.\n"
            + (f"  missing: {some(absent)}\n" if absent else "")
            + (f"  extra: {some(extra)}\n" if extra else "")
            + "  fix: average checkpoints of one architecture"
        )
        raise CheckpointMismatchError(msg.rstrip("\n"))
    for key, info in first.tensors.items():
        theirs = other.tensors[key]
        if theirs.shape != info.shape or theirs.dtype != info.dtype:
            msg = (
                f"{other.path}: `{key}` differs from {first.path}.\n"
                f"  expected: {dtype_name(info.dtype)} {info.shape}\n"
                f"  got: {dtype_name(theirs.dtype)} {theirs.shape}"
            )
            raise CheckpointMismatchError(msg)
