"""The safetensors codec: dtype tables, a header checked in full, a header encoded.

The format is an 8-byte little-endian header length, a JSON header, then the tensors'
bytes back to back. We read and write it ourselves rather than through
``safetensors.torch`` so that a header is validated completely (sizes, offsets, that the
data covers the file exactly) before anything is read or written, and the message says
what is wrong and in which file. Tensors are laid out by decreasing element size, as
safetensors does, so every tensor's data is aligned to its element size.
"""

from __future__ import annotations

import ctypes
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import FileIO
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torch_modelstate._errors import CheckpointCorruptError, CheckpointError

MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
MAX_RANK = 64  # dimensions of one tensor; more is a crafted header, not a model
_MAX_BYTES = 2**63 - 1  # sizes, strides and offsets are 64-bit signed in torch

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
    """The torch name of a safetensors dtype code.

    >>> dtype_name("BF16")
    'bfloat16'
    """
    return _TORCH_NAMES.get(code, code)


def check_little_endian() -> None:
    """Refuse big-endian machines: the format stores little-endian bytes."""
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


def is_plain_cpu(t: Tensor) -> bool:
    """Whether `t`'s memory holds exactly its values, so it can be read or written as bytes."""
    return (
        t.device.type == "cpu"
        and type(t) in (Tensor, nn.Parameter)
        and t.layout == torch.strided
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
    )


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


@dataclass(frozen=True, slots=True)
class Header:
    """A checked header: the tensors (header order), the ``__metadata__``, the file size."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    size: int


def corrupt(file: Path, problem: str) -> CheckpointCorruptError:
    """The error for a damaged `file`."""
    return CheckpointCorruptError(f"{file}: {problem}")


def parse_header(file: Path, handle: FileIO, size: int) -> Header:
    """Read and check the header of the open `file` of `size` bytes, completely."""
    if size == 0:
        raise corrupt(file, "the file is empty (0 bytes); expected a safetensors file.")
    if size < 8:
        raise corrupt(
            file, f"the file is truncated: {size} bytes, less than the 8-byte header length."
        )
    n = int.from_bytes(read_exact(handle, 8), "little")
    if n > size - 8:
        problem = (
            f"the header length field says {n} bytes, but only {size - 8} bytes follow it: "
            "the file is truncated or not a safetensors file."
        )
        raise corrupt(file, problem)
    if n > MAX_HEADER:
        raise corrupt(file, f"the header length {n} exceeds the 100 MB limit of the format.")
    if n < 2:
        raise corrupt(file, f"the header is {n} bytes long, too small to hold a JSON object.")
    raw = read_exact(handle, n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise corrupt(file, f"the header is not valid JSON ({err}).") from None
    if not isinstance(header, dict):
        raise corrupt(file, f"the header is JSON but not an object (got {type(header).__name__}).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt(file, "the header's __metadata__ must map strings to strings.")
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
        raise corrupt(file, problem)
    expected = 0
    for begin, end, key in spans:
        if begin != expected:
            problem = (
                f"tensor `{key}` starts at data byte {begin}, expected {expected}: "
                "the tensors' data must be packed back to back (the header is corrupted)."
            )
            raise corrupt(file, problem)
        expected = end
    if end_of_data < data_len:
        problem = (
            f"{data_len - end_of_data} bytes follow the last tensor's data: the header does not "
            "cover the whole file (it is corrupted, or the file was appended to)."
        )
        raise corrupt(file, problem)
    return Header(tensors, dict(metadata), size)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            msg = f"the key {key!r} appears twice"
            raise ValueError(msg)
        out[key] = value
    return out


def _entry(file: Path, key: str, entry: object, base: int) -> tuple[TensorInfo, int, int]:
    if not isinstance(entry, dict):
        raise corrupt(file, f"the header entry for `{key}` is not an object.")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in ITEMSIZE:
        known = ", ".join(ITEMSIZE)
        raise corrupt(
            file, f"tensor `{key}` has the unsupported dtype {code!r} (supported: {known})."
        )
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        rank = f" ({len(shape)} dimensions, at most {MAX_RANK})" if isinstance(shape, list) else ""
        raise corrupt(file, f"tensor `{key}` has the invalid shape {_short(shape)}{rank}.")
    # Bounded before any arithmetic: every dimension, and the product of the non-zero
    # ones (so that strides and byte counts fit in 64 bits even for an empty tensor).
    extent = 1
    for d in shape:
        if type(d) is not int or not 0 <= d <= _MAX_BYTES:
            raise corrupt(file, f"tensor `{key}` has the invalid shape {_short(shape)}.")
        extent *= max(d, 1)
        if extent * ITEMSIZE[code] > _MAX_BYTES:
            problem = f"tensor `{key}` has the shape {_short(shape)}, whose size overflows 64 bits."
            raise corrupt(file, problem)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= _MAX_BYTES
    ):
        raise corrupt(file, f"tensor `{key}` has the invalid data_offsets {_short(offsets)}.")
    begin, end = offsets
    nbytes = math.prod(shape) * ITEMSIZE[code]
    if end - begin != nbytes:
        problem = (
            f"tensor `{key}` ({code}, shape {_short(shape)}) needs {nbytes} bytes, "
            f"but its data_offsets span {end - begin}."
        )
        raise corrupt(file, problem)
    return TensorInfo(key, code, tuple(shape), base + begin, nbytes, file), begin, end


def _short(value: object, limit: int = 80) -> str:
    """`value`'s repr, cut to `limit` characters (a crafted header can hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-1]}"


def read_exact(handle: FileIO, n: int) -> bytes:
    """Up to `n` bytes from `handle` (fewer only at the end of the file)."""
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
