"""Optimizer state as a plain safetensors file, keyed by parameter key and state name.

A ``torch.optim`` state dict numbers parameters by their position in the optimizer, which
changes when a model is rebuilt. Here each tensor is stored under
``"<parameter key>.<state name>"`` (``"blocks.0.weight.exp_avg"``); the metadata entry
``torch_modelstate.optimizer`` (JSON) records the optimizer's class, each group's options
and parameter keys, each parameter's shape and dtype, and the state that is not a tensor
(``step`` as a Python number, ``momentum_buffer: None``). Loading maps keys back to the
positions of the optimizer at hand, checks everything against it first, and then hands a
position-numbered state dict to ``optimizer.load_state_dict`` (torch's own casting rules).

Over FSDP2 (DTensor) parameters both are collective, through `checkpoint._collective` as the
model's `save`/`load`: checks under `_distributed.agreement`, rank 0 writes one plain file,
and each rank reads only its shard of each state tensor into a DTensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from torch_modelstate import _distributed, _kernels
from torch_modelstate._errors import CheckpointCorruptError, CheckpointMismatchError
from torch_modelstate._state import ModelState
from torch_modelstate.checkpoint import _budget, _collective
from torch_modelstate.checkpoint._codec import CODE, Spec, TensorInfo
from torch_modelstate.checkpoint._files import Checkpoint, open_checkpoint
from torch_modelstate.checkpoint._writer import write_checkpoint

__all__ = ["load_optimizer", "save_optimizer"]

ENTRY = "torch_modelstate.optimizer"
_VERSION = 1
_JSON_SCALARS = (bool, int, float, str, type(None))


def _named_params(
    optimizer: torch.optim.Optimizer, ms: ModelState, verb: str
) -> list[list[tuple[str, Tensor]]]:
    """The optimizer's parameters, group by group, with their keys in `ms`."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        msg = f"`optimizer` must be a torch.optim.Optimizer.\n  got: {type(optimizer).__name__}"
        raise TypeError(msg)
    key_of = {id(t): k for k, t in ms.parameters().items()}
    groups: list[list[tuple[str, Tensor]]] = []
    for g, group in enumerate(optimizer.param_groups):
        named: list[tuple[str, Tensor]] = []
        for p in group["params"]:
            key = key_of.get(id(p))
            if key is None:
                msg = (
                    f"{verb}: param group {g} of the {type(optimizer).__name__} holds a tensor "
                    f"of shape {tuple(p.shape)} that is not a parameter of the model.\n"
                    "  fix: pass the model (or its ModelState) that the optimizer trains"
                )
                raise ValueError(msg)
            named.append((key, p))
        groups.append(named)
    return groups


def _all_params(optimizer: object) -> list[Tensor]:
    """Every tensor the optimizer trains (none if it is no optimizer): what decides whether
    saving and loading are collective (FSDP2 parameters are DTensors)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return []
    return [p for group in optimizer.param_groups for p in group["params"]]


def _json_value(value: Any, where: str) -> Any:
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _JSON_SCALARS) for v in value):
        return list(value)
    msg = (
        f"save_optimizer: {where} is a {type(value).__name__}, which cannot be stored.\n"
        "  expected: a tensor, a number, a bool, a string, None, or a tuple of numbers"
    )
    raise TypeError(msg)


def save_optimizer(
    optimizer: torch.optim.Optimizer,
    state_or_module: nn.Module | ModelState | Mapping[str, Any],
    path: str | os.PathLike[str],
) -> None:
    """Write `optimizer`'s state to a safetensors file, keyed by the model's parameter keys.

    Tensors are stored as ``"<key>.<state name>"`` (``"0.weight.exp_avg"``); group options
    and state that is not a tensor go into the JSON metadata. Never pickled. The file is
    written under a temporary name and renamed into place, as `save` does.

    >>> import os, tempfile, torch
    >>> import torch_modelstate as tms
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    >>> model(torch.ones(1, 2)).sum().backward()
    >>> opt.step()
    >>> path = os.path.join(tempfile.mkdtemp(), "opt.safetensors")
    >>> tms.save_optimizer(opt, model, path)
    >>> sorted(tms.load(path).to_dict())[:3]
    ['bias.exp_avg', 'bias.exp_avg_sq', 'bias.step']
    """
    trained = _all_params(optimizer)
    # FSDP2: every rank calls; the checks are collective (one error on every rank, nothing
    # written), then rank 0 writes one plain file, gathering one sharded tensor at a time.
    with _distributed.agreement(trained):
        tensors, metadata = _collect(optimizer, ModelState.new(state_or_module))
    specs = [Spec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    group = _distributed.dtensor_group(trained)
    if group is not None:
        _collective.save(path, specs, metadata, tensors, max_shard_size=None, group=group)
        return

    def fill(batch: Sequence[Spec]) -> list[Tensor]:
        out = [torch.empty(s.shape, dtype=s.dtype) for s in batch]
        _kernels.copy_(out, [tensors[s.key] for s in batch])
        return out

    write_checkpoint(path, specs, metadata, fill, max_shard_size=None, budget=_budget.BUDGET)


def _collect(
    optimizer: torch.optim.Optimizer, ms: ModelState
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors to store (by file key; DTensors as they are) and the file's metadata."""
    groups = _named_params(optimizer, ms, "save_optimizer")
    tensors: dict[str, Tensor] = {}
    entry_groups: list[dict[str, Any]] = []
    entry_state: dict[str, dict[str, Any]] = {}
    params: dict[str, list[Any]] = {}
    for g, (group, named) in enumerate(zip(optimizer.param_groups, groups, strict=True)):
        options: dict[str, Any] = {}
        for name, value in group.items():
            if name in ("params", "param_names"):
                continue
            if isinstance(value, Tensor):
                file_key = f"param_groups.{g}.{name}"
                tensors[file_key] = value.detach()
                options[name] = {"tensor": file_key}
            else:
                options[name] = {"value": _json_value(value, f"option `{name}` of group {g}")}
        entry_groups.append({"options": options, "params": [key for key, _ in named]})
        for key, p in named:
            params[key] = [list(p.shape), str(p.dtype).removeprefix("torch.")]
            state = optimizer.state.get(p)
            if not state:
                continue
            record: dict[str, Any] = {}
            for name, value in state.items():
                if not isinstance(name, str):
                    msg = f"save_optimizer: state names must be strings; `{key}` has {name!r}."
                    raise TypeError(msg)
                if isinstance(value, Tensor):
                    file_key = f"{key}.{name}"
                    if file_key in tensors:
                        msg = f"save_optimizer: two tensors would be stored as `{file_key}`."
                        raise ValueError(msg)
                    tensors[file_key] = value.detach()
                    record[name] = {"tensor": file_key}
                else:
                    record[name] = {"value": _json_value(value, f"state `{name}` of `{key}`")}
            entry_state[key] = record
    for file_key, tensor in tensors.items():
        if tensor.is_sparse or tensor.is_meta or tensor.dtype not in CODE:
            msg = (
                f"save_optimizer: `{file_key}` ({tensor.dtype}, {tensor.layout}, on "
                f"{tensor.device}) cannot be stored in safetensors."
            )
            raise TypeError(msg)
    entry = {
        "version": _VERSION,
        "optimizer": type(optimizer).__name__,
        "groups": entry_groups,
        "params": params,
        "state": entry_state,
    }
    return tensors, {"format": "pt", ENTRY: json.dumps(entry, separators=(",", ":"))}


def _corrupt(path: object, problem: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{path}: not a valid optimizer checkpoint: {problem}")


def _mismatch(path: object, problem: str, fix: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(f"{path}: {problem}\n  fix: {fix}")


def _parse(path: object, raw: str | None, stored: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata entry, with every reference to a stored tensor checked."""
    if raw is None:
        msg = (
            f"{path}: the file holds no optimizer state (no `{ENTRY}` metadata).\n"
            "  fix: write it with tms.save_optimizer; load model checkpoints with tms.load"
        )
        raise CheckpointMismatchError(msg)
    try:
        entry = json.loads(raw)
    except ValueError as e:
        raise _corrupt(path, f"the metadata is not JSON ({e})") from None
    if not isinstance(entry, dict) or entry.get("version") != _VERSION:
        raise _corrupt(path, f"unknown metadata version {entry.get('version')!r}")
    try:
        groups = entry["groups"]
        state = entry["state"]
        params = entry["params"]
        assert isinstance(entry["optimizer"], str)
        referenced: set[str] = set()
        for group in groups:
            assert all(isinstance(k, str) for k in group["params"])
            for record in group["options"].values():
                referenced.update(_ref(record))
        for key, record in state.items():
            assert key in params
            for value in record.values():
                referenced.update(_ref(value))
        for shape, dtype in params.values():
            assert all(isinstance(n, int) for n in shape) and isinstance(dtype, str)
    except (AssertionError, KeyError, TypeError, ValueError, AttributeError):
        raise _corrupt(path, "the metadata entry is malformed") from None
    missing = referenced - set(stored)
    extra = set(stored) - referenced
    if missing or extra:
        names = sorted(missing) or sorted(extra)
        what = "missing from" if missing else "not described by the metadata of"
        raise _corrupt(path, f"tensors {what} the file: {', '.join(names[:5])}")
    return entry


def _ref(record: Any) -> list[str]:
    if not isinstance(record, dict) or len(record) != 1:
        raise ValueError
    if "tensor" in record:
        if not isinstance(record["tensor"], str):
            raise ValueError
        return [record["tensor"]]
    if "value" not in record:
        raise ValueError
    return []


def load_optimizer(
    optimizer: torch.optim.Optimizer,
    state_or_module: nn.Module | ModelState | Mapping[str, Any],
    path: str | os.PathLike[str],
) -> None:
    """Load state written by `save_optimizer` into `optimizer`, matching parameters by key.

    The optimizer may be built over a rebuilt model whose parameters come in another order;
    its groups must hold the same keys as the saved ones (in any order within a group). The
    optimizer's class, the groups, every parameter's shape and dtype and the file itself are
    checked before anything changes (`CheckpointMismatchError`, `CheckpointCorruptError`);
    then the group options and the state are restored as ``optimizer.load_state_dict`` does.

    >>> import os, tempfile, torch
    >>> import torch_modelstate as tms
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> model(torch.ones(1, 2)).sum().backward()
    >>> opt.step()
    >>> path = os.path.join(tempfile.mkdtemp(), "opt.safetensors")
    >>> tms.save_optimizer(opt, model, path)
    >>> fresh = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    >>> tms.load_optimizer(fresh, model, path)
    >>> fresh.param_groups[0]["lr"], len(fresh.state)
    (0.1, 2)
    """
    trained = _all_params(optimizer)
    with open_checkpoint(path) as ckpt:
        # FSDP2: every rank calls; if a check fails on one rank, every rank raises it (dist)
        with _distributed.agreement(trained):
            groups = _named_params(optimizer, ModelState.new(state_or_module), "load_optimizer")
            entry = _parse(ckpt.path, ckpt.metadata.get(ENTRY), ckpt.tensors)
            _check_against(ckpt.path, entry, optimizer, groups, ckpt.tensors)
        values = _read(ckpt, entry, optimizer, groups)
    position: dict[str, int] = {}
    for named in groups:
        for key, _ in named:
            position[key] = len(position)
    state = {
        position[key]: {name: _value(r, values) for name, r in record.items()}
        for key, record in entry["state"].items()
    }
    param_groups: list[dict[str, Any]] = []
    for saved, current, named in zip(entry["groups"], optimizer.param_groups, groups, strict=True):
        group = {name: _value(r, values) for name, r in saved["options"].items()}
        for name, value in group.items():
            if isinstance(current.get(name), tuple) and isinstance(value, list):
                group[name] = tuple(value)
        group["params"] = [position[key] for key, _ in named]
        if "param_names" in current:
            group["param_names"] = current["param_names"]
        param_groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _read(
    ckpt: Checkpoint,
    entry: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    groups: list[list[tuple[str, Tensor]]],
) -> dict[str, Tensor]:
    """Every stored tensor; a state tensor of a sharded parameter's shape becomes a DTensor
    laid out like the optimizer's current one (else like the parameter), of which this rank
    reads only its shard's bytes."""
    by_key = {key: p for named in groups for key, p in named}
    sharded: list[tuple[TensorInfo, DTensor]] = []
    for key, record in entry["state"].items():
        p = by_key[key]
        if not isinstance(p, DTensor):
            continue
        current = optimizer.state.get(p, {})
        for name, r in record.items():
            info = ckpt.tensors.get(r.get("tensor", ""))
            if info is None or info.shape != tuple(p.shape):
                continue
            like = current.get(name)
            like = like if isinstance(like, DTensor) and like.shape == p.shape else p
            dst = torch.empty_like(like, dtype=info.torch_dtype)
            assert isinstance(dst, DTensor)  # empty_like keeps the mesh and the placements
            sharded.append((info, dst))
    _collective.read_sharded(ckpt, sharded)
    values: dict[str, Tensor] = {info.key: dst for info, dst in sharded}
    for key, info in ckpt.tensors.items():
        if key not in values:
            values[key] = ckpt.read(info)
    return values


def _value(record: dict[str, Any], values: Mapping[str, Tensor]) -> Any:
    return values[record["tensor"]] if "tensor" in record else record["value"]


def _check_against(
    path: object,
    entry: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    groups: list[list[tuple[str, Tensor]]],
    stored: Mapping[str, TensorInfo],
) -> None:
    """Everything that must agree between the file and the optimizer, before any change."""
    kind = type(optimizer).__name__
    if entry["optimizer"] != kind:
        raise _mismatch(
            path,
            f"the file holds the state of a {entry['optimizer']}, the optimizer is a {kind}.",
            f"build a {entry['optimizer']} to load it into",
        )
    saved_groups = entry["groups"]
    if len(saved_groups) != len(groups):
        raise _mismatch(
            path,
            f"the file has {len(saved_groups)} param groups, the optimizer {len(groups)}.",
            "build the optimizer with the same groups (e.g. the same ms.param_groups rules); "
            "after gradual unfreezing, unfreeze the same stages before loading",
        )
    for g, (saved, named) in enumerate(zip(saved_groups, groups, strict=True)):
        want = set(saved["params"])
        have = {key for key, _ in named}
        if want != have:
            missing = sorted(want - have)
            unexpected = sorted(have - want)
            parts = []
            if missing:
                parts.append(f"missing from the optimizer: {', '.join(missing[:5])}")
            if unexpected:
                parts.append(f"not in the file: {', '.join(unexpected[:5])}")
            raise _mismatch(
                path,
                f"param group {g} holds other parameters than the saved one ({'; '.join(parts)}).",
                "build the optimizer with the same groups over the same model",
            )
    by_key = {key: p for named in groups for key, p in named}
    for key, (shape, dtype) in entry["params"].items():
        p = by_key.get(key)
        if p is None:  # every saved key is in some saved group, checked above
            raise _corrupt(path, f"state for `{key}`, which no saved group holds")
        got = (tuple(p.shape), str(p.dtype).removeprefix("torch."))
        if got != (tuple(shape), dtype):
            raise _mismatch(
                path,
                f"parameter `{key}` was {dtype} {tuple(shape)} when saved, "
                f"the model has {got[1]} {got[0]}.",
                "load into the model the optimizer state was saved with",
            )
    for key, record in entry["state"].items():
        current = optimizer.state.get(by_key[key], {})
        for name, r in record.items():
            have_t = current.get(name)
            if "tensor" in r and isinstance(have_t, Tensor):
                info = stored[r["tensor"]]
                if info.shape != tuple(have_t.shape):
                    raise _mismatch(
                        path,
                        f"state `{name}` of `{key}` has shape {info.shape} in the file, "
                        f"{tuple(have_t.shape)} in the optimizer.",
                        "load into an optimizer of the same configuration",
                    )
