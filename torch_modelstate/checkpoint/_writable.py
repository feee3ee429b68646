"""Whether loading can write a target tensor: inference tensors and read-only memory, found first.

Two targets cannot take a value, and torch only says so while writing (after earlier tensors
were written): an inference tensor (made under ``torch.inference_mode()``) written by a kernel
outside inference mode, and a tensor whose memory is mapped read-only (``torch.frombuffer``
over a read-only ``mmap``), which a kernel cannot write and a read reports as ``EFAULT``.
Both are found here, before any write. Read-only memory is found from the process's memory
map (``/proc/self/maps``, Linux); elsewhere only the inference check runs.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from torch_modelstate import _distributed
from torch_modelstate.checkpoint._codec import TensorInfo, is_plain_cpu

_MAPS = Path("/proc/self/maps")


def direct(info: TensorInfo, dst: Tensor) -> bool:
    """Whether `dst` is read into as bytes (else the value is staged and copied by a kernel)."""
    return is_plain_cpu(dst) and dst.dtype == info.torch_dtype


def problems(writes: Sequence[tuple[str, TensorInfo, Tensor]]) -> list[str]:
    """One message per target tensor that loading cannot write (key, why, the fix)."""
    found: list[str] = []
    inference_ok = torch.is_inference_mode_enabled()
    for key, info, dst in writes:
        if dst.is_inference() and not inference_ok and not direct(info, dst):
            found.append(
                f"`{key}` in the target is an inference tensor (made under "
                f"torch.inference_mode()) and the value needs a copy into it "
                f"({info.torch_dtype} -> {dst.dtype}), which torch allows only in inference mode.\n"
                "  fix: call the load inside `with torch.inference_mode():`, or build the "
                "model outside inference mode"
            )
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
