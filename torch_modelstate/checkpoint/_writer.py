"""Writing a checkpoint atomically: temporary files, fsync, rename into place.

Every file is written under a temporary name in the target directory and synced, and
only then renamed into place; for shards the index is renamed last. Tensors are written
one at a time, straight from each tensor's memory; their data comes from a `Fill`
callback, a batch of at most a byte budget at a time, so a caller never holds more than
that in staging copies.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from torch import Tensor

from torch_modelstate.checkpoint._budget import pack
from torch_modelstate.checkpoint._codec import Spec, check_little_endian, header_bytes, tensor_bytes
from torch_modelstate.checkpoint._files import INDEX_FILE, SHARD_RE, SINGLE_FILE, shard_name
from torch_modelstate.checkpoint._layout import output_layout, plan_shards

# Called with a batch of specs (at most about `budget` bytes, or one larger tensor), returns
# contiguous CPU tensors with those dtypes and shapes, in the same order.
Fill = Callable[[Sequence[Spec]], Sequence[Tensor]]
Progress = Callable[[int], None]


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
    check_little_endian()
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
            *(f for f in directory.iterdir() if SHARD_RE.fullmatch(f.name) and f.name not in keep)
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
        for batch in pack(order, lambda s: s.nbytes, budget):
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
