"""`slerp_files`: spherical interpolation of two checkpoints, tensor by tensor (CLI `merge`).

The file-level twin of ``merges.slerp``: both inputs are checked to agree (keys, shapes,
dtypes, ties: the rules of `average`), then each batch of tensors is read from both files,
merged by the grouped slerp kernel and written, so memory stays near a few copies of a
batch. Integer and bool tensors and the metadata come from the first input.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TypeAlias

import torch
from torch import Tensor

from torch_modelstate import _slerp
from torch_modelstate._cli_paths import UsageError
from torch_modelstate._errors import CheckpointMismatchError
from torch_modelstate.checkpoint import _budget
from torch_modelstate.checkpoint._average import _check_same
from torch_modelstate.checkpoint._codec import Spec
from torch_modelstate.checkpoint._entry import read_entry
from torch_modelstate.checkpoint._files import open_checkpoint
from torch_modelstate.checkpoint._layout import parse_size
from torch_modelstate.checkpoint._writer import write_checkpoint

__all__ = ["check_slerp_args", "slerp_files"]

PathLike: TypeAlias = "str | os.PathLike[str]"


def check_slerp_args(
    method: str, n_inputs: int, t: float | None, weights: Sequence[float] | None
) -> None:
    """The command line of ``merge --method slerp`` (``--t``), checked before anything runs.

    >>> check_slerp_args("slerp", 3, None, None)
    Traceback (most recent call last):
    torch_modelstate._cli_paths.UsageError: --method slerp: interpolates exactly two checkpoints.
      got: 3 inputs
      fix: give two IN, or use --method mean for more
    """
    if method != "slerp":
        if t is not None:
            msg = "--t: only --method slerp takes it.\n  fix: add --method slerp, or drop --t"
            raise UsageError(msg)
        return
    if n_inputs != 2:
        msg = (
            "--method slerp: interpolates exactly two checkpoints.\n"
            f"  got: {n_inputs} inputs\n  fix: give two IN, or use --method mean for more"
        )
        raise UsageError(msg)
    if weights is not None:
        msg = (
            "--weights: --method slerp takes --t (the position between the two inputs).\n"
            "  fix: drop --weights; --t 0.3 is 30 % of the way from the first to the second"
        )
        raise UsageError(msg)
    if t is not None and not math.isfinite(t):
        msg = f"--t: must be a finite number (0 is the first input, 1 the second).\n  got: {t}"
        raise UsageError(msg)


def slerp_files(
    inputs: Sequence[PathLike],
    output: PathLike,
    *,
    t: float = 0.5,
    max_shard_size: int | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the spherical interpolation of two checkpoints at `t` (0: the first, 1: the second).

    Each floating tensor is interpolated along the arc between its two values (``lerp``
    where they are nearly parallel), as ``merges.slerp(t)``; integer and bool tensors and
    the metadata come from the first input. `output` is as `path` in `save`. Returns the
    file or index written.

    >>> import os, tempfile, torch
    >>> import torch_modelstate as tms
    >>> d = tempfile.mkdtemp()
    >>> a, b, out = (
    ...     os.path.join(d, n) for n in ("a.safetensors", "b.safetensors", "o.safetensors")
    ... )
    >>> tms.save({"w": torch.tensor([1.0, 0.0])}, a)
    >>> tms.save({"w": torch.tensor([0.0, 1.0])}, b)
    >>> _ = slerp_files([a, b], out)
    >>> tms.load(out).to_dict()["w"]
    tensor([0.7071, 0.7071])
    """
    if len(inputs) != 2:
        msg = f"slerp: give exactly two input checkpoints.\n  got: {len(inputs)}"
        raise ValueError(msg)
    if not math.isfinite(t):
        msg = f"slerp: `t` must be finite.\n  got: {t!r}"
        raise ValueError(msg)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    with ExitStack() as stack:
        first, second = (stack.enter_context(open_checkpoint(p)) for p in inputs)
        _check_same(first, second)
        if read_entry(second).ties != read_entry(first).ties:
            msg = (
                f"{second.path}: its ties differ from those of {first.path}; "
                "interpolating them is ambiguous."
            )
            raise CheckpointMismatchError(msg)
        specs = [Spec(key, info.torch_dtype, info.shape) for key, info in first.tensors.items()]
        total = sum(spec.nbytes for spec in specs)
        done = [0]

        def fill(batch: Sequence[Spec]) -> list[Tensor]:
            out = [torch.empty(s.shape, dtype=s.dtype) for s in batch]
            first.read_into([(first.tensors[s.key], o) for s, o in zip(batch, out, strict=True)])
            floats = [i for i, s in enumerate(batch) if s.dtype.is_floating_point]
            other = [torch.empty(batch[i].shape, dtype=batch[i].dtype) for i in floats]
            second.read_into(
                [(second.tensors[batch[i].key], o) for i, o in zip(floats, other, strict=True)]
            )
            _slerp.slerp_([out[i] for i in floats], other, t, "lhs")
            return out

        def report(nbytes: int) -> None:
            done[0] += nbytes
            if progress is not None:
                progress(done[0], total)

        if progress is not None:
            progress(0, total)
        return write_checkpoint(
            output,
            specs,
            {**first.metadata, "format": "pt"},
            fill,
            max_shard_size=limit,
            budget=_budget.BUDGET,
            progress=report,
        )
