"""Where a checkpoint's files are: fixed names, a path resolved to files, safe opening.

Only regular files (or symbolic links to them, as the Hugging Face cache uses) are ever
opened: a FIFO, socket or device under a checkpoint's name is refused before it is
opened, so a hostile directory cannot make a load hang.
"""

from __future__ import annotations

import os
import re
import stat
from io import FileIO
from pathlib import Path

from torch_modelstate._errors import CheckpointCorruptError
from torch_modelstate.checkpoint import _steps

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_RE = re.compile(r"model-(\d{5,})-of-(\d{5,})\.safetensors")


def shard_name(i: int, n: int) -> str:
    """The file name of shard `i` (from 1) of `n`, as ``transformers`` names them."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _file_type(path: Path) -> str | None:
    """None for a regular file (or a link to one), else what `path` is; raises if missing."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def _refuse(path: Path, what: str) -> CheckpointCorruptError:
    msg = (
        f"{path}: it is {what}, not a regular file; checkpoints are read only from regular "
        "files (or symbolic links to them), so it was not opened.\n"
        "  fix: point to the checkpoint's file or directory"
    )
    return CheckpointCorruptError(msg)


def open_regular(path: Path) -> FileIO:
    """Open `path` for reading if it is a regular file (or a link to one), without blocking.

    A FIFO, socket or device is refused before it is opened (opening a FIFO blocks until a
    writer appears), and checked again on the open descriptor in case the name changed.
    """
    _steps.step("open", path)
    what = _file_type(path)
    if what is not None:
        raise _refuse(path, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refuse(path, "not a regular file")
    return open(fd, "rb", buffering=0)


def resolve(path: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """``(file or index, index or None)`` for a file, a directory or an index path."""
    p = Path(path)
    if not p.exists():
        msg = f"No checkpoint at `{p}`: the path does not exist."
        raise FileNotFoundError(msg)
    if p.is_dir():
        single, index = p / SINGLE_FILE, p / INDEX_FILE
        for entry in (single, index):
            what = _file_type(entry) if entry.exists() else None
            if what is not None:
                raise _refuse(entry, what)
        if single.exists() and index.exists():
            msg = (
                f"{p}: the directory holds both `{SINGLE_FILE}` and `{INDEX_FILE}`; "
                "it is unclear which is the checkpoint (a save that changed the layout was "
                "interrupted, or two tools wrote here).\n"
                "  fix: save again, or remove the stale one, or pass a file"
            )
            raise CheckpointCorruptError(msg)
        if single.exists():
            return single, None
        if index.exists():
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
