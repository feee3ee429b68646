"""What is special about sharded tensors (FSDP2's DTensor parameters) and collectives.

A write into a DTensor is a write into its local shard: `local_pairs` turns each
(destination, source) pair into plain tensors that the kernels can hand to
``torch._foreach_*`` (which has no DTensor rule for ``copy_``):

- a DTensor destination writes its local shard (``to_local()``, which aliases it);
- a full-size plain source for it contributes only the slice matching that shard, found from
  the DTensor's global shape, mesh and placements (uneven shards included), so no rank
  communicates;
- a DTensor source of the destination's placements contributes its own local shard; one of
  other placements is redistributed first (a collective: every rank writes);
- a DTensor source for a plain destination (a buffer) is gathered to its full value.

`agreement` makes a validation phase collective: if any rank raises inside it, every rank
raises the same error (type and message) and no rank has gone on to write.

>>> import torch
>>> a, b = torch.zeros(2), torch.ones(2)
>>> local_pairs([a], [b]) == ([a], [b])
True
>>> any_dtensor([a, b])
False
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from torch_modelstate import _errors

__all__ = [
    "agreement",
    "any_dtensor",
    "check_sharded",
    "dtensor_group",
    "full",
    "is_sharded",
    "local_pairs",
    "local_slice",
    "rebuild",
    "to_local",
    "unsharded_groups",
]

_DTENSOR = DTensor


def any_dtensor(tensors: Iterable[Tensor]) -> bool:
    """Whether any of `tensors` is a DTensor."""
    return _DTENSOR in set(map(type, tensors))


def is_sharded(t: Tensor) -> bool:
    """Whether `t` is a DTensor (an FSDP2 parameter, or a copy of one)."""
    return isinstance(t, DTensor)


def unsharded_groups(module: nn.Module) -> list[str]:
    """Names of the `fully_shard` modules under `module` whose parameters are gathered now.

    FSDP2 keeps the root's parameters gathered after a forward that no backward followed
    (and any module after ``unshard()``); values written into those gathered copies are
    dropped when the group reshards. A write into such a model must be refused.
    """
    if not isinstance(module, FSDPModule):
        return []
    found = []
    for name, sub in module.named_modules():
        if isinstance(sub, FSDPModule):
            group = sub._get_fsdp_state()._fsdp_param_group
            if group is not None and not group.is_sharded:
                found.append(name or "(the root)")
    return found


def check_sharded(module: nn.Module | None, verb: str) -> None:
    """Refuse to write into a `fully_shard` model whose parameters are gathered (see
    `unsharded_groups`): a ``ValueError`` naming the modules and the fix."""
    names = [] if module is None else unsharded_groups(module)
    if names:
        shown = ", ".join(f"`{n}`" for n in names[:5]) + (" ..." if len(names) > 5 else "")
        msg = (
            f"{verb}: the fully_shard (FSDP2) modules {shown} hold gathered (unsharded) "
            "parameters now, as after a forward with no backward; values written into them "
            "would be lost when they reshard.\n"
            "  expected: sharded parameters (DTensors)\n"
            "  got: gathered parameters\n"
            "  fix: call model.reshard() first (or write after the backward pass)"
        )
        raise ValueError(msg)


def local_slice(full: Tensor, like: DTensor) -> Tensor:
    """The part of `full` (a tensor of ``like``'s global shape) that ``like``'s rank holds
    (a view: the slice along each sharded dimension, uneven shards included)."""
    shape, offset = compute_local_shape_and_global_offset(
        like.shape, like.device_mesh, like.placements
    )
    if tuple(shape) == tuple(full.shape):
        return full
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
    return full[index]


def to_local(t: Tensor) -> Tensor:
    """A DTensor's local shard (sharing its memory); any other tensor as it is."""
    if type(t) is _DTENSOR:
        local: Tensor = t._local_tensor  # to_local() without the autograd wrapper: an alias
        return local
    return t


def full(t: Tensor) -> Tensor:
    """A DTensor's whole value on every rank (a collective); any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local_source(src: Tensor, dst: DTensor) -> Tensor:
    if type(src) is _DTENSOR:
        assert isinstance(src, DTensor)
        if src.device_mesh != dst.device_mesh or src.placements != dst.placements:
            src = src.redistribute(dst.device_mesh, dst.placements)
        return to_local(src)
    return local_slice(src, dst)


def local_pairs(dsts: list[Tensor], srcs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Each pair with DTensors replaced by the plain tensors a rank reads and writes."""
    if not (any_dtensor(dsts) or any_dtensor(srcs)):
        return dsts, srcs
    out_d: list[Tensor] = []
    out_s: list[Tensor] = []
    for dst, src in zip(dsts, srcs, strict=True):
        if type(dst) is _DTENSOR:
            assert isinstance(dst, DTensor)
            out_d.append(to_local(dst))
            out_s.append(_local_source(src, dst))
        else:
            out_d.append(dst)
            out_s.append(full(src))
    return out_d, out_s


def dtensor_group(tensors: Iterable[Tensor]) -> dist.ProcessGroup | None:
    """The process group of the first DTensor among `tensors` (None if there is none)."""
    for t in tensors:
        if isinstance(t, DTensor):
            mesh = t.device_mesh
            group = mesh.get_group() if mesh.ndim == 1 else None
            return group if group is not None else dist.group.WORLD
    return None


_KNOWN: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (*vars(builtins).values(), *vars(_errors).values())
    if isinstance(cls, type) and issubclass(cls, Exception)
}


def rebuild(name: str, message: str) -> BaseException:
    """An exception of the builtin or library class named `name` (else RuntimeError)."""
    cls = _KNOWN.get(name, RuntimeError)
    try:
        return cls(message)
    except Exception:  # an exception class whose constructor wants more
        return RuntimeError(message)


@contextmanager
def agreement(tensors: Iterable[Tensor]) -> Iterator[None]:
    """Run a check on every rank; if it fails on one, it fails on all, with one error.

    Collective only when `tensors` hold a DTensor (every rank then holds the same keys and
    must take part); otherwise a plain pass-through. Costs one all-reduce when all pass.
    """
    group = dtensor_group(tensors)
    if group is None:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # every rank learns of it below; re-raised unchanged here
        error = exc
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    flag = torch.tensor([rank if error is not None else world], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    first = int(flag.item())
    if first == world:
        return
    payload = b""
    if rank == first:
        assert error is not None
        args = error.args
        message = args[0] if len(args) == 1 and isinstance(args[0], str) else str(error)
        payload = json.dumps([type(error).__name__, message]).encode()
    size = torch.tensor([len(payload)], dtype=torch.int64)
    src = dist.get_global_rank(group, first)
    dist.broadcast(size, src=src, group=group)
    data = torch.zeros(int(size.item()), dtype=torch.uint8)
    if rank == first:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    dist.broadcast(data, src=src, group=group)
    if rank == first:
        assert error is not None
        raise error
    name, message = json.loads(bytes(data.tolist()).decode())
    raise rebuild(name, message)  # the same error as on the rank that failed
