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

from torch import Tensor

from torch_modelstate import _slerp
from torch_modelstate.checkpoint import _budget
from torch_modelstate.checkpoint._average import Staging, check_same_inputs
from torch_modelstate.checkpoint._codec import Spec
from torch_modelstate.checkpoint._files import open_checkpoint
from torch_modelstate.checkpoint._layout import parse_size
from torch_modelstate.checkpoint._writer import write_checkpoint

__all__ = ["slerp_files"]

PathLike: TypeAlias = "str | os.PathLike[str]"


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
        msg = (
            "slerp: interpolates exactly two checkpoints.\n"
            f"  expected: 2 inputs\n  got: {len(inputs)}\n"
            "  fix: pass two paths, or use average() for more"
        )
        raise ValueError(msg)
    if not math.isfinite(t):
        msg = (
            "slerp: `t` must be finite (0 is the first input, 1 the second).\n"
            f"  expected: a finite float\n  got: {t!r}\n  fix: pass t between 0 and 1"
        )
        raise ValueError(msg)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    with ExitStack() as stack:
        first, second = (stack.enter_context(open_checkpoint(p)) for p in inputs)
        check_same_inputs(first, second, "interpolate")
        specs = [Spec(key, info.torch_dtype, info.shape) for key, info in first.tensors.items()]
        total = sum(spec.nbytes for spec in specs)
        done = [0]

        ours, theirs = Staging(), Staging()

        def fill(batch: Sequence[Spec]) -> list[Tensor]:
            # Staging is reused from batch to batch (the writer is done with the last one).
            out = ours.take([(s.dtype, s.shape) for s in batch])
            first.read_into([(first.tensors[s.key], o) for s, o in zip(batch, out, strict=True)])
            floats = [i for i, s in enumerate(batch) if s.dtype.is_floating_point]
            other = theirs.take([(batch[i].dtype, batch[i].shape) for i in floats])
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
