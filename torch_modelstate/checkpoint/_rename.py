"""`rename=`: the file's keys mapped to the target's before matching, and the hint that finds one.

A rename is a mapping ``{file_key: target_key}`` (keys it does not name keep their names) or
a callable ``file_key -> target_key | None`` (None skips the key). It applies to every key
the file names: stored tensors, tie destinations and sources, the state keys and the frozen
set. Two file keys renamed to one target key are an error naming both.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeAlias

from torch_modelstate._errors import CheckpointMismatchError
from torch_modelstate.checkpoint._codec import TensorInfo
from torch_modelstate.checkpoint._entry import Saved

Rename: TypeAlias = "Mapping[str, str] | Callable[[str], str | None]"

# Prefixes that wrappers add to every key: torch.compile, DDP / DataParallel, Lightning-style
# `self.model`. Prefixes shared by every key of either side are tried too.
COMMON_PREFIXES = ("_orig_mod.", "module.", "model.")


def check_rename(rename: object) -> None:
    """A TypeError unless `rename` is None, a mapping of strings or a callable."""
    if rename is None or callable(rename):
        return
    if isinstance(rename, Mapping):
        for key, value in rename.items():
            if not isinstance(key, str) or not isinstance(value, str):
                msg = (
                    "`rename` as a mapping must map file keys (str) to target keys (str).\n"
                    f"  got: {key!r}: {value!r}\n"
                    "  fix: to skip a key, pass a callable that returns None for it"
                )
                raise TypeError(msg)
        return
    msg = (
        "`rename` must be a mapping {file_key: target_key} or a callable "
        "file_key -> target_key | None.\n"
        f"  got: {type(rename).__name__}\n"
        '  fix: e.g. rename=lambda k: k.removeprefix("module.")'
    )
    raise TypeError(msg)


def apply_rename(
    file: Path,
    saved: Saved,
    tensors: Mapping[str, TensorInfo],
    rename: Rename | None,
    strict: bool,
) -> tuple[Saved, dict[str, TensorInfo]]:
    """The file's metadata and tensors under the target's names (dropped keys left out)."""
    if rename is None:
        return saved, dict(tensors)
    names = list(dict.fromkeys([*saved.order, *tensors]))
    if isinstance(rename, Mapping):
        unknown = [k for k in rename if k not in set(names)]
        if unknown and strict:
            close = difflib.get_close_matches(unknown[0], names, n=3)
            hint = f"\n  did you mean: {', '.join(close)}" if close else ""
            msg = (
                f"{file}: `rename` names `{unknown[0]}`, which the file does not hold "
                f"({len(unknown)} such keys).{hint}\n"
                "  fix: name keys of the file, or pass strict=False to allow this"
            )
            raise CheckpointMismatchError(msg)
        table = dict(rename)

        def by_table(key: str) -> str | None:
            return table.get(key, key)

        fn: Callable[[str], str | None] = by_table
    else:
        fn = rename
    new: dict[str, str | None] = {}
    seen: dict[str, str] = {}
    for key in names:
        value = fn(key)
        if value is not None and not isinstance(value, str):
            msg = (
                f"`rename` maps `{key}` to {value!r}, a {type(value).__name__}.\n"
                "  expected: the target key (str), or None to skip the key"
            )
            raise TypeError(msg)
        if value is not None:
            other = seen.get(value)
            if other is not None:
                msg = (
                    f"{file}: `rename` maps both `{other}` and `{key}` to `{value}`.\n"
                    "  fix: map at most one file key to each target key (None skips a key)"
                )
                raise CheckpointMismatchError(msg)
            seen[value] = key
        new[key] = value

    def keys(items: Iterable[str]) -> list[str]:
        return [v for k in items if (v := new.get(k)) is not None]

    ties: dict[str, tuple[str, str | None]] = {}
    for dest, (source, name) in saved.ties.items():
        d, s = new.get(dest), new.get(source)
        if d is not None and s is not None:
            ties[d] = (s, name)
        elif d is not None and dest not in tensors:  # computed from a skipped source
            msg = (
                f"{file}: `rename` skips `{source}`, the source of the tie `{dest}`, which the "
                "file does not store (it is computed from the source).\n"
                f"  expected: both `{source}` and `{dest}` kept, or both skipped\n"
                f"  got: `{source}` skipped, `{dest}` kept\n"
                "  fix: skip both keys, or keep the source"
            )
            raise CheckpointMismatchError(msg)
    renamed = replace(
        saved,
        order=keys(saved.order),
        state=set(keys(saved.state)),
        frozen=None if saved.frozen is None else set(keys(saved.frozen)),
        ties=ties,
    )
    return renamed, {v: tensors[k] for k in tensors if (v := new.get(k)) is not None}


def prefix_fix(file_keys: Iterable[str], target_keys: Iterable[str]) -> tuple[str, int] | None:
    """``(rename= text, keys it matches)`` when a prefix change matches more keys, else None."""
    files = list(file_keys)
    target = set(target_keys)
    now = len(target.intersection(files))
    best: tuple[int, str, str] | None = None
    for strip in _prefixes(files):
        for add in _prefixes(target):
            if strip == add:
                continue
            matched = sum(
                1 for k in files if k.startswith(strip) and add + k[len(strip) :] in target
            )
            if matched > now and (best is None or matched > best[0]):
                best = (matched, strip, add)
    if best is None:
        return None
    matched, strip, add = best
    body = f"k.removeprefix({json.dumps(strip)})" if strip else "k"
    text = f"rename=lambda k: {json.dumps(add)} + {body}" if add else f"rename=lambda k: {body}"
    return text, matched


def _prefixes(keys: Iterable[str]) -> list[str]:
    """ "" and every dotted prefix shared by all `keys`, and the common wrapper prefixes present."""
    keys = list(keys)
    found = [""]
    if keys:
        first = keys[0].split(".")[:-1]
        for n in range(1, len(first) + 1):
            prefix = ".".join(first[:n]) + "."
            if not all(k.startswith(prefix) for k in keys):
                break
            found.append(prefix)
    found += [p for p in COMMON_PREFIXES if p not in found and any(k.startswith(p) for k in keys)]
    return found
