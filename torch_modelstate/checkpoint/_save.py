"""`save`: a ModelState (or a module) as a safetensors checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_modelstate import _distributed, _kernels
from torch_modelstate._memory import check_extents
from torch_modelstate._state import ModelState
from torch_modelstate.checkpoint import _budget, _collective
from torch_modelstate.checkpoint._codec import CODE, Spec, is_plain_cpu
from torch_modelstate.checkpoint._entry import METADATA_KEY, describe
from torch_modelstate.checkpoint._layout import parse_size
from torch_modelstate.checkpoint._writer import write_checkpoint


def save(
    state_or_module: nn.Module | ModelState | Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
) -> None:
    """Save parameters, state, frozen set and ties as a safetensors checkpoint.

    `state_or_module` is anything `ModelState.new` takes. `path` is the file to write, or
    with `max_shard_size` (bytes, or ``"5GB"``, ``"500MB"``, ``"1GiB"``) a directory for
    the sharded layout (see the `torch_modelstate.io` docs). Tensors on any device,
    non-contiguous ones included, are written one at a time. A tie with an unnamed
    transform is a `ValueError`: register the transform with `register_transform` to
    save it.

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> import torch_modelstate as tms
    >>> model = nn.Linear(3, 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "linear.safetensors")
    >>> tms.save(model, path)
    >>> sorted(tms.load(path).to_dict())
    ['bias', 'weight']
    """
    ms = ModelState.new(state_or_module)
    _distributed.check_sharded(ms.module, "save")  # gathered FSDP2 parameters: refused (dist)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    index = ms._idx()
    tensors: dict[str, Tensor] = {}
    specs: list[Spec] = []
    for leaf in index.leaves:
        tensor = leaf.tensor.detach()
        _check_savable(leaf.key, tensor)
        tensors[leaf.key] = tensor
        specs.append(Spec(leaf.key, tensor.dtype, tuple(tensor.shape)))
    check_extents("save", list(tensors), list(tensors.values()), "")  # freed: read otherwise
    entry = describe(ms, index)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(entry, separators=(",", ":"))}
    if _collective.is_collective(list(tensors.values())):  # FSDP2: every rank calls (dist)
        _collective.save(path, specs, metadata, tensors, max_shard_size=limit)
        return

    def fill(batch: Sequence[Spec]) -> list[Tensor]:
        out: list[Tensor] = []
        dsts: list[Tensor] = []
        srcs: list[Tensor] = []
        for spec in batch:
            tensor = tensors[spec.key]
            if is_plain_cpu(tensor):
                out.append(tensor)
            else:  # on another device, non-contiguous or a view with a lazy conj/neg bit
                host = torch.empty(spec.shape, dtype=spec.dtype)
                out.append(host)
                dsts.append(host)
                srcs.append(tensor)
        _kernels.copy_(dsts, srcs)
        return out

    write_checkpoint(path, specs, metadata, fill, max_shard_size=limit, budget=_budget.BUDGET)


def _check_savable(key: str, tensor: Tensor) -> None:
    if key == "__metadata__":
        msg = (
            "save: a tensor is named `__metadata__`, the name the safetensors format reserves "
            "for the header's metadata; no file can hold it (nothing was written).\n"
            "  fix: rename the tensor"
        )
        raise ValueError(msg)
    if tensor.dtype not in CODE:
        supported = ", ".join(str(d).removeprefix("torch.") for d in CODE)
        msg = (
            f"save: `{key}` has dtype {tensor.dtype}, which safetensors cannot store.\n"
            f"  supported: {supported}\n  fix: convert it with .to() before saving"
        )
        raise ValueError(msg)
    if tensor.layout != torch.strided:
        msg = (
            f"save: `{key}` is a {tensor.layout} tensor; safetensors stores dense tensors.\n"
            "  fix: .to_dense() it"
        )
        raise ValueError(msg)
    if tensor.is_meta:
        msg = (
            f"save: `{key}` is on the meta device and holds no data.\n"
            "  fix: materialize the model first (to_empty() and initialise, or load a checkpoint)"
        )
        raise ValueError(msg)
