"""Exceptions: each subclasses the builtin a caller would catch."""

from __future__ import annotations


class KeyNotFoundError(KeyError):
    """A key that the model does not have. Its message prints as written (KeyError quotes it).

    >>> str(KeyNotFoundError("no key 'a'"))
    "no key 'a'"
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointError(ValueError):
    """A checkpoint file that is damaged, truncated or does not match the target.

    >>> import torch_modelstate as tms
    >>> issubclass(tms.CheckpointError, ValueError)
    True
    """


class CheckpointCorruptError(CheckpointError):
    """A damaged checkpoint: empty, truncated, a corrupted header or metadata, files of two saves.

    Also what a FIFO, socket or device under a checkpoint's name raises (never opened).

    >>> import os, tempfile
    >>> import torch_modelstate as tms
    >>> path = os.path.join(tempfile.mkdtemp(), "empty.safetensors")
    >>> open(path, "wb").close()
    >>> try:
    ...     tms.load(path)
    ... except tms.CheckpointCorruptError as err:
    ...     print(str(err).split(": ", 1)[1])
    the file is empty (0 bytes); expected a safetensors file.
    """


class CheckpointMismatchError(CheckpointError):
    """A sound checkpoint that does not fit the target: keys, shapes, dtypes or ties differ.

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> import torch_modelstate as tms
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> tms.save({"weight": torch.ones(3, 3)}, path)
    >>> try:
    ...     tms.io.check(path, nn.Linear(2, 2), strict=False)
    ... except tms.CheckpointMismatchError as err:
    ...     print("shape mismatch" in str(err))
    True
    """
