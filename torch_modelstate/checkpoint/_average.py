"""`average`: the weighted average of checkpoints, streamed tensor by tensor (CLI `merge`)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TypeAlias

import torch
from torch import Tensor

from torch_modelstate import _kernels
from torch_modelstate._errors import CheckpointMismatchError
from torch_modelstate.checkpoint import _budget
from torch_modelstate.checkpoint._codec import CODE, ITEMSIZE, Spec, dtype_name
from torch_modelstate.checkpoint._entry import read_entry
from torch_modelstate.checkpoint._files import Checkpoint, open_checkpoint
from torch_modelstate.checkpoint._hints import some
from torch_modelstate.checkpoint._layout import parse_size
from torch_modelstate.checkpoint._mapping import map_checkpoint
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
            check_same_inputs(first, ckpt, "average", saved.ties)
        specs = [Spec(key, info.torch_dtype, info.shape) for key, info in first.tensors.items()]
        total = sum(spec.nbytes for spec in specs)
        done = [0]

        maps = [map_checkpoint(ckpt) for ckpt in ckpts]
        accs = Staging()
        outs = Staging()

        def fill(batch: Sequence[Spec]) -> list[Tensor]:
            # Staging is reused from batch to batch (fresh pages cost more to fault in than
            # the sums themselves); the inputs are views of their files.
            floats = [s for s in batch if kind(s.dtype) in ("floating", "complex")]
            sums = accs.take([(_accumulator(s.dtype), s.shape) for s in floats])
            values = [[m.tensors[s.key] for s in floats] for m in maps]
            for group, parts in _slices(sums, values, _SLICE):
                torch._foreach_zero_(group)
                for part, factor in zip(parts, factors, strict=True):
                    _kernels.add_(group, part, factor, "lhs")
            for m, ckpt in zip(maps, ckpts, strict=True):
                m.release(ckpt.tensors[s.key] for s in floats)
            narrow = [(s, acc) for s, acc in zip(floats, sums, strict=True) if acc.dtype != s.dtype]
            cast = outs.take([(s.dtype, s.shape) for s, _ in narrow])
            _kernels.copy_(cast, [acc for _, acc in narrow])
            result = dict(zip((s.key for s in floats), sums, strict=True))
            result.update(zip((s.key for s, _ in narrow), cast, strict=True))
            return [result.get(s.key, maps[0].tensors[s.key]) for s in batch]

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
            budget=_budget.BUDGET // 4,  # a small staging buffer, reused: few fresh pages
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


_GERUND = {"average": "averaging", "interpolate": "interpolating"}


def check_same_inputs(
    first: Checkpoint,
    other: Checkpoint,
    verb: str = "average",
    ties: Mapping[str, tuple[str, str | None]] | None = None,
) -> None:
    """`other` holds the keys, shapes, dtypes and ties of `first` (file merges need all four).

    `verb` words the message ("average", "interpolate"); `ties` are `first`'s, if read already.
    A `CheckpointMismatchError` names the first difference and the fix.

    >>> import os, tempfile, torch
    >>> import torch_modelstate as tms
    >>> from torch_modelstate.checkpoint._files import open_checkpoint
    >>> d = tempfile.mkdtemp()
    >>> a, b = os.path.join(d, "a.safetensors"), os.path.join(d, "b.safetensors")
    >>> tms.save({"w": torch.zeros(2)}, a)
    >>> tms.save({"w": torch.zeros(3)}, b)
    >>> with open_checkpoint(a) as x, open_checkpoint(b) as y:
    ...     check_same_inputs(x, y)
    Traceback (most recent call last):
    ...
    torch_modelstate._errors.CheckpointMismatchError: ...`w` differs from ...
    """
    _check_tensors(first, other, verb)
    mine = read_entry(first).ties if ties is None else ties
    if read_entry(other).ties != mine:
        msg = (
            f"{other.path}: its ties differ from those of {first.path}; "
            f"{_GERUND.get(verb, verb)} them is ambiguous.\n"
            f"  fix: {verb} checkpoints saved with the same ties"
        )
        raise CheckpointMismatchError(msg)


def _check_tensors(first: Checkpoint, other: Checkpoint, verb: str) -> None:
    if list(other.tensors) != list(first.tensors) and set(other.tensors) != set(first.tensors):
        absent = [k for k in first.tensors if k not in other.tensors]
        extra = [k for k in other.tensors if k not in first.tensors]
        msg = (
            f"{other.path}: its keys differ from those of {first.path}.\n"
            + (f"  missing: {some(absent)}\n" if absent else "")
            + (f"  extra: {some(extra)}\n" if extra else "")
            + f"  fix: {verb} checkpoints of one architecture"
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


_SLICE = 1 << 24  # elements summed per kernel call (few calls: each one is a parallel region)


class Staging:
    """One flat buffer reused for every batch, grown when a batch needs more.

    >>> staging = Staging()
    >>> (a,) = staging.take([(torch.float32, (4,))])
    >>> (b,) = staging.take([(torch.float32, (2,))])
    >>> a.data_ptr() == b.data_ptr()
    True
    """

    def __init__(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def take(self, wanted: Sequence[tuple[torch.dtype, tuple[int, ...]]]) -> list[Tensor]:
        """Contiguous tensors of these dtypes and shapes, views of the buffer (64-byte aligned)."""
        sizes = [
            math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            for dtype, shape in wanted
        ]
        starts, end = [], 0
        for size in sizes:
            starts.append(end)
            end += -(-size // 64) * 64
        if self._buffer.numel() < end:
            self._buffer = torch.empty(end, dtype=torch.uint8)
        return [
            self._buffer[start : start + size].view(dtype).view(shape)
            for (dtype, shape), start, size in zip(wanted, starts, sizes, strict=True)
        ]


def _itemsize(dtype: torch.dtype) -> int:
    return ITEMSIZE[CODE[dtype]]


def _slices(
    sums: Sequence[Tensor], values: Sequence[Sequence[Tensor]], limit: int
) -> Iterator[tuple[list[Tensor], list[list[Tensor]]]]:
    """Groups of flat slices of `sums` (and the matching slices of each input's `values`).

    A group holds about `limit` elements: many small tensors together, a large one in pieces.
    """
    group: list[Tensor] = []
    parts: list[list[Tensor]] = [[] for _ in values]
    size = 0
    for i, acc in enumerate(sums):
        flat = acc.view(-1)
        flats = [v[i].view(-1) for v in values]
        for start in range(0, flat.numel(), limit):
            piece = flat[start : start + limit]
            group.append(piece)
            for part, f in zip(parts, flats, strict=True):
                part.append(f[start : start + limit])
            size += piece.numel()
            if size >= limit:
                yield group, parts
                group, parts, size = [], [[] for _ in values], 0
    if group:
        yield group, parts
