"""`describe`: what a checkpoint holds, read from its headers only (the data behind ``inspect``).

Totals of parameters and of state, trainable and not, per dtype and per module, the ties,
and every tensor's key, shape and dtype. One shard of a sharded checkpoint is recognised
(by the save's stamp in its metadata, the name ``model-00001-of-00003.safetensors``, or an
index beside it that lists it)
and described as a file: its own tensors, with the state keys, frozen set and ties that
the checkpoint's index and metadata give for them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch_modelstate._errors import CheckpointError
from torch_modelstate.checkpoint._codec import TensorInfo, dtype_name
from torch_modelstate.checkpoint._entry import METADATA_KEY, Saved, read_entry
from torch_modelstate.checkpoint._files import SHARD_RE, open_checkpoint, read_index, resolve
from torch_modelstate.checkpoint._stamp import Stamp, read_stamp

__all__ = ["describe"]


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready summary of a checkpoint (a file, a directory, an index or one shard).

    >>> import os, tempfile, torch
    >>> import torch_modelstate as tms
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> tms.save({"fc": {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}}, path)
    >>> info = describe(path)
    >>> info["total"]["elements"], info["modules"][0]["name"], info["dtypes"]["float32"]["tensors"]
    (8, 'fc', 2)
    >>> info["shard"] is None, info["tensors"][0]["shape"]
    (True, [2, 3])
    """
    target, index = resolve(path)
    with open_checkpoint(target) as ckpt:
        metadata = dict(ckpt.metadata)
        files = [str(s.path) for s in ckpt.shards]
        infos = dict(ckpt.tensors)
        resolved = str(ckpt.path)
        first = ckpt.shards[0]
        shard = None if index is not None else _shard_of(target, read_stamp(first.path, metadata))
        saved = read_entry(ckpt) if shard is None else _shard_entry(shard, infos)
    result = _summarise(saved, infos)
    return {
        "path": resolved,
        "index": str(index) if index else None,
        "files": files,
        "shard": shard,
        "format": metadata.get("format"),
        "torch_modelstate": _version_of(metadata),
        **result,
    }


# --------------------------------------------------------------------------- shards


def _shard_of(file: Path, stamp: Stamp | None) -> dict[str, Any] | None:
    """What makes `file` one shard of a sharded checkpoint, or None for a whole checkpoint.

    The save's stamp in its metadata says so (``shard i of n``); for files written
    without one, the common shard name, or an index beside it that lists the file.
    """
    match = SHARD_RE.fullmatch(file.name)
    index = None
    for candidate in sorted(file.parent.glob("*.safetensors.index.json")):
        try:
            names = set(read_index(candidate).values()) if candidate.is_file() else set()
        except (CheckpointError, OSError):
            continue  # a damaged index beside it says nothing about this file
        if file.name in names:
            index = candidate
            break
    if stamp is not None and stamp.of is not None:
        number, of = stamp.shard, stamp.of
    elif match is not None:
        number, of = int(match.group(1)), int(match.group(2))
    elif index is not None:
        number, of = None, None
    else:
        return None
    return {"file": file.name, "number": number, "of": of, "index": str(index) if index else None}


def _shard_entry(shard: dict[str, Any], infos: dict[str, TensorInfo]) -> Saved:
    """The whole checkpoint's state keys, frozen set and ties, restricted to this shard.

    Without an index beside the shard (or with a damaged checkpoint) nothing is known
    beyond the tensors.
    """
    unknown = Saved(list(infos), set(), None, {})
    if shard["index"] is None:
        return unknown
    try:
        with open_checkpoint(shard["index"]) as whole:
            saved = read_entry(whole)
    except (CheckpointError, OSError):
        return unknown
    ties = {d: t for d, t in saved.ties.items() if t[0] in infos}
    order = [k for k in saved.order if k in infos or k in ties]
    frozen = None if saved.frozen is None else saved.frozen & set(infos)
    return Saved(order, saved.state & set(infos), frozen, ties)


# --------------------------------------------------------------------------- totals


def _summarise(saved: Saved, infos: dict[str, TensorInfo]) -> dict[str, Any]:
    known = saved.frozen is not None
    frozen = saved.frozen or set()
    tensors: list[dict[str, Any]] = []
    totals = {"tensors": 0, "elements": 0, "bytes": 0}
    kinds: dict[str, dict[str, int]] = {
        name: dict.fromkeys(
            ("tensors", "elements", "bytes", "trainable_elements", "trainable_bytes"), 0
        )
        for name in ("parameters", "state")
    }
    dtypes: dict[str, dict[str, int]] = {}
    modules: dict[str, dict[str, Any]] = {}
    for key in saved.order:
        parts = key.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts))] or [""]
        for prefix in prefixes:
            _module_row(modules, prefix)
        info = infos.get(key)
        if info is None:
            source, transform = saved.ties[key]
            modules[prefixes[-1]]["ties"][parts[-1]] = {"source": source, "transform": transform}
            continue
        kind = "state" if key in saved.state else "parameters"
        is_frozen = key in frozen
        dtype = dtype_name(info.dtype)
        tensors.append(
            {
                "key": key,
                "dtype": dtype,
                "shape": list(info.shape),
                "elements": info.numel,
                "bytes": info.nbytes,
                "kind": "state" if kind == "state" else "parameter",
                "frozen": is_frozen if known else None,
                "file": info.file.name,
            }
        )
        for bucket in (totals, kinds[kind], dtypes.setdefault(dtype, dict.fromkeys(totals, 0))):
            bucket["tensors"] += 1
            bucket["elements"] += info.numel
            bucket["bytes"] += info.nbytes
        if not is_frozen:
            kinds[kind]["trainable_elements"] += info.numel
            kinds[kind]["trainable_bytes"] += info.nbytes
        for prefix in prefixes:
            row = modules[prefix]
            row["tensors"] += 1
            row["elements"] += info.numel
            row["bytes"] += info.nbytes
            row["frozen_tensors"] += is_frozen
            if dtype not in row["dtypes"]:
                row["dtypes"].append(dtype)
    if not known:
        for row in modules.values():
            row["frozen_tensors"] = None
    return {
        "total": totals,
        "parameters": kinds["parameters"],
        "state": kinds["state"],
        "frozen_known": known,
        "dtypes": dtypes,
        "ties": {dest: {"source": s, "transform": t} for dest, (s, t) in saved.ties.items()},
        "modules": list(modules.values()),
        "tensors": tensors,
    }


def _module_row(modules: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    row = modules.get(name)
    if row is None:
        row = modules[name] = {
            "name": name,
            "depth": name.count(".") + 1 if name else 0,
            "tensors": 0,
            "elements": 0,
            "bytes": 0,
            "frozen_tensors": 0,
            "dtypes": [],
            "ties": {},
        }
    return row


def _version_of(metadata: dict[str, str]) -> int | None:
    try:
        version = json.loads(metadata[METADATA_KEY])["version"]
    except (KeyError, ValueError, TypeError):
        return None
    return version if isinstance(version, int) else None
