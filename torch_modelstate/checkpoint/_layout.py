"""Where a save's files go: the shard size, the split into shards, the output path.

Without `max_shard_size`, `path` is the file to write, or an existing directory to write
``model.safetensors`` into. With it, `path` is a directory (created if needed) that
receives ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``, or a
single ``model.safetensors`` when everything fits in one shard.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from torch_modelstate.checkpoint._budget import pack
from torch_modelstate.checkpoint._codec import Spec
from torch_modelstate.checkpoint._locate import SINGLE_FILE

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
    return list(pack(specs, lambda s: s.nbytes, max_shard_size)) or [[]]


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
