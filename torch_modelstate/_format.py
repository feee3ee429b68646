"""Safetensors files on disk: headers checked in full, data streamed, writes atomic.

We read and write the format ourselves (it is an 8-byte little-endian header length, a
JSON header, then the tensors' bytes back to back) rather than through
``safetensors.torch``, for three reasons:

- *every check before any write*: a header is validated completely (sizes, offsets, that
  the data covers the file exactly) from an open file, so a truncated or corrupted file is
  found before the target model is touched, and the message says what is wrong;
- *one copy of the model*: bytes are read straight into each destination tensor's memory
  (``preadv``, by a few threads, as fast as copying from an mmap but with no second copy
  of the model and no mmap pages counted twice), and written straight from each tensor's
  memory, one tensor at a time;
- *crash safety*: files are written under temporary names in the target directory and
  renamed into place only when complete.

The files are plain safetensors files: ``safetensors.safe_open``, ``load_file``,
``load_model`` and ``transformers`` read them. Tensors are laid out by decreasing element
size, as safetensors does, so every tensor's data is aligned to its element size.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import secrets
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from io import FileIO
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import torch
from torch import Tensor

from torch_modelstate._errors import CheckpointCorruptError, CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-(\d{5,})-of-(\d{5,})\.safetensors")
_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces

# safetensors dtype codes: element size, and the torch dtype where this torch has it.
ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64",
    "U64": "uint64", "F64": "float64", "C64": "complex64",
}  # fmt: skip
TORCH_DTYPE: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _TORCH_NAMES.items() if hasattr(torch, name)
}
CODE: dict[torch.dtype, str] = {dtype: code for code, dtype in TORCH_DTYPE.items()}


def dtype_name(code: str) -> str:
    """The torch name of a safetensors dtype code (``"BF16" -> "bfloat16"``)."""
    return _TORCH_NAMES.get(code, code)


def _check_little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
        msg = "torch_modelstate reads and writes safetensors files on little-endian machines only."
        raise NotImplementedError(msg)


def tensor_bytes(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (writable: reads land in `t`).

    The caller keeps `t` alive while the view is used.
    """
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lies in a checkpoint: its file, offset, dtype code and shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first data byte in `file`
    nbytes: int
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = TORCH_DTYPE.get(self.dtype)
        if dtype is None:
            msg = (
                f"{self.file}: tensor `{self.key}` has dtype {self.dtype}, which this torch "
                f"({torch.__version__}) does not have.\n  fix: upgrade torch"
            )
            raise CheckpointError(msg)
        return dtype


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
    _check_little_endian()
    target, index = resolve(path)
    if index is None:
        shard = read_header(target)
        ckpt = Checkpoint(target, None, [shard], dict(shard.tensors))
        return ckpt
    weight_map = _read_index(index)
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


def _read_index(index: Path) -> dict[str, str]:
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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            msg = f"the key {key!r} appears twice"
            raise ValueError(msg)
        out[key] = value
    return out


def read_header(file: Path) -> Shard:
    """Open `file` and check its header completely; the shard keeps the file open."""
    handle = open(file, "rb", buffering=0)  # noqa: SIM115 - the shard owns it
    try:
        return _parse(file, handle)
    except BaseException:
        handle.close()
        raise


def _corrupt(file: Path, problem: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{file}: {problem}")


def _parse(file: Path, handle: FileIO) -> Shard:
    size = os.fstat(handle.fileno()).st_size
    if size == 0:
        raise _corrupt(file, "the file is empty (0 bytes); expected a safetensors file.")
    if size < 8:
        raise _corrupt(
            file, f"the file is truncated: {size} bytes, less than the 8-byte header length."
        )
    n = int.from_bytes(_read_exact(handle, 8), "little")
    if n > size - 8:
        problem = (
            f"the header length field says {n} bytes, but only {size - 8} bytes follow it: "
            "the file is truncated or not a safetensors file."
        )
        raise _corrupt(file, problem)
    if n > _MAX_HEADER:
        raise _corrupt(file, f"the header length {n} exceeds the 100 MB limit of the format.")
    if n < 2:
        raise _corrupt(file, f"the header is {n} bytes long, too small to hold a JSON object.")
    raw = _read_exact(handle, n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _corrupt(file, f"the header is not valid JSON ({err}).") from None
    if not isinstance(header, dict):
        raise _corrupt(file, f"the header is JSON but not an object (got {type(header).__name__}).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(file, "the header's __metadata__ must map strings to strings.")
    base = 8 + n
    data_len = size - base
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        info, begin, end = _entry(file, key, entry, base)
        tensors[key] = info
        spans.append((begin, end, key))
    spans.sort()
    end_of_data = spans[-1][1] if spans else 0
    if end_of_data > data_len:
        problem = (
            f"the file is truncated: the header describes {end_of_data} bytes of tensor data, "
            f"but {data_len} bytes follow the header."
        )
        raise _corrupt(file, problem)
    expected = 0
    for begin, end, key in spans:
        if begin != expected:
            problem = (
                f"tensor `{key}` starts at data byte {begin}, expected {expected}: "
                "the tensors' data must be packed back to back (the header is corrupted)."
            )
            raise _corrupt(file, problem)
        expected = end
    if end_of_data < data_len:
        problem = (
            f"{data_len - end_of_data} bytes follow the last tensor's data: the header does not "
            "cover the whole file (it is corrupted, or the file was appended to)."
        )
        raise _corrupt(file, problem)
    return Shard(file, tensors, dict(metadata), size, handle)


def _entry(file: Path, key: str, entry: object, base: int) -> tuple[TensorInfo, int, int]:
    if not isinstance(entry, dict):
        raise _corrupt(file, f"the header entry for `{key}` is not an object.")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in ITEMSIZE:
        known = ", ".join(ITEMSIZE)
        raise _corrupt(
            file, f"tensor `{key}` has the unsupported dtype {code!r} (supported: {known})."
        )
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
        raise _corrupt(file, f"tensor `{key}` has the invalid shape {shape!r}.")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(file, f"tensor `{key}` has the invalid data_offsets {offsets!r}.")
    begin, end = offsets
    nbytes = math.prod(shape) * ITEMSIZE[code]
    if end - begin != nbytes:
        problem = (
            f"tensor `{key}` ({code}, shape {tuple(shape)}) needs {nbytes} bytes, "
            f"but its data_offsets span {end - begin}."
        )
        raise _corrupt(file, problem)
    return TensorInfo(key, code, tuple(shape), base + begin, nbytes, file), begin, end


def _read_exact(handle: FileIO, n: int) -> bytes:
    buffer = bytearray(n)
    view = memoryview(buffer)
    done = 0
    while done < n:
        got = handle.readinto(view[done:])
        if not got:
            break
        done += got
    return bytes(view[:done])


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True, slots=True)
class Spec:
    """A tensor to write: its key, torch dtype and shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[CODE[self.dtype]]


# Called with a batch of specs (at most about `budget` bytes, or one larger tensor), returns
# contiguous CPU tensors with those dtypes and shapes, in the same order.
Fill = Callable[[Sequence[Spec]], Sequence[Tensor]]
Progress = Callable[[int], None]


_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"`` (10**9), ``"500MB"`` or ``"1GiB"`` (2**30).

    >>> parse_size("5GB"), parse_size("1GiB"), parse_size(1000)
    (5000000000, 1073741824, 1000)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        msg = (
            '`max_shard_size` must be a number of bytes or a string such as "5GB".\n'
            f"  got: {size!r}"
        )
        raise TypeError(msg)
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE_RE.fullmatch(size)
        unit = _UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None:
            msg = (
                f"`max_shard_size` {size!r} is not a size.\n"
                '  expected: bytes, or a number with a unit: "500MB", "5GB" (powers of 1000), '
                '"1GiB" (powers of 1024)'
            )
            raise ValueError(msg)
        value = int(float(match.group(1)) * unit)
    if value <= 0:
        msg = f"`max_shard_size` must be positive.\n  got: {size!r}"
        raise ValueError(msg)
    return value


def plan_shards(specs: Sequence[Spec], max_shard_size: int | None) -> list[list[Spec]]:
    """Split `specs` in order into shards of at most `max_shard_size` bytes.

    A tensor larger than the limit gets a shard of its own (as in transformers).
    """
    if max_shard_size is None:
        return [list(specs)]
    shards: list[list[Spec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def output_layout(path: str | os.PathLike[str], sharded: bool) -> tuple[Path, Path]:
    """``(directory, single-file path)`` for a save to `path`.

    Without sharding `path` is the file to write, or a directory to write
    ``model.safetensors`` into. With sharding `path` is a directory (created if needed).
    """
    p = Path(path)
    if str(path).endswith(("/", os.sep)):  # "out/" names a directory, even a new one
        p.mkdir(parents=True, exist_ok=True)
    if not sharded:
        if p.is_dir():
            return p, p / SINGLE_FILE
        if not p.parent.is_dir():
            msg = f"Cannot write `{p}`: the directory `{p.parent}` does not exist."
            raise FileNotFoundError(msg)
        return p.parent, p
    if p.exists() and not p.is_dir():
        msg = (
            "With `max_shard_size`, `path` is the directory to write the shards into; "
            f"`{p}` is a file.\n"
            "  fix: pass a directory"
        )
        raise ValueError(msg)
    if not p.exists() and p.suffix == ".safetensors":
        msg = (
            "With `max_shard_size`, `path` is the directory to write the shards into, "
            "not a file name.\n"
            f"  got: {str(p)!r}\n  fix: pass a directory such as {str(p.with_suffix(''))!r}"
        )
        raise ValueError(msg)
    p.mkdir(parents=True, exist_ok=True)
    return p, p / SINGLE_FILE


def write_checkpoint(
    path: str | os.PathLike[str],
    specs: Sequence[Spec],
    metadata: Mapping[str, str],
    fill: Fill,
    *,
    max_shard_size: int | None,
    budget: int,
    progress: Progress | None = None,
) -> Path:
    """Write `specs` (their data from `fill`) as one file or as shards with an index.

    Every file is written under a temporary name in the target directory and synced, and
    only then renamed into place; for shards the index is renamed last. A failure at any
    point removes the temporary files and leaves what was under the final names as it
    was. Returns the file or index written.
    """
    _check_little_endian()
    directory, single = output_layout(path, max_shard_size is not None)
    groups = plan_shards(specs, max_shard_size)
    sharded = len(groups) > 1
    finals = (
        [directory / shard_name(i + 1, len(groups)) for i in range(len(groups))]
        if sharded
        else [single]
    )
    temps: list[Path] = []
    try:
        for group, final in zip(groups, finals, strict=True):
            temps.append(_temp_name(final))
            _write_file(temps[-1], group, metadata, fill, budget, progress)
        if sharded:
            index = directory / INDEX_FILE
            weight_map = {
                spec.key: final.name
                for group, final in zip(groups, finals, strict=True)
                for spec in group
            }
            body = {
                "metadata": {"total_size": sum(s.nbytes for s in specs)},
                "weight_map": weight_map,
            }
            temps.append(_temp_name(index))
            _write_bytes(temps[-1], (json.dumps(body, indent=2) + "\n").encode())
            finals = [*finals, index]
            # Retire the old checkpoint's entry points first: a crash while renaming leaves
            # no index (an error on load), never an old index over a mix of shards.
            _remove(directory / INDEX_FILE, directory / SINGLE_FILE)
        elif single.name == SINGLE_FILE:
            _remove(directory / INDEX_FILE)
        for temp, final in zip(temps, finals, strict=True):
            os.replace(temp, final)
        temps = []
        _sync_directory(directory)
    finally:
        _remove(*temps)
    if sharded or single.name == SINGLE_FILE:
        keep = {f.name for f in finals}
        _remove(
            *(f for f in directory.iterdir() if _SHARD_RE.fullmatch(f.name) and f.name not in keep)
        )
    return finals[-1]


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")


def _open_new(path: Path) -> BinaryIO:
    # O_EXCL on a fresh random name; mode 0o666 so the umask applies as for any new file.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return open(fd, "wb", buffering=1 << 20)


def _write_bytes(path: Path, data: bytes) -> None:
    with _open_new(path) as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def header_bytes(specs: Sequence[Spec], metadata: Mapping[str, str]) -> tuple[bytes, list[Spec]]:
    """The encoded header (length prefix included) and the order the data must follow."""
    # Largest elements first, so every tensor starts aligned to its element size; the sort
    # is stable, so tensors of one size keep their order (sequential reads on load).
    order = sorted(specs, key=lambda s: -ITEMSIZE[CODE[s.dtype]])
    offsets: dict[str, list[int]] = {}
    position = 0
    for spec in order:
        offsets[spec.key] = [position, position + spec.nbytes]
        position += spec.nbytes
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    for spec in specs:
        header[spec.key] = {
            "dtype": CODE[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": offsets[spec.key],
        }
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text, order


def _write_file(
    path: Path,
    specs: Sequence[Spec],
    metadata: Mapping[str, str],
    fill: Fill,
    budget: int,
    progress: Progress | None,
) -> None:
    header, order = header_bytes(specs, metadata)
    with _open_new(path) as out:
        out.write(header)
        for batch in _batches(order, budget):
            tensors = fill(batch)
            for spec, tensor in zip(batch, tensors, strict=True):
                assert tensor.dtype == spec.dtype and tuple(tensor.shape) == spec.shape
                assert tensor.device.type == "cpu" and tensor.is_contiguous()
                out.write(tensor_bytes(tensor))
            del tensors
            if progress is not None:
                progress(sum(spec.nbytes for spec in batch))
        out.flush()
        os.fsync(out.fileno())


def _batches(specs: Iterable[Spec], budget: int) -> Iterable[list[Spec]]:
    batch: list[Spec] = []
    used = 0
    for spec in specs:
        if batch and used + spec.nbytes > budget:
            yield batch
            batch, used = [], 0
        batch.append(spec)
        used += spec.nbytes
    if batch:
        yield batch


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _sync_directory(directory: Path) -> None:
    # Make the renames durable; directories cannot be opened for syncing on Windows.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
