"""Writing a checkpoint so that a crash, a failure or a second writer never costs the last one.

A save runs in three stages:

1. *Check* what it can see before changing anything: no directory in the way of a name it
   will write or remove, and enough free space for every byte it will write. A failure
   here names the file and leaves the directory as it was.
2. *Write* every file under a temporary name in the target directory (``.NAME.<hex>.tmp``)
   and fsync it. Every file carries the save's id (`_stamp`), the index too. A failure
   removes the temporary files: the final names are untouched.
3. *Commit*: rename the files into place, the index last, then retire what the previous
   layout left (``model.safetensors`` after a sharded save, the index and stale shards
   after a single-file save into a directory).

Under a kill at any moment the final names hold the previous checkpoint or the new one,
except where the fixed names make that impossible: re-saving the same sharded layout
(``model-00002-of-00003`` renamed over its predecessor before the index) and the instant
between the two entry points of a layout change (index and ``model.safetensors`` both
present). There `open_checkpoint` sees files of two saves and raises
`CheckpointCorruptError`; nothing mixed ever loads. Writers to one target take an
exclusive advisory lock (``fcntl.flock``) on ``.NAME.lock`` beside it, so concurrent saves
run one after the other; the lock file exists only while a save runs (or after a
killed one, until the next save of that target).

Tensors are written one at a time straight from each tensor's memory; their data comes
from a `Fill` callback a batch at a time (``budget=0``: one tensor per call, in the order
`data_order` gives), so a caller never holds more than a batch in staging copies.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from torch import Tensor

from torch_modelstate.checkpoint import _steps
from torch_modelstate.checkpoint._budget import pack
from torch_modelstate.checkpoint._codec import Spec, check_little_endian, header_bytes, tensor_bytes
from torch_modelstate.checkpoint._layout import output_layout, plan_shards
from torch_modelstate.checkpoint._locate import INDEX_FILE, SHARD_RE, SINGLE_FILE, shard_name
from torch_modelstate.checkpoint._stamp import SAVE_ID_KEY, new_save_id, stamp

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, writers are not serialised
    fcntl = None  # type: ignore[assignment]

# Called with a batch of specs (at most about `budget` bytes, or one larger tensor), returns
# contiguous CPU tensors with those dtypes and shapes, in the same order.
Fill = Callable[[Sequence[Spec]], Sequence[Tensor]]
Progress = Callable[[int], None]

_TEMP_RE = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp")
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def data_order(specs: Sequence[Spec], max_shard_size: int | None) -> list[Spec]:
    """The order in which `write_checkpoint` asks `fill` for the tensors' data."""
    return [s for group in plan_shards(specs, max_shard_size) for s in header_bytes(group, {})[1]]


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

    See the module docs for what holds under failures, kills and concurrent writers.
    Returns the file or index written.
    """
    check_little_endian()
    directory, single = output_layout(path, max_shard_size is not None)
    groups = plan_shards(specs, max_shard_size)
    n = len(groups)
    save_id = new_save_id()
    if n > 1:
        finals = [directory / shard_name(i + 1, n) for i in range(n)]
        metas = [stamp(metadata, save_id, (i + 1, n)) for i in range(n)]
        weight_map = {s.key: f.name for g, f in zip(groups, finals, strict=True) for s in g}
        total = sum(s.nbytes for s in specs)
        body = {"metadata": {"total_size": total, SAVE_ID_KEY: save_id}, "weight_map": weight_map}
        index: tuple[Path, bytes] | None = (
            directory / INDEX_FILE,
            (json.dumps(body, indent=2) + "\n").encode(),
        )
    else:
        finals, metas, index = [single], [stamp(metadata, save_id)], None
    replaces_layout = n > 1 or single.name == SINGLE_FILE  # the directory's checkpoint
    retire = []
    if n > 1:
        retire = [directory / SINGLE_FILE]
    elif replaces_layout:
        retire = [directory / INDEX_FILE]
    headers = [header_bytes(g, m) for g, m in zip(groups, metas, strict=True)]
    needed = sum(len(h) + sum(s.nbytes for s in order) for h, order in headers)
    needed += len(index[1]) if index else 0
    lock = directory / f".{single.name}.lock"
    in_the_way = [*finals, *([index[0]] if index else []), *retire, lock]
    _preflight(directory, in_the_way, needed)
    with _locked(lock):
        _preflight(directory, in_the_way, needed)  # again: another writer may have run
        temps: list[Path] = []
        try:
            for (header, order), final in zip(headers, finals, strict=True):
                temps.append(_temp_name(final))
                _named(final, _write_file, temps[-1], header, order, fill, budget, progress)
            if index is not None:
                temps.append(_temp_name(index[0]))
                _named(index[0], _write_bytes, temps[-1], index[1])
            for temp, final in zip(temps[: len(finals)], finals, strict=True):
                _rename(temp, final)
            if index is not None:
                _sync_directory(directory)  # the shards are durable before the index names them
                _rename(temps[-1], index[0])
            temps = []
        finally:
            _remove(*temps)
        written = index[0] if index is not None else single
        _remove(*retire)
        if replaces_layout:
            keep = {f.name for f in finals}
            _remove(*(f for f in _listdir(directory) if _stale(f, keep)))
        _remove(*(f for f in _listdir(directory) if _orphan_temp(f, single, replaces_layout)))
        _sync_directory(directory)
    return written


def _preflight(directory: Path, names: Sequence[Path], needed: int) -> None:
    """Fail before any change where the save would: a directory in the way, no space."""
    for name in names:
        try:
            mode = os.stat(name).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(mode):
            msg = (
                f"Cannot write the checkpoint file `{name}`: a directory of that name is in the "
                "way (nothing was changed).\n  fix: remove or rename the directory, or save "
                "elsewhere"
            )
            raise IsADirectoryError(errno.EISDIR, msg, str(name))
    if not hasattr(os, "statvfs"):  # pragma: no cover - Windows
        return
    fs = os.statvfs(directory)
    free = fs.f_bavail * fs.f_frsize
    if free < needed:
        msg = (
            f"No space left on device for the checkpoint in `{directory}`: the save writes "
            f"{needed} bytes, {free} are free (nothing was changed).\n"
            "  fix: free some space, or save elsewhere"
        )
        raise OSError(errno.ENOSPC, msg, str(directory))


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """Hold the exclusive advisory lock of the checkpoint whose lock file is `lock`.

    The holder removes the lock file before releasing it, so no lock file outlives a save
    (a killed save leaves one, which the next save takes over). A writer that was waiting
    on the removed file finds, once it holds the lock, that the name no longer refers to
    its file, and starts over with the current one: only the holder of the file under the
    name holds the lock.
    """
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    while True:
        _steps.step("lock", lock)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                now = os.stat(lock)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # the previous holder removed this file: lock the current one
    try:
        yield
    finally:
        try:
            _steps.step("unlock", lock)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def _named(final: Path, write: Callable[..., None], *args: object) -> None:
    """Run `write`; a full disk names the checkpoint file, not only the temporary one."""
    try:
        write(*args)
    except OSError as err:
        if err.errno not in _NO_SPACE:
            raise
        msg = (
            f"No space left on device while writing the checkpoint file `{final}` "
            "(its temporary file is removed; the previous checkpoint is unchanged).\n"
            "  fix: free some space, or save elsewhere"
        )
        raise OSError(err.errno, msg, str(final)) from err


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")


def _open_new(path: Path) -> BinaryIO:
    _steps.step("create", path)
    # O_EXCL on a fresh random name; mode 0o666 so the umask applies as for any new file.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return open(fd, "wb", buffering=1 << 20)


def _fsync(out: BinaryIO, path: Path) -> None:
    out.flush()
    _steps.step("fsync", path)
    os.fsync(out.fileno())


def _write_bytes(path: Path, data: bytes) -> None:
    with _open_new(path) as out:
        out.write(data)
        _fsync(out, path)


def _write_file(
    path: Path,
    header: bytes,
    order: Sequence[Spec],
    fill: Fill,
    budget: int,
    progress: Progress | None,
) -> None:
    """Write one file: its encoded `header`, then the data of `order` (`header_bytes`)."""
    with _open_new(path) as out:
        out.write(header)
        for batch in pack(order, lambda s: s.nbytes, budget):
            tensors = fill(batch)
            for spec, tensor in zip(batch, tensors, strict=True):
                assert tensor.dtype == spec.dtype and tuple(tensor.shape) == spec.shape
                assert tensor.device.type == "cpu" and tensor.is_contiguous()
                out.write(tensor_bytes(tensor))
            # Drop the loop variable too: it would keep the batch's last tensor (for a
            # collective save, a whole gathered tensor) alive while `fill` makes the next.
            del tensors
            if batch:
                del tensor
            if progress is not None:
                progress(sum(spec.nbytes for spec in batch))
        _fsync(out, path)


def _rename(temp: Path, final: Path) -> None:
    _steps.step("rename", final)
    os.replace(temp, final)


def _remove(*paths: Path) -> None:
    for p in paths:
        if os.path.lexists(p):
            _steps.step("unlink", p)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _listdir(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def _stale(file: Path, keep: set[str]) -> bool:
    """A shard of an earlier layout (a regular file or link; a directory is left alone)."""
    return bool(SHARD_RE.fullmatch(file.name)) and file.name not in keep and not file.is_dir()


def _orphan_temp(file: Path, single: Path, replaces_layout: bool) -> bool:
    """A temporary file that a killed save of this checkpoint left (we hold its lock)."""
    match = _TEMP_RE.fullmatch(file.name)
    if match is None or file.is_dir():
        return False
    name = match.group(1)
    if name == single.name:
        return True
    return replaces_layout and (name == INDEX_FILE or bool(SHARD_RE.fullmatch(name)))


def _sync_directory(directory: Path) -> None:
    # Make the renames durable; directories cannot be opened for syncing on Windows.
    _steps.step("syncdir", directory)
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
