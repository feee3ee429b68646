"""Whether loading can write a target tensor, found before any write.

A target torch only refuses while writing (after earlier tensors were written) is found here
first, by the rule update and merge use (`torch_modelstate._writable.check_destinations`):
a non-strided layout, overlapping elements, a lazy conjugate view, read-only memory, and an
inference tensor written by a kernel outside inference mode. Loading reads some targets
straight in as bytes (`direct`), which an inference tensor allows.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from torch_modelstate import _distributed
from torch_modelstate import _writable as destinations
from torch_modelstate.checkpoint._codec import TensorInfo, is_plain_cpu


def direct(info: TensorInfo, dst: Tensor) -> bool:
    """Whether `dst` is read into as bytes (else the value is staged and copied by a kernel)."""
    return is_plain_cpu(dst) and dst.dtype == info.torch_dtype


def problems(writes: Sequence[tuple[str, TensorInfo, Tensor]]) -> list[str]:
    """The message of the first target tensor that loading cannot write (key, why, the fix)."""
    keys = [key for key, _, _ in writes]
    dsts = [_distributed.to_local(dst) for _, _, dst in writes]  # a DTensor: its shard
    try:
        destinations.check_destinations(
            "load", keys, dsts, kernel=[not direct(info, dst) for _, info, dst in writes]
        )
    except ValueError as err:
        return [str(err).removeprefix("load: ")]
    return []
