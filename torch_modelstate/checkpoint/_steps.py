"""The one seam through which every file-system step of a save or a load goes.

`step(name, path)` is called right before each step that changes or opens a file: a
save's ``"lock"``, ``"create"`` (a temporary file), ``"fsync"``, ``"rename"`` (into its
final name), ``"unlink"`` and ``"syncdir"``; a load's ``"open"``. It does nothing; tests
replace it to kill a save before step *k*, to pause a writer between two steps while a
reader or a second writer runs, or to record the order of the steps.

>>> from pathlib import Path
>>> step("rename", Path("model.safetensors")) is None
True
"""

from __future__ import annotations

from pathlib import Path


def step(name: str, path: Path) -> None:
    """Called before each file-system step `name` on `path` (a no-op; tests replace it)."""
