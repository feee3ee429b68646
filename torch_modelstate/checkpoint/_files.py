"""Checkpoint files for reading: opened, headers checked, from one save, read into tensors.

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
    is_plain_cpu,
    parse_header,
    tensor_bytes,
)
from torch_modelstate.checkpoint._locate import INDEX_FILE as INDEX_FILE
from torch_modelstate.checkpoint._locate import SHARD_RE as SHARD_RE
from torch_modelstate.checkpoint._locate import SINGLE_FILE as SINGLE_FILE
from torch_modelstate.checkpoint._locate import open_regular
from torch_modelstate.checkpoint._locate import resolve as resolve
from torch_modelstate.checkpoint._locate import shard_name as shard_name
from torch_modelstate.checkpoint._stamp import Stamp, read_stamp


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
        spans = []
        for info, out in pairs:
            view = tensor_bytes(out)
            assert len(view) == info.nbytes
            spans.append((handles[info.file], info, info.start, view))
        _read_spans(spans)

    def read_rows(self, info: TensorInfo, start: int, stop: int, out: Tensor) -> None:
        """Read rows ``start:stop`` (along the first dimension) of `info` into `out`.

        `out` is a contiguous CPU tensor of the file's dtype and shape
        ``(stop - start, *info.shape[1:])``; only those bytes are read (a rank loading its
        shard of a tensor reads just that).
        """
        rows = info.shape[0] if info.shape else 0
        if not 0 <= start <= stop <= rows:
            msg = f"read_rows: rows {start}:{stop} of `{info.key}`, which has {rows} rows."
            raise IndexError(msg)
        expected = (stop - start, *info.shape[1:])
        if tuple(out.shape) != expected or out.dtype != info.torch_dtype or not is_plain_cpu(out):
            msg = (
                f"read_rows: `out` must be a contiguous CPU {info.torch_dtype} tensor of shape "
                f"{expected}.\n  got: {out.dtype} {tuple(out.shape)} on {out.device}"
            )
            raise ValueError(msg)
        row = info.nbytes // rows if rows else 0
        handle = next(s.handle for s in self.shards if s.path == info.file)
        _read_spans([(handle, info, info.start + start * row, tensor_bytes(out))])

    def shard(self, name: str) -> Shard:
        """The open shard whose file name is `name`."""
        for shard in self.shards:
            if shard.path.name == name:
                return shard
        raise AssertionError(name)  # pragma: no cover


def _read_spans(spans: Sequence[tuple[FileIO, TensorInfo, int, memoryview]]) -> None:
    """Read each span's bytes from `offset` of its file into its view, by a few threads."""
    pieces: list[_Piece] = []
    total = 0
    for handle, info, offset, view in spans:
        for at in range(0, len(view), _PIECE):
            pieces.append((handle, info, offset + at, view[at : at + _PIECE]))
        total += len(view)
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


_ATTEMPTS = 3  # a reader racing a writer starts over when the index changed under it


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open and check a checkpoint: a file, a directory, or an index with its shards.

    The files of a sharded checkpoint must come from one save (`_stamp`); if they do not,
    or a shard is missing, because a writer replaced the index while it was read, it
    starts over (a few times) with the new index, else raises `CheckpointCorruptError`.
    """
    check_little_endian()
    for attempt in range(_ATTEMPTS):
        target, index = resolve(path)
        if index is None:
            shard = read_header(target)
            return Checkpoint(target, None, [shard], dict(shard.tensors))
        seen = _identity(index)
        try:
            return _open_sharded(index)
        except (FileNotFoundError, CheckpointCorruptError):
            if attempt + 1 == _ATTEMPTS or _identity(index) == seen:
                raise
    raise AssertionError  # pragma: no cover


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _open_sharded(index: Path) -> Checkpoint:
    weight_map, index_stamp = read_index_stamped(index)
    files: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        files.setdefault(name, []).append(key)
    ckpt = Checkpoint(index, index, [])
    try:
        for name, keys in files.items():
            file = index.parent / name
            if not os.path.exists(file):
                msg = (
                    f"{index}: the index names the shard `{name}`, "
                    f"which does not exist in {index.parent}."
                )
                raise FileNotFoundError(msg)
            shard = read_header(file)
            ckpt.shards.append(shard)
            missing = [k for k in keys if k not in shard.tensors]
            if missing:
                _check_one_save(index, index_stamp, ckpt.shards)
                msg = (
                    f"{index}: the index maps `{missing[0]}` to `{name}`, which has no such tensor"
                    f" ({len(missing)} keys missing from that shard)."
                )
                raise CheckpointCorruptError(msg)
            extra = [k for k in shard.tensors if weight_map.get(k) != name]
            if extra:
                _check_one_save(index, index_stamp, ckpt.shards)
                msg = (
                    f"{file}: the shard holds `{extra[0]}`, "
                    f"which the index does not map to it ({index.name})."
                )
                raise CheckpointCorruptError(msg)
        _check_one_save(index, index_stamp, ckpt.shards)
        for key in weight_map:
            ckpt.tensors[key] = ckpt.shard(weight_map[key]).tensors[key]
    except BaseException:
        ckpt.close()
        raise
    return ckpt


def _check_one_save(index: Path, index_stamp: Stamp | None, shards: Sequence[Shard]) -> None:
    """Refuse files of two saves under one index (a save interrupted, or a race)."""
    stamps = {shard.path.name: read_stamp(shard.path, shard.metadata) for shard in shards}
    ids = {name: s.save_id if s else None for name, s in stamps.items()}
    expected = index_stamp.save_id if index_stamp else next(iter(ids.values()), None)
    if expected is None and all(v is None for v in ids.values()):
        return  # written by another tool or an older version: no ids to compare
    odd = [f"{name} (save {v or 'without id'})" for name, v in ids.items() if v != expected]
    if not odd:
        return
    which = (
        f"the index is of save {expected}"
        if index_stamp
        else f"{next(iter(ids))} is of save {expected}"
    )
    msg = (
        f"{index}: the shards come from different saves: {which}, but "
        f"{', '.join(odd[:3])}{' and more' if len(odd) > 3 else ''}. A save of this checkpoint "
        "was interrupted, or ran while it was read.\n"
        "  fix: load it again once the save has finished, or save it again"
    )
    raise CheckpointCorruptError(msg)


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index, checked."""
    return read_index_stamped(index)[0]


def read_index_stamped(index: Path) -> tuple[dict[str, str], Stamp | None]:
    """The ``weight_map`` of a sharded checkpoint's index, checked, and its save stamp."""
    try:
        with open_regular(index) as handle:
            text = handle.readall().decode("utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        if isinstance(err, CheckpointError):
            raise
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
    metadata = data.get("metadata")
    index_stamp = read_stamp(index, metadata) if isinstance(metadata, dict) else None
    return weight_map, index_stamp


def read_header(file: Path) -> Shard:
    """Open `file` and check its header completely; the shard keeps the file open."""
    handle = open_regular(file)
    try:
        header = parse_header(file, handle, os.fstat(handle.fileno()).st_size)
    except BaseException:
        handle.close()
        raise
    return Shard(file, header.tensors, header.metadata, header.size, handle)
