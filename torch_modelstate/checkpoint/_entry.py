"""The metadata entry: what a checkpoint says beyond its tensors, built and parsed.

One versioned JSON entry under the ``__metadata__`` key ``"torch_modelstate"``::

    {"version": 1,
     "keys": [every key in state_dict order, tie destinations included],
     "state": [keys of persistent buffers],
     "frozen": [keys of frozen parameters and buffers],
     "ties": {"lm_head.weight": {"source": "embed.weight", "transform": null},
              "dec.weight": {"source": "enc.weight", "transform": "transpose"}}}

A transform is saved by its registered name and looked up by name when loading; nothing
from a file is ever evaluated. Files written by ``safetensors.torch.save_model`` (which
drops aliased keys and records ``{removed: kept}`` in the metadata) are read too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from torch_modelstate import _ties
from torch_modelstate._errors import CheckpointCorruptError, CheckpointError
from torch_modelstate._index import Index
from torch_modelstate._state import ModelState
from torch_modelstate.checkpoint._codec import TensorInfo
from torch_modelstate.checkpoint._files import Checkpoint
from torch_modelstate.checkpoint._stamp import read_stamp

METADATA_KEY = "torch_modelstate"
VERSION = 1


@dataclass(frozen=True, slots=True)
class Saved:
    """What a file says beyond its tensors: key order, state keys, frozen set and ties."""

    order: list[str]
    state: set[str]
    frozen: set[str] | None  # None: the file does not say (a file written by another tool)
    ties: dict[str, tuple[str, str | None]]
    aliases: bool = False  # the ties come from `save_model`'s {removed: kept} metadata


def describe(ms: ModelState, index: Index) -> dict[str, Any]:
    """The ``torch_modelstate`` metadata entry; an unnamed transform tie is an error.

    So is a module whose ``state_dict()`` holds entries that are not parameters or buffers
    (see `check_no_extra_state`): the checkpoint would silently lack them.
    """
    check_no_extra_state(ms, index)
    ties: dict[str, dict[str, str | None]] = {}
    for dest, tie in index.ties.items():
        if tie.fn is not None and tie.fn_name is None:
            msg = (
                f"save: the tie `{dest}` <- `{tie.source}` uses a transform with no registered "
                f"name ({tie.fn!r}), which a checkpoint cannot record.\n"
                "  fix: register it with torch_modelstate.register_transform(name, fn) and tie "
                f"with the name, or untie `{dest}` before saving"
            )
            raise ValueError(msg)
        ties[dest] = {"source": tie.source, "transform": tie.fn_name}
    frozen = ms._frozen_keys(index)
    return {
        "version": VERSION,
        "keys": list(index.order),
        "state": [leaf.key for leaf in index.leaves if not leaf.is_param],
        "frozen": [leaf.key for leaf in index.leaves if leaf.key in frozen],
        "ties": ties,
    }


def check_no_extra_state(ms: ModelState, index: Index) -> None:
    """A ValueError naming the state-dict entries of `ms`'s module that are not in `index`.

    Dynamically quantised layers (``quantize_dynamic``: packed weights, ``scale``,
    ``zero_point``), ``get_extra_state`` (``_extra_state``), a custom
    ``_save_to_state_dict`` or a state-dict hook add entries that are neither parameters
    nor persistent buffers. A ModelState views parameters and buffers only, so a
    checkpoint of it would lose them: refuse rather than write it. Only a model with a
    module that could add entries (an overridden ``_save_to_state_dict`` or
    ``get_extra_state``, or a state-dict hook: one pass over the modules) pays for a
    ``state_dict()`` walk that names them.

    >>> import torch
    >>> from torch import nn
    >>> class Counter(nn.Linear):
    ...     def get_extra_state(self):
    ...         return {"steps": 3}
    >>> ms = ModelState.new(Counter(2, 2))
    >>> check_no_extra_state(ms, ms._idx())
    Traceback (most recent call last):
    ValueError: save: the model's state_dict() holds 1 entry that is not parameters or buffers: \
    `_extra_state` (from Counter)...
    """
    module = ms.module
    if module is None or not any(map(_may_add_entries, module.modules())):
        return
    known = set(index.order)
    extra = [key for key in module.state_dict(keep_vars=True) if key not in known]
    if not extra:
        return
    owners: dict[str, str] = {}
    for prefix, sub in module.named_modules():
        owners[prefix + "." if prefix else ""] = _class_name(sub)
    kinds = sorted({owners.get(_owner(key, owners), _class_name(module)) for key in extra})
    shown = ", ".join(f"`{key}`" for key in extra[:8])
    more = f" (and {len(extra) - 8} more)" if len(extra) > 8 else ""
    msg = (
        f"save: the model's state_dict() holds {len(extra)} "
        f"{'entry that is' if len(extra) == 1 else 'entries that are'} not parameters or "
        f"buffers: {shown}{more} (from {', '.join(kinds)}). A checkpoint stores parameters "
        "and buffers only, so these would be lost (quantised weights, get_extra_state, a "
        "custom _save_to_state_dict or a state-dict hook).\n"
        "  fix: save such a model with the tool that made it (e.g. torch.save of its "
        "state_dict() for quantised models), or convert it to plain parameters first"
    )
    raise ValueError(msg)


def _may_add_entries(module: nn.Module) -> bool:
    """Whether `module`'s own ``state_dict()`` entries may be more than its tensors."""
    cls = type(module)
    return (
        cls._save_to_state_dict is not nn.Module._save_to_state_dict
        or cls.get_extra_state is not nn.Module.get_extra_state
        or bool(module._state_dict_hooks)
        or bool(module._state_dict_pre_hooks)
    )


def _class_name(module: nn.Module) -> str:
    """The name a module prints as (``DynamicQuantizedLinear``, not its class ``Linear``)."""
    name: str = module._get_name()  # type: ignore[no-untyped-call]
    return name


def _owner(key: str, owners: Mapping[str, str]) -> str:
    """The prefix of the deepest module that holds `key`."""
    parts = key.split(".")
    for n in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:n]) + "." if n else ""
        if prefix in owners:
            return prefix
    return ""


def read_entry(ckpt: Checkpoint) -> Saved:
    """The checked metadata entry of an open checkpoint (every shard must carry the same).

    One shard of a sharded save, opened on its own, is refused with the way to load it.
    """
    stored = ckpt.tensors
    if ckpt.index is None and ckpt.shards:
        stamp = read_stamp(ckpt.path, ckpt.metadata)
        if stamp is not None and stamp.shard is not None and (stamp.of or 0) > 1:
            msg = (
                f"{ckpt.path}: this file is shard {stamp.shard} of {stamp.of} of a sharded "
                "checkpoint; it holds only part of the model.\n"
                f"  fix: load its directory ({ckpt.path.parent}) or its index "
                "(model.safetensors.index.json)"
            )
            raise CheckpointError(msg)
    raw = ckpt.metadata.get(METADATA_KEY)
    for shard in ckpt.shards[1:]:
        if shard.metadata.get(METADATA_KEY) != raw:
            msg = (
                f"{shard.path}: its `{METADATA_KEY}` metadata differs from that of "
                f"{ckpt.shards[0].path.name}: the shards come from different saves."
            )
            raise CheckpointCorruptError(msg)
    if raw is not None:
        return parse_entry(ckpt.shards[0].path, raw, stored)
    # `safetensors.torch.save_model` drops aliases and records {removed: kept}.
    ties: dict[str, tuple[str, str | None]] = {}
    for key, value in ckpt.metadata.items():
        if key != "format" and key not in stored and value in stored:
            ties[key] = (value, None)
    return Saved([*sorted(stored), *ties], set(), None, ties, aliases=True)


def parse_entry(file: Path, raw: str, stored: Mapping[str, TensorInfo]) -> Saved:
    """Parse and check the entry `raw` of `file` against the tensors it stores."""

    def bad(problem: str) -> CheckpointCorruptError:
        msg = (
            f"{file}: the `{METADATA_KEY}` metadata entry is malformed: {problem}.\n"
            "  fix: re-save the checkpoint; to read its tensors alone, use safetensors.safe_open"
        )
        return CheckpointCorruptError(msg)

    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise bad(f"it is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise bad(f"expected a JSON object, got {type(data).__name__}")
    version = data.get("version")
    if type(version) is not int or version < 1:
        raise bad(f"expected a positive integer `version`, got {version!r}")
    if version > VERSION:
        msg = (
            f"{file}: the checkpoint was written by a newer torch_modelstate "
            f"(metadata version {version}; this one reads version {VERSION}).\n"
            "  fix: upgrade torch_modelstate"
        )
        raise CheckpointError(msg)
    lists: dict[str, list[str]] = {}
    for name in ("keys", "state", "frozen"):
        value = data.get(name)
        if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
            raise bad(f"`{name}` must be a list of keys")
        lists[name] = value
    raw_ties = data.get("ties")
    if not isinstance(raw_ties, dict):
        raise bad("`ties` must be an object")
    ties: dict[str, tuple[str, str | None]] = {}
    for dest, tie in raw_ties.items():
        source = tie.get("source") if isinstance(tie, dict) else None
        transform = tie.get("transform") if isinstance(tie, dict) else None
        if not isinstance(source, str) or not (transform is None or isinstance(transform, str)):
            raise bad(f'the tie `{dest}` must be {{"source": key, "transform": name or null}}')
        if source not in stored:
            raise bad(f"the tie `{dest}` names the source `{source}`, which the file does not hold")
        if dest in stored:
            raise bad(f"the tie destination `{dest}` is also stored as a tensor")
        ties[dest] = (source, transform)
    order = lists["keys"]
    if len(set(order)) != len(order) or set(order) != set(stored) | set(ties):
        extra = sorted(set(order) - set(stored) - set(ties))
        absent = sorted((set(stored) | set(ties)) - set(order))
        raise bad(
            "`keys` does not list the stored tensors and tie destinations "
            f"(extra: {extra}, absent: {absent})"
        )
    for name in ("state", "frozen"):
        unknown = [k for k in lists[name] if k not in stored]
        if unknown:
            raise bad(f"`{name}` lists `{unknown[0]}`, which the file does not hold")
    return Saved(order, set(lists["state"]), set(lists["frozen"]), ties)


def transform(file: Path, dest: str, name: str | None) -> Callable[[Tensor], Tensor] | None:
    """The registered transform `name` of the tie `dest` (never evaluated from the file)."""
    if name is None:
        return None
    fn = _ties.registered_transforms().get(name)
    if fn is None:
        msg = (
            f"{file}: the tie `{dest}` uses the transform {name!r}, which is not registered here.\n"
            f"  registered: {sorted(_ties.registered_transforms())}\n"
            f"  fix: call torch_modelstate.register_transform({name!r}, fn) before loading"
        )
        raise CheckpointError(msg)
    return fn
