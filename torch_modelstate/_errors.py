"""Exceptions: each subclasses the builtin a caller would catch."""

from __future__ import annotations


class KeyNotFoundError(KeyError):
    """A key that the model does not have. Its message prints as written (KeyError quotes it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointError(ValueError):
    """A checkpoint file that is damaged, truncated or does not match the target."""


class CheckpointCorruptError(CheckpointError):
    """A damaged checkpoint file: empty, truncated, or with a corrupted header or metadata."""


class CheckpointMismatchError(CheckpointError):
    """A sound checkpoint that does not fit the target: keys, shapes, dtypes or ties differ."""
