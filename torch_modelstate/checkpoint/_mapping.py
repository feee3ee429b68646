"""Checkpoint files mapped copy-on-write: tensors that are views of the page cache.

``mmap.ACCESS_COPY`` (a private mapping, as ``safetensors.torch.load_file`` makes) costs
nothing until a page is used; a write lands in a private copy of its page and never reaches
the file; each tensor keeps its file's mapping alive (the mapping outlives the open file,
and on POSIX the file itself). A tensor whose data does not start at a multiple of its
element size (only in files written by other tools) is read into fresh memory instead.
`release` gives pages that were only read back to the page cache (``MADV_DONTNEED``), so a
pass over a large file does not grow the process's resident memory.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from torch_modelstate.checkpoint._codec import ITEMSIZE, TensorInfo
from torch_modelstate.checkpoint._files import Checkpoint

_PAGE = mmap.PAGESIZE


@dataclass
class Mapped:
    """The tensors of a checkpoint as views of its files' mappings."""

    tensors: dict[str, Tensor]
    maps: dict[Path, mmap.mmap]

    def release(self, infos: Iterable[TensorInfo]) -> None:
        """Drop the pages of `infos` from this process (they stay in the page cache).

        Only for tensors that were read, never written: a written private page would
        revert to the file's bytes.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):  # pragma: no cover - Windows
            return
        for info in infos:
            m = self.maps.get(info.file)
            if m is None or not info.nbytes:
                continue
            lo = info.start // _PAGE * _PAGE
            hi = min(len(m), -(-(info.start + info.nbytes) // _PAGE) * _PAGE)
            m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def map_checkpoint(ckpt: Checkpoint, tensors: Mapping[str, TensorInfo] | None = None) -> Mapped:
    """Every tensor of `tensors` (default: all of `ckpt`'s) as a view of its file's mapping."""
    chosen = ckpt.tensors if tensors is None else tensors
    maps: dict[Path, mmap.mmap] = {}
    for shard in ckpt.shards:
        if shard.size:
            # The shard's handle is the file whose header was checked; mmap keeps its own
            # duplicate of the descriptor, so the mapping outlives the handle.
            maps[shard.path] = mmap.mmap(shard.handle.fileno(), 0, access=mmap.ACCESS_COPY)
    out: dict[str, Tensor] = {}
    unaligned: list[tuple[TensorInfo, Tensor]] = []
    for key, info in chosen.items():
        dtype = info.torch_dtype
        if info.nbytes == 0 or info.start % ITEMSIZE[info.dtype]:
            out[key] = torch.empty(info.shape, dtype=dtype)
            if info.nbytes:
                unaligned.append((info, out[key]))
            continue
        raw = torch.frombuffer(
            maps[info.file], dtype=torch.uint8, count=info.nbytes, offset=info.start
        )
        out[key] = raw.view(dtype).view(info.shape)
    ckpt.read_into(unaligned)
    return Mapped(out, maps)
