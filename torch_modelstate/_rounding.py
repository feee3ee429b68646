"""Stochastic rounding into bf16 and fp16, for merges that must not stall.

``ema(0.999)`` of a bf16 tensor moves it by 0.1 % of the gap per step, far below half a
bf16 step (0.4 % of the value), so round-to-nearest returns the old value every time and
the average never moves. Stochastic rounding rounds up with probability equal to the
distance from the value below, so the result is right on average (unbiased), as in timm's
``ModelEmaV3``.

The merge is computed in fp32 over a flat buffer per chunk of tensors (a handful of ops per
chunk, no Python work per element): uniform random bits are added below the target's
mantissa in the fp32 bit pattern, the bits below it are cleared (truncation, toward zero in
magnitude), and the now exactly representable values are written through
`_kernels.copy_`. bf16 shares fp32's exponent, so this is exact everywhere; for fp16 it is
exact in fp16's normal range, and values below 2**-14 (fp16 subnormals) are rounded to
nearest. Infinities and (torch's) NaNs pass through unchanged.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from torch_modelstate import _chunks, _distributed, _kernels
from torch_modelstate._kernels import NonFloat

__all__ = ["LOW_PRECISION", "lerp_"]

# Bits of an fp32 mantissa below each target's mantissa.
LOW_PRECISION: dict[torch.dtype, int] = {torch.bfloat16: 16, torch.float16: 13}

# Where the high 16 bits of an fp32 lie when it is viewed as two int16s.
_HIGH_HALF: int | None = 1 if sys.byteorder == "little" else None

# Elements computed in fp32 at once (three fp32 buffers of this size live at a time).
CHUNK = 1 << 20


def round_(values: Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> None:
    """Round the fp32 `values` in place, stochastically, to numbers `dtype` holds exactly.

    Adding fewer than ``2**bits`` to the bit pattern of an infinity or of a NaN (whose
    payload torch keeps in the high mantissa bits) and clearing the low bits gives it back.
    """
    bits = LOW_PRECISION[dtype]
    noise = torch.empty(values.shape, dtype=torch.int16, device=values.device)
    pattern = values.view(torch.int32)
    if bits == 16:
        # Signed 16-bit noise plus 2**15 is uniform over [0, 2**16).
        noise.random_(-(1 << 15), 1 << 15, generator=generator)
        pattern.add_(noise).add_(1 << 15)
    else:
        noise.random_(0, 1 << bits, generator=generator)
        pattern.add_(noise)
    pattern.bitwise_and_(-(1 << bits))


@torch.no_grad()
def lerp_(
    lhs: list[Tensor],
    rhs: list[Tensor],
    weight: float,
    nonfloat: NonFloat,
    generator: torch.Generator | None,
) -> None:
    """``lhs[i] += weight * (rhs[i] - lhs[i])``, rounded stochastically into bf16/fp16 lhs.

    Other tensors take the plain grouped kernel (`_kernels.lerp_`, nearest rounding).
    DTensors (FSDP2) are rounded shard by shard, with no communication.
    """
    lhs, rhs = _distributed.local_pairs(lhs, rhs)
    low = [i for i, t in enumerate(lhs) if t.dtype in LOW_PRECISION]
    if len(low) < len(lhs):
        chosen = set(low)
        rest = [i for i in range(len(lhs)) if i not in chosen]
        _kernels.lerp_([lhs[i] for i in rest], [rhs[i] for i in rest], weight, nonfloat)
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for i in low:
        ls, rs = groups.setdefault((lhs[i].device, lhs[i].dtype), ([], []))
        ls.append(lhs[i])
        rs.append(rhs[i])
    for (device, dtype), (ls, rs) in groups.items():
        for chunk_l, chunk_r in _chunks.chunk_pairs(ls, rs, CHUNK):
            a = torch.cat([t.reshape(-1) for t in chunk_l]).to(torch.float32)
            b = torch.cat([t.reshape(-1).to(device) for t in chunk_r]).to(torch.float32)
            a.lerp_(b, weight)
            del b
            round_(a, dtype, generator)
            sizes = [t.numel() for t in chunk_l]
            if dtype == torch.bfloat16 and _HIGH_HALF is not None and _all_plain(chunk_l):
                # The rounded values are exact in bf16: their bf16 bits are the high half of
                # each fp32 pattern, copied as int16 (a cast would round again, slowly).
                halves = a.view(torch.int16)[_HIGH_HALF::2].split_with_sizes(sizes)
                dsts = [t.view(torch.int16) for t in chunk_l]
                _kernels.copy_(
                    dsts, [h.view(t.shape) for h, t in zip(halves, chunk_l, strict=True)]
                )
                continue
            pieces = a.split_with_sizes(sizes)
            _kernels.copy_(chunk_l, [p.view(t.shape) for p, t in zip(pieces, chunk_l, strict=True)])


def _all_plain(tensors: list[Tensor]) -> bool:
    """Contiguous, not a DTensor or other subclass: an int16 view of each is its memory."""
    return all(type(t) in (Tensor, torch.nn.Parameter) and t.is_contiguous() for t in tensors)
