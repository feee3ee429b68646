"""Keys and paths: the two spellings of one leaf's address, and nested <-> flat dicts.

A *key* is the dotted name that ``state_dict()`` uses (``"encoder.layers.0.weight"``); a
*path* is the same address as a list of strings (``["encoder", "layers", "0", "weight"]``),
which reads well in Python's ``match`` statement. Inside the package a path is a tuple.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["to_flat", "to_key", "to_nested", "to_path"]


def to_path(key: str | Sequence[str]) -> list[str]:
    """Split a dotted key into a path.

    A list or tuple of strings is accepted too (and checked), so functions that take "a
    key or a path" can call this once.

    >>> to_path("encoder.layers.0.weight")
    ['encoder', 'layers', '0', 'weight']
    >>> to_path(["head", "bias"])
    ['head', 'bias']
    """
    if isinstance(key, str):
        if not key:
            msg = (
                "A key must not be empty.\n  expected: a dotted name such as 'fc.weight'\n  got: ''"
            )
            raise ValueError(msg)
        path = key.split(".")
        if "" in path:
            msg = (
                f"Key {key!r} has an empty segment.\n"
                "  expected: segments separated by single dots, such as 'fc.weight'\n"
                f"  got: {key!r}"
            )
            raise ValueError(msg)
        return path
    if isinstance(key, (list, tuple)):
        return list(_check_segments(key))
    msg = (
        "A key must be a dotted string or a list of strings.\n"
        f"  expected: 'fc.weight' or ['fc', 'weight']\n  got: {type(key).__name__} {key!r}"
    )
    raise TypeError(msg)


def to_key(path: str | Sequence[str]) -> str:
    """Join a path into a dotted key (a key is returned unchanged, after a check).

    >>> to_key(["encoder", "layers", "0", "weight"])
    'encoder.layers.0.weight'
    """
    if isinstance(path, str):
        to_path(path)
        return path
    return ".".join(_check_segments(path))


def _check_segments(path: Iterable[object]) -> tuple[str, ...]:
    segments: tuple[Any, ...] = tuple(path)
    if not segments:
        msg = "A path must not be empty.\n  expected: a list of strings such as ['fc', 'weight']"
        raise ValueError(msg)
    for segment in segments:
        if not isinstance(segment, str):
            msg = (
                f"Path {list(segments)!r} holds a {type(segment).__name__}.\n"
                "  expected: every segment a string (write module indices as '0', not 0)\n"
                f"  got: {segment!r}"
            )
            raise TypeError(msg)
        if not segment or "." in segment:
            msg = (
                f"Path {list(segments)!r} has the segment {segment!r}.\n"
                "  expected: non-empty segments without dots\n"
                "  fix: split dotted names with `to_path` first"
            )
            raise ValueError(msg)
    return segments


def to_flat(nested: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten a nested dict ``{"fc": {"weight": w}}`` into ``{"fc.weight": w}``.

    Keys of a flat dict pass through, so a dict that mixes both forms is accepted. Anything
    that is not a mapping is a leaf.

    >>> to_flat({"fc": {"weight": 1, "bias": 2}, "head.weight": 3})
    {'fc.weight': 1, 'fc.bias': 2, 'head.weight': 3}
    """
    flat: dict[str, Any] = {}
    _flatten_into(flat, "", nested)
    return flat


def _flatten_into(flat: dict[str, Any], prefix: str, nested: Mapping[str, Any]) -> None:
    for name, value in nested.items():
        if not isinstance(name, str):
            msg = (
                f"Keys must be strings; under {prefix.rstrip('.') or 'the top level'!r} "
                f"there is the {type(name).__name__} key {name!r}.\n"
                "  fix: write module indices as '0', not 0"
            )
            raise TypeError(msg)
        key = prefix + name
        if isinstance(value, Mapping):
            _flatten_into(flat, key + ".", value)
        elif key in flat:
            msg = (
                f"Key {key!r} is given twice (once nested, once dotted).\n"
                "  fix: give each leaf once"
            )
            raise ValueError(msg)
        else:
            to_path(key)
            flat[key] = value


def to_nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Turn ``{"fc.weight": w}`` into ``{"fc": {"weight": w}}``; the inverse of `to_flat`.

    >>> to_nested({"fc.weight": 1, "fc.bias": 2})
    {'fc': {'weight': 1, 'bias': 2}}
    """
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = to_path(key)
        node = nested
        for depth, segment in enumerate(parents):
            child = node.setdefault(segment, {})
            if not isinstance(child, dict):
                prefix = ".".join(parents[: depth + 1])
                msg = (
                    f"Key {key!r} lies below {prefix!r}, which is itself a leaf.\n"
                    "  fix: a key cannot be both a tensor and a prefix of other keys"
                )
                raise ValueError(msg)
            node = child
        if leaf in node:
            msg = f"Key {key!r} is both a leaf and a prefix of other keys, or given twice."
            raise ValueError(msg)
        node[leaf] = value
    return nested
