"""Frozen state: buffers that keep their value through forward passes.

A frozen buffer's owning module gets a forward pre-hook that swaps the buffer for a scratch
copy, and a forward hook (``always_call=True``, so also when forward raises) that puts the
original tensor back. Whatever forward does to the buffer, in place or by reassignment,
lands on the copy. A frozen ``BatchNorm`` therefore still normalises with batch statistics
in training mode, exactly as an unfrozen one, and only its running statistics (and
``num_batches_tracked``) stay put; the same holds for any custom buffer. We never touch
``module.training`` or ``track_running_stats``, so a parent's ``.train()`` cannot undo it.

The frozen names live on the owning module (``_tms_frozen_buffers``), so every view of the
module agrees, and ``copy.deepcopy`` carries them along with the hooks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from torch_modelstate import _kernels

_NAMES = "_tms_frozen_buffers"
_STACK = "_tms_frozen_stack"
_HOOKED = "_tms_frozen_hooked"


def frozen_buffers(owner: nn.Module) -> frozenset[str] | set[str]:
    names: set[str] | None = owner.__dict__.get(_NAMES)
    return names if names is not None else frozenset()


def set_frozen(owner: nn.Module, names: Iterable[str], frozen: bool) -> None:
    """Freeze (or unfreeze) the named buffers of `owner`."""
    current: set[str] | None = owner.__dict__.get(_NAMES)
    if frozen:
        if current is None:
            current = owner.__dict__[_NAMES] = set()
        current.update(names)
        if not owner.__dict__.get(_HOOKED, False):
            # First among the pre-hooks, so hooks such as spectral_norm's see the scratch copy.
            owner.register_forward_pre_hook(_swap_in_scratch, prepend=True)
            owner.register_forward_hook(_restore, always_call=True)
            owner.__dict__[_HOOKED] = True
    elif current is not None:
        current.difference_update(names)


def _swap_in_scratch(module: nn.Module, args: Any) -> None:
    names = module.__dict__.get(_NAMES)
    saved: list[tuple[str, Tensor]] = []
    if names:
        buffers = module._buffers
        saved = [(n, t) for n in names if (t := buffers.get(n)) is not None]
        for (name, _), scratch in zip(saved, _kernels.clone([t for _, t in saved]), strict=True):
            buffers[name] = scratch
    module.__dict__.setdefault(_STACK, []).append(saved)


def _restore(module: nn.Module, args: Any, output: Any) -> None:
    stack: list[list[tuple[str, Tensor]]] | None = module.__dict__.get(_STACK)
    if not stack:
        return
    for name, original in stack.pop():
        module._buffers[name] = original
