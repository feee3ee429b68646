"""Chunks: runs of (lhs, rhs) pairs of bounded size, for merges that convert or compute.

`chunk_pairs` splits pairs into runs of about a given number of elements (stochastic
rounding and slerp compute a temporary per run). `float_chunks` brings a float group's rhs
to lhs's device and dtype a chunk at a time through one reused staging buffer, so a mixed
merge (an fp32 EMA of a bf16 model, a CPU shadow of a GPU model) never makes a model-sized
copy. `_kernels` runs the ops; nothing here checks user input.

>>> import torch
>>> ls, rs = [torch.zeros(3), torch.zeros(3)], [torch.ones(3, dtype=torch.float64)] * 2
>>> [(len(a), b[0].dtype) for a, b in float_chunks([(ls, rs)])]
[(2, torch.float32)]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["CONVERT_BUDGET", "DEVICE_CONVERT_FACTOR", "chunk_pairs", "float_chunks"]


def chunk_pairs(
    ls: list[Tensor], rs: list[Tensor], limit: int
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Consecutive runs of (lhs, rhs) pairs holding about `limit` lhs elements each.

    For merges that compute in a temporary per chunk (stochastic rounding, slerp): the
    temporaries stay chunk-sized whatever the model's size. A tensor is never split.
    """
    chunk_l: list[Tensor] = []
    chunk_r: list[Tensor] = []
    size = 0
    for lt, rt in zip(ls, rs, strict=True):
        chunk_l.append(lt)
        chunk_r.append(rt)
        size += lt.numel()
        if size >= limit:
            yield chunk_l, chunk_r
            chunk_l, chunk_r, size = [], [], 0
    if chunk_l:
        yield chunk_l, chunk_r


# At most this many bytes (of lhs's dtype) are converted at once when lhs and rhs differ in
# device or dtype (an fp32 EMA of a bf16 model, a CPU shadow of a GPU model): never a
# model-sized copy.
# On the CPU a chunk stays in cache (an fp32 EMA of a bf16 LM: 0.02x the model's bytes of
# extra memory, and faster than one mixed-dtype `_foreach_add_`); on an accelerator it is
# larger, so kernel launches stay few. `CONVERT_BUDGET` is the CPU's, times
# `DEVICE_CONVERT_FACTOR` elsewhere.
CONVERT_BUDGET = 4 * 2**20
DEVICE_CONVERT_FACTOR = 16


def float_chunks(
    floats: list[tuple[list[Tensor], list[Tensor]]],
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Each float group, with rhs brought to lhs's device and dtype a chunk at a time.

    A chunk holds at most `CONVERT_BUDGET` bytes of lhs's dtype (times
    `DEVICE_CONVERT_FACTOR` off the CPU), converted into one staging buffer that every
    chunk of the group reuses (no allocation per chunk); a larger contiguous tensor is split
    into flat slices (views of lhs, so the op still writes in place), and a larger strided
    one is converted whole. A copy that changes both device and dtype may still make a
    temporary per tensor inside torch. The consumer must have *issued* its op on a chunk
    before asking for the next one, on the current stream (stream order keeps the
    staging buffer's reuse safe on an accelerator). The same kernel then runs on converted
    values, so results equal converting first. ``non_blocking`` only for copies from the CPU
    to an accelerator: a device-to-host copy must land before the CPU reads it.
    """
    for ls, rs in floats:
        if not ls:
            continue
        device, dtype = ls[0].device, ls[0].dtype
        if rs[0].device == device and rs[0].dtype == dtype:
            yield ls, rs
            continue
        non_blocking = rs[0].device.type == "cpu" and device.type != "cpu"
        budget = CONVERT_BUDGET * (1 if device.type == "cpu" else DEVICE_CONVERT_FACTOR)
        limit = max(1, budget // ls[0].element_size())
        staging = torch.empty(min(limit, sum(map(Tensor.numel, ls))), dtype=dtype, device=device)

        def staged(chunk: list[Tensor]) -> list[Tensor]:
            views: list[Tensor] = []
            offset = 0
            for r in chunk:
                n = r.numel()
                views.append(staging[offset : offset + n].view(r.shape))  # noqa: B023
                offset += n
            torch._foreach_copy_(views, chunk, non_blocking=non_blocking)  # noqa: B023
            return views

        chunk_l: list[Tensor] = []
        chunk_r: list[Tensor] = []
        size = 0
        for lt, rt in zip(ls, rs, strict=True):
            n = lt.numel()
            if n > limit:
                if chunk_l:
                    yield chunk_l, staged(chunk_r)
                    chunk_l, chunk_r, size = [], [], 0
                if lt.is_contiguous() and rt.is_contiguous():
                    flat_l, flat_r = lt.view(-1), rt.view(-1)
                    for start in range(0, n, limit):
                        yield (
                            [flat_l[start : start + limit]],
                            staged([flat_r[start : start + limit]]),
                        )
                else:  # a strided giant: converted whole, the one case above the budget
                    yield [lt], [rt.to(device=device, dtype=dtype, non_blocking=non_blocking)]
                continue
            if size + n > limit:
                yield chunk_l, staged(chunk_r)
                chunk_l, chunk_r, size = [], [], 0
            chunk_l.append(lt)
            chunk_r.append(rt)
            size += n
        if chunk_l:
            yield chunk_l, staged(chunk_r)
