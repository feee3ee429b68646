"""Spherical interpolation of many tensors at once, on their own device.

Each tensor is treated as one flat vector (as mergekit does): the angle between ``lhs`` and
``rhs`` comes from their normalised dot product, and the result is
``sin((1 - t) θ) / sin θ · lhs + sin(t θ) / sin θ · rhs``; nearly parallel pairs
(``|cos θ| > 0.9995``) fall back to ``lerp``, where the formula loses precision. A vector
whose norm is at most ``1e-8`` is left unnormalised, as in mergekit.

Tensors are processed in chunks of about `CHUNK` elements per (device, dtype): a chunk is
concatenated into one flat fp32 buffer per side (fp64 for fp64 tensors), and the dot
products and norms of all its tensors come from one ``segment_reduce`` each, so the work
is a handful of kernels per chunk whatever the number of tensors. Results are written
through `_kernels.copy_`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_modelstate import _chunks, _distributed, _kernels
from torch_modelstate._kernels import NonFloat

__all__ = ["DOT_THRESHOLD", "EPS", "slerp", "slerp_"]

DOT_THRESHOLD = 0.9995
EPS = 1e-8
CHUNK = 1 << 20


def _flat(tensors: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.cat([t.detach().reshape(-1).to(device, dtype) for t in tensors])


def _coefficients(a: Tensor, b: Tensor, lengths: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """Per-segment weights of lhs and rhs (one value per tensor of the chunk)."""
    dot = torch.segment_reduce(a * b, "sum", lengths=lengths)
    na = torch.segment_reduce(a * a, "sum", lengths=lengths).sqrt_()
    nb = torch.segment_reduce(b * b, "sum", lengths=lengths).sqrt_()
    one = torch.ones_like(na)
    cos = dot / (torch.where(na > EPS, na, one) * torch.where(nb > EPS, nb, one))
    cos = cos.to(torch.float64).clamp_(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    parallel = cos.abs() > DOT_THRESHOLD
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    w0 = torch.where(parallel, 1.0 - t, torch.sin((1.0 - t) * theta) / safe)
    w1 = torch.where(parallel, t, torch.sin(t * theta) / safe)
    return w0.to(a.dtype), w1.to(a.dtype)


def _values(ls: list[Tensor], rs: list[Tensor], t: float) -> list[Tensor]:
    """The slerp of each pair as views of one flat buffer (fp32, or fp64 for fp64 lhs)."""
    device = ls[0].device
    work = torch.float64 if ls[0].dtype == torch.float64 else torch.float32
    a = _flat(ls, device, work)
    b = _flat(rs, device, work)
    sizes = [x.numel() for x in ls]
    lengths = torch.tensor(sizes, device=device)
    w0, w1 = _coefficients(a, b, lengths, t)
    a.mul_(torch.repeat_interleave(w0, lengths, output_size=a.numel()))
    a.add_(b.mul_(torch.repeat_interleave(w1, lengths, output_size=a.numel())))
    return [p.view(x.shape) for p, x in zip(a.split_with_sizes(sizes), ls, strict=True)]


@torch.no_grad()
def slerp_(lhs: list[Tensor], rhs: list[Tensor], t: float, nonfloat: NonFloat) -> None:
    """Write the spherical interpolation of ``lhs[i]`` towards ``rhs[i]`` into ``lhs[i]``."""
    if _distributed.any_dtensor(lhs) or _distributed.any_dtensor(rhs):
        msg = (
            "merges.slerp: the angle between two tensors needs each tensor whole, and these "
            "are sharded (DTensor / FSDP2).\n"
            "  fix: merge unsharded copies (e.g. two checkpoints with `torch-modelstate merge "
            "--method slerp`), or use merges.lerp, which works shard by shard"
        )
        raise TypeError(msg)
    if any(x.is_complex() for x in lhs):
        msg = (
            "merges.slerp: complex tensors have no angle in this sense.\n"
            "  fix: merge them with merges.lerp, or their real and imaginary parts apart"
        )
        raise TypeError(msg)
    floats: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    int_l: list[Tensor] = []
    int_r: list[Tensor] = []
    for lt, rt in zip(lhs, rhs, strict=True):
        if lt.dtype.is_floating_point:
            ls, rs = floats.setdefault((lt.device, lt.dtype), ([], []))
            ls.append(lt)
            rs.append(rt)
        elif lt.numel():
            int_l.append(lt)
            int_r.append(rt)
    for ls, rs in floats.values():
        for chunk_l, chunk_r in _chunks.chunk_pairs(ls, rs, CHUNK):
            chunk = [(x, y) for x, y in zip(chunk_l, chunk_r, strict=True) if x.numel()]
            if chunk:
                xs = [x for x, _ in chunk]
                _kernels.copy_(xs, _values(xs, [y for _, y in chunk], t))
    if int_l and nonfloat == "rhs":
        _kernels.copy_(int_l, int_r)


@torch.no_grad()
def slerp(lhs: Tensor, rhs: Tensor, t: float) -> Tensor:
    """The spherical interpolation of one float pair, out of place, in lhs's dtype."""
    if not lhs.numel():
        return lhs.clone()
    return _values([lhs], [rhs], t)[0].to(lhs.dtype)
