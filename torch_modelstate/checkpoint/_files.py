"""Checkpoint files for reading: a path resolved to files, opened, headers checked, read.

A checkpoint is one safetensors file, or the shards that an index names. `open_checkpoint`
opens every file and checks every header before returning, and the files stay open until
`Checkpoint.close`, so the bytes read later are those of the files whose headers were
checked. Bytes are read straight into each destination tensor's memory (``preadv``, by a
few threads, as fast as copying from an mmap but with no second copy of the model and no
mmap pages counted twice).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import FileIO
from pathlib import Path
from types import TracebackType

import torch
from torch import Tensor

from torch_modelstate._errors import CheckpointCorruptError, CheckpointError
from torch_modelstate.checkpoint._codec import (
    TensorInfo,
    check_little_endian,
    parse_header,
    tensor_bytes,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_RE = re.compile(r"model-(\d{5,})-of-(\d{5,})\.safetensors")


def shard_name(i: int, n: int) -> str:
    """The file name of shard `i` (from 1) of `n`, as ``transformers`` names them."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


@dataclass(slots=True)
class Shard:
    """One safetensors file: its tensors (header order) and its ``__metadata__``."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    size: int
    handle: FileIO


@dataclass(slots=True)
class Checkpoint:
    """An open checkpoint: one file or the shards of an index, every header checked.

    The files stay open until `close` (use it as a context manager), so the bytes read
    later are those of the files whose headers were checked.
    """

    path: Path  # the file or index that was resolved
    index: Path | None
    shards: list[Shard]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, str]:
        """The first file's ``__metadata__``."""
        return self.shards[0].metadata if self.shards else {}

    def close(self) -> None:
        for shard in self.shards:
            shard.handle.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def read(self, info: TensorInfo) -> Tensor:
        """A new CPU tensor holding `info`'s data."""
        out = torch.empty(info.shape, dtype=info.torch_dtype)
        self.read_into([(info, out)])
        return out

    def read_into(self, pairs: Sequence[tuple[TensorInfo, Tensor]]) -> None:
        """Read each tensor's bytes into its `out`, a contiguous CPU tensor of exactly that size.

        Large reads are split into pieces that a few threads read with ``preadv`` at once:
        from the page cache one thread copies at about half the memory bandwidth, and
        ``preadv`` releases the GIL. Without ``preadv`` (Windows) it reads sequentially.
        """
        handles = {shard.path: shard.handle for shard in self.shards}
        pieces: list[_Piece] = []
        total = 0
        for info, out in pairs:
            view = tensor_bytes(out)
            assert len(view) == info.nbytes
            handle = handles[info.file]
            for at in range(0, info.nbytes, _PIECE):
                pieces.append((handle, info, info.start + at, view[at : at + _PIECE]))
            total += info.nbytes
        workers = min(_WORKERS, len(pieces))
        if not hasattr(os, "preadv") or workers < 2 or total < _PARALLEL_BYTES:
            for piece in pieces:
                _read_piece(piece)
            return
        queue = iter(pieces)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def work() -> None:
            while not errors:
                with lock:
                    piece = next(queue, None)
                if piece is None:
                    return
                try:
                    _read_piece(piece)
                except BaseException as err:  # re-raised in the calling thread
                    errors.append(err)

        threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def shard(self, name: str) -> Shard:
        """The open shard whose file name is `name`."""
        for shard in self.shards:
            if shard.path.name == name:
                return shard
        raise AssertionError(name)  # pragma: no cover


_Piece = tuple[FileIO, TensorInfo, int, memoryview]
_PIECE = 32 << 20  # bytes per read
_PARALLEL_BYTES = 16 << 20  # below this, threads cost more than they save
_WORKERS = min(4, os.cpu_count() or 1)


def _read_piece(piece: _Piece) -> None:
    handle, info, offset, view = piece
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(handle.fileno(), [view[done:]], offset + done)
        else:  # pragma: no cover - Windows: one thread, seek and read
            handle.seek(offset + done)
            n = handle.readinto(view[done:]) or 0
        if not n:
            msg = (
                f"{info.file}: the file ended while reading tensor `{info.key}` "
                "(it changed after it was opened)."
            )
            raise CheckpointCorruptError(msg)
        done += n


def resolve(path: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """``(file or index, index or None)`` for a file, a directory or an index path."""
    p = Path(path)
    if not p.exists():
        msg = f"No checkpoint at `{p}`: the path does not exist."
        raise FileNotFoundError(msg)
    if p.is_dir():
        single, index = p / SINGLE_FILE, p / INDEX_FILE
        if single.is_file() and index.is_file():
            msg = (
                f"{p}: the directory holds both `{SINGLE_FILE}` and `{INDEX_FILE}`; "
                "it is unclear which is the checkpoint.\n"
                "  fix: remove the stale one, or pass a file"
            )
            raise CheckpointError(msg)
        if single.is_file():
            return single, None
        if index.is_file():
            return index, index
        indexes = sorted(p.glob("*.safetensors.index.json"))
        files = sorted(p.glob("*.safetensors"))
        if len(indexes) == 1:
            return indexes[0], indexes[0]
        if not indexes and len(files) == 1:
            return files[0], None
        found = ", ".join(f.name for f in [*indexes, *files]) or "no safetensors files"
        msg = (
            f"No checkpoint in the directory `{p}`: expected `{SINGLE_FILE}` or `{INDEX_FILE}`"
            f" (found: {found}; pickle files such as pytorch_model.bin are never read)."
        )
        raise FileNotFoundError(msg)
    if p.name.endswith(".json"):
        return p, p
    return p, None


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open and check a checkpoint: a file, a directory, or an index with its shards."""
    check_little_endian()
    target, index = resolve(path)
    if index is None:
        shard = read_header(target)
        ckpt = Checkpoint(target, None, [shard], dict(shard.tensors))
        return ckpt
    weight_map = read_index(index)
    files: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        files.setdefault(name, []).append(key)
    ckpt = Checkpoint(index, index, [])
    try:
        for name, keys in files.items():
            file = index.parent / name
            if not file.is_file():
                msg = (
                    f"{index}: the index names the shard `{name}`, "
                    f"which does not exist in {index.parent}."
                )
                raise FileNotFoundError(msg)
            shard = read_header(file)
            ckpt.shards.append(shard)
            missing = [k for k in keys if k not in shard.tensors]
            if missing:
                msg = (
                    f"{index}: the index maps `{missing[0]}` to `{name}`, which has no such tensor"
                    f" ({len(missing)} keys missing from that shard)."
                )
                raise CheckpointCorruptError(msg)
            extra = [k for k in shard.tensors if weight_map.get(k) != name]
            if extra:
                msg = (
                    f"{file}: the shard holds `{extra[0]}`, "
                    f"which the index does not map to it ({index.name})."
                )
                raise CheckpointCorruptError(msg)
        for key in weight_map:
            ckpt.tensors[key] = ckpt.shard(weight_map[key]).tensors[key]
    except BaseException:
        ckpt.close()
        raise
    return ckpt


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index, checked."""
    try:
        text = index.read_text(encoding="utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        msg = f"{index}: the index is not valid JSON ({err})."
        raise CheckpointCorruptError(msg) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        msg = f'{index}: the index has no "weight_map" object mapping tensor names to shard files.'
        raise CheckpointCorruptError(msg)
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            msg = (
                f"{index}: the index maps `{key}` to {name!r}; expected the name of a shard file"
                " in the same directory."
            )
            raise CheckpointCorruptError(msg)
    return weight_map


def read_header(file: Path) -> Shard:
    """Open `file` and check its header completely; the shard keeps the file open."""
    handle = open(file, "rb", buffering=0)  # noqa: SIM115 - the shard owns it
    try:
        header = parse_header(file, handle, os.fstat(handle.fileno()).st_size)
    except BaseException:
        handle.close()
        raise
    return Shard(file, header.tensors, header.metadata, header.size, handle)
