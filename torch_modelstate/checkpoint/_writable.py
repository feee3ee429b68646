"""Whether loading can write a target tensor: inference tensors and read-only memory, found first.

Two targets cannot take a value, and torch only says so while writing (after earlier tensors
were written): an inference tensor (made under ``torch.inference_mode()``) written by a kernel
outside inference mode, and a tensor whose memory is mapped read-only (``torch.frombuffer``
over a read-only ``mmap``), which a kernel cannot write and a read reports as ``EFAULT``.
Both are found here, before any write: the first (with layouts and lazy views) by the rule
update and merge use (`torch_modelstate._writable.check_destinations`), told which targets
are read into as bytes rather than written by a kernel; read-only memory from the process's
memory map (``/proc/self/maps``, Linux only), which update does not check yet.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from torch_modelstate import _distributed
from torch_modelstate import _writable as destinations
from torch_modelstate.checkpoint._codec import TensorInfo, is_plain_cpu

_MAPS = Path("/proc/self/maps")


def direct(info: TensorInfo, dst: Tensor) -> bool:
    """Whether `dst` is read into as bytes (else the value is staged and copied by a kernel)."""
    return is_plain_cpu(dst) and dst.dtype == info.torch_dtype


def problems(writes: Sequence[tuple[str, TensorInfo, Tensor]]) -> list[str]:
    """One message per target tensor that loading cannot write (key, why, the fix)."""
    found: list[str] = []
    keys = [key for key, _, _ in writes]
    dsts = [_distributed.to_local(dst) for _, _, dst in writes]  # a DTensor: its shard
    try:  # the rule update and merge follow; bytes read straight in need no kernel
        destinations.check_destinations(
            "load", keys, dsts, kernel=[not direct(info, dst) for _, info, dst in writes]
        )
    except ValueError as err:
        found.append(str(err).removeprefix("load: "))
    # A DTensor's memory is its local shard.
    locals_ = ((key, _distributed.to_local(dst)) for key, _, dst in writes)
    cpu = [(key, dst) for key, dst in locals_ if dst.device.type == "cpu" and dst.numel()]
    writable = _writable_ranges() if cpu else None
    if writable is not None:
        starts = [lo for lo, _ in writable]
        for key, dst in cpu:
            try:
                storage = dst.untyped_storage()
                lo = storage.data_ptr()
            except (RuntimeError, NotImplementedError):  # a subclass without plain storage
                continue
            hi = lo + storage.nbytes()
            i = bisect.bisect_right(starts, lo) - 1
            if i < 0 or writable[i][1] < hi:
                found.append(
                    f"`{key}` in the target lies in read-only memory (a read-only memory map, "
                    "such as torch.frombuffer over an mmap opened with ACCESS_READ), so values "
                    "cannot be written into it.\n"
                    "  fix: give the module a writable copy first (e.g. "
                    "module.register_buffer(name, tensor.clone())), or map the file with "
                    "mmap.ACCESS_COPY"
                )
    return found


def _writable_ranges() -> list[tuple[int, int]] | None:
    """Sorted, merged address ranges the process may write, or None where unknown."""
    try:
        text = _MAPS.read_text()
    except OSError:
        return None
    ranges: list[tuple[int, int]] = []
    for line in text.splitlines():
        fields = line.split(maxsplit=2)
        if len(fields) < 2 or "w" not in fields[1]:
            continue
        lo_text, _, hi_text = fields[0].partition("-")
        lo, hi = int(lo_text, 16), int(hi_text, 16)
        if ranges and ranges[-1][1] == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    return ranges
