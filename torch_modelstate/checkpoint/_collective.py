"""Collective checkpoints of sharded models: every rank calls, one plain safetensors result.

**Save** (`save`): rank 0 of the DTensors' process group writes the checkpoint with the
ordinary writer (single file or sharded layout, atomic), asking for one tensor at a time;
for each DTensor the ranks gather that one tensor to rank 0 (``dist.gather`` into one buffer
for ``Shard(0)``, the FSDP2 layout; ``full_tensor`` otherwise), so rank 0 holds its shards plus
one full tensor and the other ranks little more than their shards. Before each gather rank 0
says "go" or "stop" (a one-element broadcast), and at the end "done" or the error it met, so
a failing write (a full disk, a directory in the way) raises the same error on every rank
instead of leaving the others waiting in a gather.

**Load** (`split_sharded`, `read_sharded`): a DTensor destination reads only the bytes of
its rank's shard: the shard of a tensor of global shape ``S`` at offset ``o`` is a set of
contiguous runs of the file's bytes (one run for ``Shard(0)``, one per row for
``Shard(1)``), read with the checkpoint's own ``preadv`` reader straight into the local
shard (or into a staging tensor of the shard's size when the dtype or device differs).

>>> _runs((4, 6), (2, 6), (2, 0))  # Shard(0): rows 2-3, one run of 12 elements from 12
[(12, 12)]
>>> _runs((4, 6), (4, 3), (0, 3))  # Shard(1): columns 3-5, one run per row
[(3, 3), (9, 3), (15, 3), (21, 3)]
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from torch_modelstate import _distributed, _kernels
from torch_modelstate.checkpoint._codec import ITEMSIZE, Spec, TensorInfo, is_plain_cpu
from torch_modelstate.checkpoint._files import Checkpoint
from torch_modelstate.checkpoint._writable import direct as is_direct
from torch_modelstate.checkpoint._writer import data_order, write_checkpoint

__all__ = ["is_collective", "read_sharded", "save", "split_sharded"]

_GO, _STOP, _DONE = 1, 2, 3


def is_collective(tensors: Sequence[Tensor]) -> bool:
    """Whether saving or loading `tensors` is collective (they hold a DTensor)."""
    return _distributed.any_dtensor(tensors)


# --------------------------------------------------------------------------- save


def save(
    path: str | os.PathLike[str],
    specs: Sequence[Spec],
    metadata: Mapping[str, str],
    tensors: Mapping[str, Tensor],
    *,
    max_shard_size: int | None,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Write `tensors` (by spec key; DTensors gathered one at a time) from rank 0.

    `group` is the ranks taking part; by default the group of the first DTensor of `tensors`
    (given when they may hold none, as the state of an optimizer that has not stepped yet).
    """
    if group is None:
        group = _distributed.dtensor_group(tensors.values())
    assert group is not None
    root = dist.get_global_rank(group, 0)
    if dist.get_rank(group) != 0:
        for spec in data_order(specs, max_shard_size):
            tensor = tensors[spec.key]
            if isinstance(tensor, DTensor):
                _expect_go(group, root)
                _gather(tensor, group, root, mine=False)  # this rank's part; rank 0 writes it
        _expect_go(group, root, final=True)
        return

    def fill(batch: Sequence[Spec]) -> list[Tensor]:
        out: list[Tensor] = []
        for spec in batch:
            tensor = tensors[spec.key]
            if isinstance(tensor, DTensor):
                _say(group, root, _GO)
                tensor = _gather(tensor, group, root, mine=True)
            if not is_plain_cpu(tensor):
                host = torch.empty(spec.shape, dtype=spec.dtype)
                _kernels.copy_([host], [tensor])
                tensor = host
            out.append(tensor)
        return out

    try:
        write_checkpoint(path, specs, metadata, fill, max_shard_size=max_shard_size, budget=0)
    except Exception as error:
        _say(group, root, _STOP, error)
        raise
    _say(group, root, _DONE)


def _gather(t: DTensor, group: dist.ProcessGroup, root: int, *, mine: bool) -> Tensor:
    """`t`'s whole value on rank 0 (`mine`); elsewhere this rank's part of the gather."""
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),) or t.ndim == 0:
        full = t.full_tensor()
        return full if mine else full[:0]
    world = dist.get_world_size(group)
    rows = t.shape[0]
    chunk = -(-rows // world)  # Shard(0) splits as torch.chunk: rank i holds rows i*chunk...
    local = _distributed.to_local(t)
    if rows == 0:
        return local
    if local.shape[0] != chunk:  # uneven (or empty) shard: pad to the chunk for the gather
        pad = local.new_zeros((chunk - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad])
    local = local.contiguous()
    if not mine:
        dist.gather(local, dst=root, group=group)
        return local
    out = torch.empty((chunk * world, *t.shape[1:]), dtype=local.dtype, device=local.device)
    parts = [out[i * chunk : (i + 1) * chunk] for i in range(world)]
    dist.gather(local, gather_list=parts, dst=root, group=group)
    return out[:rows]


def _say(group: dist.ProcessGroup, root: int, code: int, error: Exception | None = None) -> None:
    payload = b""
    if error is not None:
        args = error.args
        message = args[0] if len(args) == 1 and isinstance(args[0], str) else str(error)
        payload = json.dumps([type(error).__name__, message]).encode()
    head = torch.tensor([code, len(payload)], dtype=torch.int64)
    dist.broadcast(head, src=root, group=group)
    if payload:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        dist.broadcast(data, src=root, group=group)


def _expect_go(group: dist.ProcessGroup, root: int, *, final: bool = False) -> None:
    head = torch.zeros(2, dtype=torch.int64)
    dist.broadcast(head, src=root, group=group)
    code, size = (int(v) for v in head.tolist())
    if code == _STOP:
        data = torch.zeros(size, dtype=torch.uint8)
        dist.broadcast(data, src=root, group=group)
        name, message = json.loads(bytes(data.tolist()).decode())
        raise _distributed.rebuild(name, message)
    assert code == (_DONE if final else _GO), (code, final)


# --------------------------------------------------------------------------- load


def split_sharded(
    writes: Sequence[tuple[TensorInfo, Tensor]],
) -> tuple[list[tuple[TensorInfo, Tensor]], list[tuple[TensorInfo, DTensor]]]:
    """`writes` parted into plain destinations and DTensor ones."""
    plain: list[tuple[TensorInfo, Tensor]] = []
    sharded: list[tuple[TensorInfo, DTensor]] = []
    for info, dst in writes:
        if isinstance(dst, DTensor):
            sharded.append((info, dst))
        else:
            plain.append((info, dst))
    return plain, sharded


@torch.no_grad()
def read_sharded(ckpt: Checkpoint, writes: Sequence[tuple[TensorInfo, DTensor]]) -> None:
    """Read into each DTensor only its local shard's bytes (no communication)."""
    direct: list[tuple[TensorInfo, Tensor]] = []
    touched: list[Tensor] = []
    for info, dst in writes:
        local = _distributed.to_local(dst)
        if local.numel() == 0:
            continue
        shape, offset = compute_local_shape_and_global_offset(
            dst.shape, dst.device_mesh, dst.placements
        )
        pieces = _pieces(info, tuple(dst.shape), tuple(shape), tuple(offset))
        if is_direct(info, local):
            direct += _into(pieces, local)
            touched.append(local)
            continue
        temp = torch.empty(tuple(shape), dtype=info.torch_dtype)
        ckpt.read_into(_into(pieces, temp))
        _kernels.copy_([local], [temp])
        del temp
    ckpt.read_into(direct)
    # The bytes bypassed autograd: count the writes as copy_ would.
    torch.autograd.graph.increment_version([t for t in touched if not t.is_inference()])


def _pieces(
    info: TensorInfo, shape: tuple[int, ...], local: tuple[int, ...], offset: tuple[int, ...]
) -> list[TensorInfo]:
    size = ITEMSIZE[info.dtype]
    return [
        replace(info, start=info.start + at * size, nbytes=n * size, shape=(n,))
        for at, n in _runs(shape, local, offset)
    ]


def _into(pieces: list[TensorInfo], out: Tensor) -> list[tuple[TensorInfo, Tensor]]:
    flat = out.view(-1)
    pairs: list[tuple[TensorInfo, Tensor]] = []
    at = 0
    for piece in pieces:
        n = piece.shape[0]
        pairs.append((piece, flat[at : at + n]))
        at += n
    return pairs


def _runs(
    shape: tuple[int, ...], local: tuple[int, ...], offset: tuple[int, ...]
) -> list[tuple[int, int]]:
    """The contiguous runs ``(first element, count)`` of a row-major tensor of `shape`
    that make up the block of shape `local` at `offset`, in the block's row-major order."""
    if math.prod(local) == 0:
        return []
    if not shape:  # a scalar
        return [(0, 1)]
    partial = [d for d in range(len(shape)) if local[d] != shape[d]]
    k = partial[-1] if partial else 0
    inner = math.prod(shape[k + 1 :])
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    runs = []
    for idx in itertools.product(*(range(offset[d], offset[d] + local[d]) for d in range(k))):
        first = sum(i * s for i, s in zip(idx, strides, strict=False)) + offset[k] * inner
        runs.append((first, local[k] * inner))
    return runs
