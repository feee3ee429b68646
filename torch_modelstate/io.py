"""Checkpoints: a ModelState (or a module) as safetensors files, and back.

`save` writes a plain safetensors file that any safetensors reader loads, with
``{"format": "pt"}`` in its metadata. Tied data is stored once, under the source's key;
which keys are state, the frozen set and the ties go into one versioned JSON entry of the
metadata, under the key ``"torch_modelstate"``::

    {"version": 1,
     "keys": [every key in state_dict order, tie destinations included],
     "state": [keys of persistent buffers],
     "frozen": [keys of frozen parameters and buffers],
     "ties": {"lm_head.weight": {"source": "embed.weight", "transform": null},
              "dec.weight": {"source": "enc.weight", "transform": "transpose"}}}

A transform is saved by its registered name (`register_transform`) and looked up by name
when loading; nothing from a file is ever evaluated or unpickled, and an unknown name is
an error. Loading reads the ties of files written by ``safetensors.torch.save_model`` too
(it drops aliased keys and records ``{removed: kept}`` in the metadata), and files without
a tie for a key the target ties (``transformers``' ``save_pretrained``) fill that key from
its source.

**Where files go.** Without `max_shard_size`, `path` is the file to write (or an existing
directory to write ``model.safetensors`` into). With it, `path` is a directory (created if
needed) that receives ``model-00001-of-0000N.safetensors`` and
``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``, as
``transformers`` writes it), or a single ``model.safetensors`` when everything fits in one
shard. Writing ``model.safetensors`` or shards into a directory replaces the checkpoint
files (index, ``model.safetensors``, ``model-*-of-*.safetensors``) of an earlier save
there. Every file is written under a temporary name, synced, and renamed into place when
complete, the index last (the old index is removed before the new shards are renamed), so
a crash never leaves a half-written or mixed checkpoint under the final names. Tensors
are written one at a time; only those that are not contiguous CPU tensors are copied,
in batches of at most 64 MB (or one larger tensor).

**Loading into a model** (`load(path, into=model)`) checks the headers of all shards, the
keys, shapes, dtypes and ties against the target *before* writing anything, then streams
tensor by tensor: a contiguous CPU tensor of the file's dtype is read straight into the
parameter's memory by a few threads (no second copy of the model, no mmap pages counted
twice); anything else goes through staging tensors, at most 64 MB at a time (or one
larger tensor), copied to the parameter's device and dtype by one grouped kernel call.
Parameter objects stay the same (optimizers keep working); ties in the file are made in
the target and its frozen flags restored. Only a failing disk (an I/O error in the middle
of the reads) can leave the target partly loaded: everything a file can get wrong is
checked first.

**Dtypes.** As `ModelState.update`, a value is cast to the destination's dtype when both
are of one kind (floating to floating: a bfloat16 file into a float32 model; integer to
integer; complex to complex). Across kinds (floating into an integer buffer, integer into
a float parameter) it is a `CheckpointMismatchError`: such a file was written for another
model.

**strict.** With ``strict=True`` (the default) the file must cover every key of the target
and hold no key the target lacks. With ``strict=False`` the keys both have are loaded,
the target's other keys keep their values, the file's other keys are ignored, and both
lists are logged as a warning on the ``torch_modelstate`` logger; `check` returns them
without loading. Shapes and dtypes must match either way.

**Errors.** A damaged file (empty, truncated, a header that lies about its length, a
corrupted header or ``torch_modelstate`` entry) raises `CheckpointCorruptError`; a sound
file that does not fit the target (keys, shapes, dtypes, ties) `CheckpointMismatchError`.
Both are `CheckpointError`, a `ValueError`, and name the file and the problem; on either
the target is untouched. A missing file is `FileNotFoundError`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from torch_modelstate import _format, _kernels, _tie
from torch_modelstate._errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
)
from torch_modelstate._format import Checkpoint, Spec, TensorInfo
from torch_modelstate._index import Index, Leaf
from torch_modelstate._paths import to_path
from torch_modelstate._state import ModelState

__all__ = ["LoadReport", "average", "check", "load", "save"]

PathLike: TypeAlias = "str | os.PathLike[str]"

METADATA_KEY = "torch_modelstate"
VERSION = 1
_BUDGET = 64 << 20  # bytes staged per grouped copy when a tensor cannot be read in place

logger = logging.getLogger("torch_modelstate")


# --------------------------------------------------------------------------- save


def save(
    state_or_module: nn.Module | ModelState | Mapping[str, Any],
    path: PathLike,
    *,
    max_shard_size: int | str | None = None,
) -> None:
    """Save parameters, state, frozen set and ties as a safetensors checkpoint.

    `state_or_module` is anything `ModelState.new` takes. `path` is the file to write, or
    with `max_shard_size` (bytes, or ``"5GB"``, ``"500MB"``, ``"1GiB"``) a directory for
    the sharded layout (see the module docs). Tensors on any device, non-contiguous ones
    included, are written one at a time. A tie with an unnamed transform is a
    `ValueError`: register the transform with `register_transform` to save it.

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
    limit = None if max_shard_size is None else _format.parse_size(max_shard_size)
    index = ms._idx()
    tensors: dict[str, Tensor] = {}
    specs: list[Spec] = []
    for leaf in index.leaves:
        tensor = leaf.tensor.detach()
        _check_savable(leaf.key, tensor)
        tensors[leaf.key] = tensor
        specs.append(Spec(leaf.key, tensor.dtype, tuple(tensor.shape)))
    entry = _describe(ms, index)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(entry, separators=(",", ":"))}

    def fill(batch: Sequence[Spec]) -> list[Tensor]:
        out: list[Tensor] = []
        dsts: list[Tensor] = []
        srcs: list[Tensor] = []
        for spec in batch:
            tensor = tensors[spec.key]
            if _is_plain_cpu(tensor):
                out.append(tensor)
            else:  # on another device, non-contiguous or a view with a lazy conj/neg bit
                host = torch.empty(spec.shape, dtype=spec.dtype)
                out.append(host)
                dsts.append(host)
                srcs.append(tensor)
        _kernels.copy_(dsts, srcs)
        return out

    _format.write_checkpoint(path, specs, metadata, fill, max_shard_size=limit, budget=_BUDGET)


def _check_savable(key: str, tensor: Tensor) -> None:
    if tensor.dtype not in _format.CODE:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _format.CODE)
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


def _describe(ms: ModelState, index: Index) -> dict[str, Any]:
    """The ``torch_modelstate`` metadata entry; an unnamed transform tie is an error."""
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


def _is_plain_cpu(t: Tensor) -> bool:
    """Whether `t`'s memory holds exactly its values, so it can be read or written as bytes."""
    return (
        t.device.type == "cpu"
        and type(t) in (Tensor, nn.Parameter)
        and t.layout == torch.strided
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
    )


# --------------------------------------------------------------------------- the saved structure


@dataclass(frozen=True, slots=True)
class _Saved:
    """What a file says beyond its tensors: key order, state keys, frozen set and ties."""

    order: list[str]
    state: set[str]
    frozen: set[str] | None  # None: the file does not say (a file written by another tool)
    ties: dict[str, tuple[str, str | None]]
    aliases: bool = False  # the ties come from `save_model`'s {removed: kept} metadata


def _saved(ckpt: Checkpoint) -> _Saved:
    stored = ckpt.tensors
    raw = ckpt.metadata.get(METADATA_KEY)
    for shard in ckpt.shards[1:]:
        if shard.metadata.get(METADATA_KEY) != raw:
            msg = (
                f"{shard.path}: its `{METADATA_KEY}` metadata differs from that of "
                f"{ckpt.shards[0].path.name}: the shards come from different saves."
            )
            raise CheckpointCorruptError(msg)
    if raw is not None:
        return _parse_entry(ckpt.shards[0].path, raw, stored)
    # `safetensors.torch.save_model` drops aliases and records {removed: kept}.
    ties: dict[str, tuple[str, str | None]] = {}
    for key, value in ckpt.metadata.items():
        if key != "format" and key not in stored and value in stored:
            ties[key] = (value, None)
    return _Saved([*sorted(stored), *ties], set(), None, ties, aliases=True)


def _parse_entry(file: Path, raw: str, stored: Mapping[str, TensorInfo]) -> _Saved:
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
    return _Saved(order, set(lists["state"]), set(lists["frozen"]), ties)


def _transform(file: Path, dest: str, name: str | None) -> Callable[[Tensor], Tensor] | None:
    """The registered transform `name` of the tie `dest` (never evaluated from the file)."""
    if name is None:
        return None
    fn = _tie.registered_transforms().get(name)
    if fn is None:
        msg = (
            f"{file}: the tie `{dest}` uses the transform {name!r}, which is not registered here.\n"
            f"  registered: {sorted(_tie.registered_transforms())}\n"
            f"  fix: call torch_modelstate.register_transform({name!r}, fn) before loading"
        )
        raise CheckpointError(msg)
    return fn


# --------------------------------------------------------------------------- load


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What loading a checkpoint into a target does (see `check`); keys in file order."""

    loaded: tuple[str, ...]
    """Keys of the file whose values are written into the target."""
    missing: tuple[str, ...]
    """Keys of the target that the file does not cover (they keep their values)."""
    unexpected: tuple[str, ...]
    """Keys of the file that the target does not have (ignored)."""
    computed: tuple[str, ...]
    """Keys of the file that the target computes from a tie's source (skipped)."""
    cast: tuple[str, ...]
    """Keys whose values are cast to the target's dtype."""
    ties: tuple[str, ...]
    """Tie destinations that loading makes in the target."""


@dataclass(slots=True)
class _Plan:
    ms: ModelState
    saved: _Saved
    writes: list[tuple[TensorInfo, Leaf]]
    ties: list[tuple[str, str, str | None]]
    pairs: list[tuple[TensorInfo, TensorInfo]]
    report: LoadReport


def load(
    path: PathLike, into: nn.Module | ModelState | None = None, *, strict: bool = True
) -> ModelState:
    """Load a checkpoint (a file, a directory or an index): values, frozen set and ties.

    Without `into`, returns a standalone ModelState holding the file's tensors (on the
    CPU, in the file's dtypes). With `into` (a module or a ModelState), loads in place:
    everything is checked first, then tensors are streamed one at a time into the existing
    parameters and buffers, on their devices and in their dtypes, so memory stays near one
    copy of the model and parameter identity is kept; the file's ties are made and its
    frozen flags restored. Returns the ModelState of `into`. See the module docs for
    `strict`, dtypes and errors.

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> import torch_modelstate as tms
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> tms.save(tms.ModelState.new(nn.Linear(2, 2)).freeze("bias"), path)
    >>> model = nn.Linear(2, 2)
    >>> weight = model.weight
    >>> ms = tms.load(path, into=model)
    >>> model.weight is weight, list(ms.frozen_parameters())
    (True, ['bias'])
    """
    if into is not None and not isinstance(into, (nn.Module, ModelState)):
        msg = (
            "`into` must be an nn.Module or a ModelState (or None).\n"
            f"  got: {type(into).__name__}\n"
            "  fix: for a dict of tensors, pass ModelState.new(tensors)"
        )
        raise TypeError(msg)
    with _format.open_checkpoint(path) as ckpt:
        saved = _saved(ckpt)
        if into is None:
            return _load_standalone(ckpt, saved)
        plan = _plan(ckpt, saved, ModelState.new(into), strict)
        _verify_pairs(ckpt, plan.pairs)
        _apply(ckpt, plan)
    report = plan.report
    if report.missing or report.unexpected:
        logger.warning(
            "load %s (strict=False): %d keys missing from the file kept their values: %s; "
            "%d keys of the file not in the target were ignored: %s",
            ckpt.path,
            len(report.missing),
            _some(report.missing),
            len(report.unexpected),
            _some(report.unexpected),
        )
    return plan.ms


def check(path: PathLike, into: nn.Module | ModelState, *, strict: bool = True) -> LoadReport:
    """Check that `load(path, into=into, strict=strict)` would succeed; change nothing.

    Raises the errors `load` would raise, else returns a `LoadReport`: which keys would be
    loaded, cast, skipped, missing or ignored, and which ties made.

    >>> import os, tempfile, torch
    >>> from torch import nn
    >>> import torch_modelstate as tms
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> tms.save({"weight": torch.ones(2, 2)}, path)
    >>> tms.io.check(path, nn.Linear(2, 2), strict=False).missing
    ('bias',)
    """
    with _format.open_checkpoint(path) as ckpt:
        plan = _plan(ckpt, _saved(ckpt), ModelState.new(into), strict)
        _verify_pairs(ckpt, plan.pairs)
    return plan.report


def _load_standalone(ckpt: Checkpoint, saved: _Saved) -> ModelState:
    file = ckpt.path
    for key in saved.order:
        try:
            to_path(key)
        except (TypeError, ValueError):
            msg = f"{file}: the tensor name {key!r} is not a dotted key such as 'fc.weight'."
            raise CheckpointError(msg) from None
    placeholders: dict[str, Tensor] = {}
    for dest, (source, name) in saved.ties.items():
        fn = _transform(file, dest, name)
        info = ckpt.tensors[source]
        like = torch.empty(info.shape, dtype=info.torch_dtype, device="meta")
        try:
            probe = like if fn is None else fn(like)
        except Exception as err:
            msg = f"{file}: the transform {name!r} of the tie `{dest}` fails on `{source}` ({err})."
            raise CheckpointCorruptError(msg) from None
        # Storage-free stand-in of the right shape; `tie` replaces it.
        placeholders[dest] = torch.empty((), dtype=probe.dtype).expand(probe.shape)
    values = {key: torch.empty(i.shape, dtype=i.torch_dtype) for key, i in ckpt.tensors.items()}
    ckpt.read_into([(info, values[key]) for key, info in _file_order(ckpt.tensors.values())])
    entries = {key: values[key] if key in values else placeholders[key] for key in saved.order}
    state = saved.state | {
        dest for dest, (source, _) in saved.ties.items() if source in saved.state
    }
    try:
        return ModelState._from_parts(
            entries, state_keys=state, frozen=saved.frozen or (), ties=saved.ties
        )
    except (KeyError, ValueError, TypeError) as err:
        msg = f"{file}: the checkpoint's ties are inconsistent: {err}"
        raise CheckpointCorruptError(msg) from None


def _file_order(infos: Iterable[TensorInfo]) -> list[tuple[str, TensorInfo]]:
    """Read in file and offset order, so reads are sequential."""
    return [(i.key, i) for i in sorted(infos, key=lambda i: (str(i.file), i.start))]


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "bool" if dtype == torch.bool else "integer"


def _plan(ckpt: Checkpoint, saved: _Saved, ms: ModelState, strict: bool) -> _Plan:
    file = ckpt.path
    index = ms._idx()
    in_target = set(index.order)
    unexpected: list[str] = []
    computed: list[str] = []
    cast: list[str] = []
    new_ties: list[tuple[str, str, str | None]] = []
    for dest, (source, name) in saved.ties.items():
        fn = _transform(file, dest, name)
        if dest not in in_target:
            if not saved.aliases:  # free-form metadata that looks like an alias is no key
                unexpected.append(dest)
            continue
        if source not in in_target:
            continue  # the source is unexpected; `dest` shows up as missing
        if _tie_needed(file, ms, index, dest, source, name, fn):
            new_ties.append((dest, source, name))
    becoming = {dest for dest, _, _ in new_ties}

    problems: list[str] = []
    writes: dict[int, tuple[TensorInfo, Leaf]] = {}
    pairs: list[tuple[TensorInfo, TensorInfo]] = []
    covered: set[str] = set(becoming)
    for key, info in ckpt.tensors.items():
        leaf = index.by_key.get(key)
        if leaf is None:
            (computed if key in index.ties else unexpected).append(key)
            continue
        covered.add(leaf.key)
        target = leaf.tensor
        if info.shape != tuple(target.shape):
            problems.append(
                f"shape mismatch for `{key}`.\n"
                f"  expected (target): {tuple(target.shape)}\n  got (file): {info.shape}"
            )
            continue
        dtype = info.torch_dtype
        if dtype != target.dtype:
            if _kind(dtype) != _kind(target.dtype):
                problems.append(
                    f"dtype mismatch for `{key}`: a {_kind(dtype)} value cannot load into a "
                    f"{_kind(target.dtype)} tensor.\n"
                    f"  expected (target): {target.dtype}\n  got (file): {dtype}"
                )
                continue
            cast.append(key)
        if torch._debug_has_internal_overlap(target) == 1:
            problems.append(
                f"`{key}` in the target has elements that share memory (an expanded "
                "tensor), so values cannot be written into it.\n"
                "  fix: make it a real tensor first, e.g. with .clone()"
            )
            continue
        if target.is_meta:
            problems.append(
                f"`{key}` is on the meta device in the target and has no memory to load into.\n"
                "  fix: materialize the model first, e.g. model.to_empty(device='cpu')"
            )
            continue
        seen = writes.get(id(leaf))
        if seen is None:
            writes[id(leaf)] = (info, leaf)
        else:
            pairs.append((seen[0], info))
    missing = [leaf.key for leaf in index.leaves if leaf.key not in covered]
    if strict and (missing or unexpected):
        msg = (
            f"{file}: the checkpoint's keys do not match the target "
            f"({len(missing)} missing from the file, {len(unexpected)} not in the target).\n"
            + (f"  missing from the file: {_some(missing)}\n" if missing else "")
            + (f"  not in the target: {_some(unexpected)}\n" if unexpected else "")
            + "  fix: load into the model the checkpoint was saved from, or pass strict=False "
            "to load the keys both have"
        )
        raise CheckpointMismatchError(msg)
    if problems:
        more = f"\n  ({len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise CheckpointMismatchError(f"{file}: {problems[0]}{more}")
    report = LoadReport(
        loaded=tuple(info.key for info, _ in writes.values()),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        computed=tuple(computed),
        cast=tuple(cast),
        ties=tuple(dest for dest, _, _ in new_ties),
    )
    return _Plan(ms, saved, list(writes.values()), new_ties, pairs, report)


def _tie_needed(
    file: Path,
    ms: ModelState,
    index: Index,
    dest: str,
    source: str,
    name: str | None,
    fn: Callable[[Tensor], Tensor] | None,
) -> bool:
    """Whether the file's tie must be made in the target; raise if it cannot be."""

    def refuse(problem: str, fix: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            f"{file}: the file ties `{dest}` to {what}, {problem}.\n  fix: {fix}"
        )

    what = f"`{source}`" if name is None else f"{name}(`{source}`)"
    src_leaf = index.by_key.get(source)
    existing = index.ties.get(dest)
    if src_leaf is None:
        raise refuse(
            f"but the target computes `{source}` from a tie of its own", f"untie `{source}` first"
        )
    root = src_leaf.key
    if existing is not None:
        if (
            existing.source == root
            and existing.fn_name == name
            and (existing.fn is None) == (fn is None)
        ):
            return False
        theirs = (
            f"`{existing.source}`"
            if existing.fn is None
            else f"{existing.fn_name}(`{existing.source}`)"
        )
        raise refuse(f"but the target ties it to {theirs}", f"untie `{dest}` in the target first")
    if root == dest:
        if fn is None:
            return False  # one tensor in both, named the other way round
        raise refuse(
            "but they are one tensor in the target", f"untie `{source}` in the target first"
        )
    dependents = sorted(d for d, t in index.ties.items() if t.source == dest)
    if dependents:
        raise refuse(
            f"but `{dest}` is the source of the target's ties ({', '.join(dependents)})",
            "untie those first",
        )
    dest_leaf = index.by_key[dest]
    if ms.module is not None and not (dest_leaf.is_param and src_leaf.is_param):
        raise refuse(
            "but only parameters can be tied in a module", "make both parameters in the target"
        )
    if dest_leaf.is_param != src_leaf.is_param:
        raise refuse("but one is a parameter and the other state in the target", "align the target")
    try:
        _tie._check_compatible(dest, dest_leaf.tensor, root, src_leaf.tensor, fn)
    except (ValueError, TypeError) as err:
        raise refuse("which does not fit the target", str(err).replace("\n", " ")) from None
    return True


def _verify_pairs(ckpt: Checkpoint, pairs: Sequence[tuple[TensorInfo, TensorInfo]]) -> None:
    """A file holding two keys that are one tied tensor in the target must agree on it."""
    for first, second in pairs:
        a, b = ckpt.read(first), ckpt.read(second)
        if not _kernels.same_values(a, b):
            msg = (
                f"{ckpt.path}: `{first.key}` and `{second.key}` hold different values, but they "
                "are one tied tensor in the target.\n"
                f"  fix: untie `{second.key}` in the target before loading"
            )
            raise CheckpointMismatchError(msg)


def _apply(ckpt: Checkpoint, plan: _Plan) -> None:
    ms, saved = plan.ms, plan.saved
    before = ms._frozen_keys(ms._idx()) if saved.frozen is not None else set()
    for dest, source, name in plan.ties:
        ms.tie(dest, source, name)
    _stream(ckpt, [(info, leaf.tensor) for info, leaf in plan.writes])
    if saved.frozen is not None:
        file_key = {leaf.key: info.key for info, leaf in plan.writes}
        wanted = {key for key, fk in file_key.items() if fk in saved.frozen}
        wanted |= {key for key in before if key not in file_key}
        ms._restore_frozen(wanted)


@torch.no_grad()
def _stream(ckpt: Checkpoint, writes: Sequence[tuple[TensorInfo, Tensor]]) -> None:
    """Read each tensor into its destination: in place when it can, else staged and copied.

    A CPU destination of the file's dtype, contiguous, is read into directly (no copy of
    the model in memory). Others (another device, dtype or layout) are read in batches of
    about `_BUDGET` bytes into staging tensors, then copied by one grouped kernel call.
    """
    direct: list[tuple[TensorInfo, Tensor]] = []
    staged: list[tuple[TensorInfo, Tensor]] = []
    for info, dst in sorted(writes, key=lambda w: (str(w[0].file), w[0].start)):
        fits = _is_plain_cpu(dst) and dst.dtype == info.torch_dtype
        (direct if fits else staged).append((info, dst))
    ckpt.read_into(direct)
    # The bytes bypassed autograd: count the writes as copy_ would.
    torch.autograd.graph.increment_version([d for _, d in direct if not d.is_inference()])
    for batch in _batches(staged, _BUDGET):
        temps = [torch.empty(info.shape, dtype=info.torch_dtype) for info, _ in batch]
        ckpt.read_into([(info, temp) for (info, _), temp in zip(batch, temps, strict=True)])
        _kernels.copy_([dst for _, dst in batch], temps)
        del temps


def _batches(
    items: Sequence[tuple[TensorInfo, Tensor]], budget: int
) -> list[list[tuple[TensorInfo, Tensor]]]:
    """Consecutive groups of at most `budget` bytes (or one larger tensor)."""
    batches: list[list[tuple[TensorInfo, Tensor]]] = []
    used = budget
    for item in items:
        if used + item[0].nbytes > budget:
            batches.append([])
            used = 0
        batches[-1].append(item)
        used += item[0].nbytes
    return batches


def _some(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


# --------------------------------------------------------------------------- average


def average(
    inputs: Sequence[PathLike],
    output: PathLike,
    *,
    weights: Sequence[float] | None = None,
    max_shard_size: int | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the weighted average of checkpoints, streamed tensor by tensor.

    Keys, shapes and dtypes of all inputs are checked to agree before anything is
    written. `weights` (uniform by default) are normalised to sum to 1; floating tensors
    are accumulated in float32 (float64 and complex64 in their own dtype) and written in
    their dtype. Integer and bool tensors (counters, masks) are not averaged: they are
    taken from the first input, as are the metadata (state keys, frozen set, ties).
    Memory stays near a few copies of the largest tensor. `output` is as `path` in `save`.
    `progress(done, total)` is called with byte counts as the output is written.
    Returns the file or index written.

    >>> import os, tempfile, torch
    >>> import torch_modelstate as tms
    >>> d = tempfile.mkdtemp()
    >>> a, b, out = (
    ...     os.path.join(d, n) for n in ("a.safetensors", "b.safetensors", "out.safetensors")
    ... )
    >>> tms.save({"w": torch.zeros(2)}, a)
    >>> tms.save({"w": torch.ones(2)}, b)
    >>> _ = tms.io.average([a, b], out, weights=[1, 3])
    >>> tms.load(out).to_dict()["w"]
    tensor([0.7500, 0.7500])
    """
    if not inputs:
        msg = "average: give at least one input checkpoint."
        raise ValueError(msg)
    factors = _normalised(weights, len(inputs))
    limit = None if max_shard_size is None else _format.parse_size(max_shard_size)
    with ExitStack() as stack:
        ckpts = [stack.enter_context(_format.open_checkpoint(p)) for p in inputs]
        first = ckpts[0]
        saved = _saved(first)
        for ckpt in ckpts[1:]:
            _check_same(first, ckpt)
            if _saved(ckpt).ties != saved.ties:
                msg = (
                    f"{ckpt.path}: its ties differ from those of {first.path}; "
                    "averaging them is ambiguous."
                )
                raise CheckpointMismatchError(msg)
        specs = [Spec(key, info.torch_dtype, info.shape) for key, info in first.tensors.items()]
        total = sum(spec.nbytes for spec in specs)
        done = [0]

        def fill(batch: Sequence[Spec]) -> list[Tensor]:
            floats = [s for s in batch if _kind(s.dtype) in ("floating", "complex")]
            accs = [torch.zeros(s.shape, dtype=_accumulator(s.dtype)) for s in floats]
            for ckpt, factor in zip(ckpts, factors, strict=True):
                values = [torch.empty(s.shape, dtype=s.dtype) for s in floats]
                infos = [ckpt.tensors[s.key] for s in floats]
                ckpt.read_into(list(zip(infos, values, strict=True)))
                _kernels.add_(accs, values, factor, "lhs")
                del values
            result = dict(zip((s.key for s in floats), accs, strict=True))
            out: list[Tensor] = []
            dsts: list[Tensor] = []
            srcs: list[Tensor] = []
            for spec in batch:
                acc = result.get(spec.key)
                if acc is None:
                    out.append(first.read(first.tensors[spec.key]))
                elif acc.dtype == spec.dtype:
                    out.append(acc)
                else:
                    out.append(torch.empty(spec.shape, dtype=spec.dtype))
                    dsts.append(out[-1])
                    srcs.append(acc)
            _kernels.copy_(dsts, srcs)
            return out

        def report(nbytes: int) -> None:
            done[0] += nbytes
            if progress is not None:
                progress(done[0], total)

        metadata = {**first.metadata, "format": "pt"}
        if progress is not None:
            progress(0, total)
        return _format.write_checkpoint(
            output, specs, metadata, fill, max_shard_size=limit, budget=_BUDGET, progress=report
        )


def _normalised(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    values = [float(w) for w in weights]
    if len(values) != n:
        msg = f"average: give one weight per input.\n  expected: {n} weights\n  got: {len(values)}"
        raise ValueError(msg)
    total = math.fsum(values)
    if not all(math.isfinite(w) for w in values) or total == 0:
        msg = f"average: the weights must be finite numbers with a non-zero sum.\n  got: {values}"
        raise ValueError(msg)
    return [w / total for w in values]


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float64, torch.complex64) else torch.float32


def _check_same(first: Checkpoint, other: Checkpoint) -> None:
    if list(other.tensors) != list(first.tensors) and set(other.tensors) != set(first.tensors):
        absent = [k for k in first.tensors if k not in other.tensors]
        extra = [k for k in other.tensors if k not in first.tensors]
        msg = (
            f"{other.path}: its keys differ from those of {first.path}.\n"
            + (f"  missing: {_some(absent)}\n" if absent else "")
            + (f"  extra: {_some(extra)}\n" if extra else "")
            + "  fix: average checkpoints of one architecture"
        )
        raise CheckpointMismatchError(msg.rstrip("\n"))
    for key, info in first.tensors.items():
        theirs = other.tensors[key]
        if theirs.shape != info.shape or theirs.dtype != info.dtype:
            msg = (
                f"{other.path}: `{key}` differs from {first.path}.\n"
                f"  expected: {_format.dtype_name(info.dtype)} {info.shape}\n"
                f"  got: {_format.dtype_name(theirs.dtype)} {theirs.shape}"
            )
            raise CheckpointMismatchError(msg)
