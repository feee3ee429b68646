"""The save id: every file of one save says which save it belongs to.

A save draws a random id and writes it into the ``__metadata__`` of each file, with the
shard's position for a sharded save (``"torch_modelstate.shard": "2/3"``), and into the
index's ``metadata``. When the files under a checkpoint's fixed names come from two saves
(a save killed half-way through renaming, two writers, a reader racing a writer), their
ids differ, and the checkpoint is refused instead of loading mixed values. The shard entry
also lets a tool recognise one shard of a sharded checkpoint opened on its own.

>>> s = read_stamp(Path("m.safetensors"), stamp({"format": "pt"}, "ab12", (2, 3)))
>>> s.save_id, s.shard, s.of
('ab12', 2, 3)
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch_modelstate._errors import CheckpointCorruptError

SAVE_ID_KEY = "torch_modelstate.save_id"
SHARD_KEY = "torch_modelstate.shard"
KEYS = (SAVE_ID_KEY, SHARD_KEY)
_ID_RE = re.compile(r"[0-9a-f]{1,64}")
_SHARD_RE = re.compile(r"([1-9][0-9]{0,8})/([1-9][0-9]{0,8})")


@dataclass(frozen=True, slots=True)
class Stamp:
    """Which save a file belongs to, and which shard of it (None for a single file)."""

    save_id: str
    shard: int | None = None
    of: int | None = None


def new_save_id() -> str:
    """A fresh random save id (16 hex digits)."""
    return secrets.token_hex(8)


def stamp(
    metadata: Mapping[str, str], save_id: str, shard: tuple[int, int] | None = None
) -> dict[str, str]:
    """`metadata` with this save's id (and shard position), replacing any earlier stamp."""
    out = {k: v for k, v in metadata.items() if k not in KEYS}
    out[SAVE_ID_KEY] = save_id
    if shard is not None:
        out[SHARD_KEY] = f"{shard[0]}/{shard[1]}"
    return out


def read_stamp(file: Path, metadata: Mapping[str, object]) -> Stamp | None:
    """The stamp in `file`'s metadata; None if it has none (another tool, an older save)."""
    save_id = metadata.get(SAVE_ID_KEY)
    shard = metadata.get(SHARD_KEY)
    if save_id is None:
        if shard is not None:
            msg = f"{file}: the metadata has `{SHARD_KEY}` but no `{SAVE_ID_KEY}`."
            raise CheckpointCorruptError(msg)
        return None
    if not isinstance(save_id, str) or not _ID_RE.fullmatch(save_id):
        msg = f"{file}: the metadata's `{SAVE_ID_KEY}` is {save_id!r:.80}; expected hex digits."
        raise CheckpointCorruptError(msg)
    if shard is None:
        return Stamp(save_id)
    match = _SHARD_RE.fullmatch(shard) if isinstance(shard, str) else None
    if match is None or int(match.group(1)) > int(match.group(2)):
        msg = f"{file}: the metadata's `{SHARD_KEY}` is {shard!r:.80}; expected 'i/n', 1 <= i <= n."
        raise CheckpointCorruptError(msg)
    return Stamp(save_id, int(match.group(1)), int(match.group(2)))
