"""Applying a load plan: ties made, tensors streamed into the target, frozen set restored."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from torch_modelstate import _kernels
from torch_modelstate.checkpoint import _budget, _collective
from torch_modelstate.checkpoint._codec import TensorInfo
from torch_modelstate.checkpoint._files import Checkpoint
from torch_modelstate.checkpoint._plan import Plan
from torch_modelstate.checkpoint._writable import direct as is_direct


def apply(ckpt: Checkpoint, plan: Plan) -> None:
    """Make the plan's ties, stream its values, and apply the file's frozen set if asked."""
    ms, saved = plan.ms, plan.saved
    restore = plan.frozen == "file" and saved.frozen is not None
    before = ms._frozen_keys(ms._idx()) if restore else set()
    for dest, source, name in plan.ties:
        ms.tie(dest, source, name)
    stream(ckpt, [(info, leaf.tensor) for _, info, leaf in plan.writes])
    if restore and saved.frozen is not None:
        file_key = {leaf.key: key for key, _, leaf in plan.writes}
        wanted = {key for key, fk in file_key.items() if fk in saved.frozen}
        wanted |= {key for key in before if key not in file_key}
        ms._restore_frozen(wanted)


@torch.no_grad()
def stream(ckpt: Checkpoint, writes: Sequence[tuple[TensorInfo, Tensor]]) -> None:
    """Read each tensor into its destination: in place when it can, else staged and copied.

    A CPU destination of the file's dtype, contiguous, is read into directly (no copy of
    the model in memory). Others (another device, dtype or layout) are read in batches of
    about `_budget.BUDGET` bytes into staging tensors, then copied by one grouped kernel call.
    """
    writes, sharded = _collective.split_sharded(writes)  # FSDP2: each rank reads its shards (dist)
    _collective.read_sharded(ckpt, sharded)
    direct: list[tuple[TensorInfo, Tensor]] = []
    staged: list[tuple[TensorInfo, Tensor]] = []
    for info, dst in sorted(writes, key=lambda w: (str(w[0].file), w[0].start)):
        (direct if is_direct(info, dst) else staged).append((info, dst))
    ckpt.read_into(direct)
    # The bytes bypassed autograd: count the writes as copy_ would.
    torch.autograd.graph.increment_version([d for _, d in direct if not d.is_inference()])
    for batch in _budget.pack(staged, lambda w: w[0].nbytes, _budget.BUDGET):
        temps = [torch.empty(info.shape, dtype=info.torch_dtype) for info, _ in batch]
        ckpt.read_into([(info, temp) for (info, _), temp in zip(batch, temps, strict=True)])
        _kernels.copy_([dst for _, dst in batch], temps)
        del temps
