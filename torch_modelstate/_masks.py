"""Masks: which leaves an operation touches.

Every accepted form (``None``, a callable over list paths, a glob string, a compiled regex, a
list of these, or a combinator) is compiled once into a `Mask`, whose `Mask.select` decides
all leaves in one pass. Glob strings and regexes are merged into one compiled regex, so a
mask over ten thousand leaves costs one ``fullmatch`` per key.

Strictness is a property of the compiled mask: `Mask.unmatched` names the strings written in
it (keys and globs, wherever they sit in lists and combinators) that match none of a model's
keys, and `Mask.check_strict` turns the first of them into a `KeyError` with a "did you mean".
Callables and compiled regexes may select nothing. A leaf can carry *aliases* (the keys of tie
destinations that are this very tensor): a string matches the leaf if it matches its key or
any alias, while a callable sees the leaf's own path only, once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TypeAlias, Union

from torch_modelstate._globs import glob_to_regex, no_match_error

__all__ = ["Aliases", "Mask", "MaskLike", "all_of", "any_of", "compile_mask", "not_"]

MaskLike: TypeAlias = Union[  # a recursive alias needs Union's string forms
    "Mask", str, "re.Pattern[str]", Callable[[list[str]], bool], Sequence["MaskLike"], None
]
# Leaf position -> other keys naming the same tensor (tie destinations).
Aliases: TypeAlias = Mapping[int, Sequence[str]]


class Mask:
    """A compiled predicate over leaves; call it with a path (a list of strings) or a key.

    Masks combine with ``|``, ``&`` and ``~``, and report the strings that match nothing.

    >>> from torch_modelstate import any_of
    >>> mask = any_of("encoder.**", "**.bias") & ~any_of("**.norm.*")
    >>> mask(["encoder", "0", "weight"]), mask("encoder.norm.bias"), mask("head.weight")
    (True, False, False)
    >>> mask.unmatched(["encoder.0.weight", "head.weight"])
    ['**.bias', '**.norm.*']
    """

    __slots__ = ()

    def select(
        self, keys: Sequence[str], paths: Sequence[tuple[str, ...]], aliases: Aliases | None = None
    ) -> list[bool]:
        """Decide every leaf at once; ``keys[i]`` and ``paths[i]`` name the same leaf.

        ``aliases[i]`` lists further keys of leaf ``i`` (tie destinations): a key or glob
        that matches one of them selects the leaf; callables see only ``paths[i]``.
        """
        return [self._one(key, path) for key, path in zip(keys, paths, strict=True)]

    def strings(self) -> list[str]:
        """The key and glob strings written in this mask, in order (regexes left out)."""
        return []

    def unmatched(self, keys: Sequence[str]) -> list[str]:
        """The strings of this mask that match none of `keys`, in order.

        >>> compile_mask(["**.bias", "head.wieght", lambda p: False]).unmatched(["head.bias"])
        ['head.wieght']
        """
        return []

    def check_strict(
        self, keys: Sequence[str], did_you_mean: Callable[[str], str], verb: str
    ) -> None:
        """Raise a `KeyError` naming the first string of the mask that matches no key.

        `did_you_mean` gives the hint line for a string (e.g. `Index.did_you_mean`).

        >>> compile_mask("fc.wieght").check_strict(["fc.weight"], lambda s: "", "freeze")
        Traceback (most recent call last):
        ...
        torch_modelstate._errors.KeyNotFoundError: freeze: the mask 'fc.wieght' matches no key...
        """
        missing = self.unmatched(keys)
        if not missing:
            return
        raise no_match_error(verb, missing[0], did_you_mean(missing[0]))

    def _one(self, key: str, path: tuple[str, ...]) -> bool:
        raise NotImplementedError

    def __call__(self, path: Sequence[str] | str) -> bool:
        if isinstance(path, str):
            key, parts = path, tuple(path.split("."))
        else:
            parts = tuple(path)
            key = ".".join(parts)
        return self._one(key, parts)

    def __or__(self, other: MaskLike) -> Mask:
        return any_of(self, other)

    def __and__(self, other: MaskLike) -> Mask:
        return all_of(self, other)

    def __invert__(self) -> Mask:
        return not_(self)

    def __ror__(self, other: MaskLike) -> Mask:
        return any_of(other, self)

    def __rand__(self, other: MaskLike) -> Mask:
        return all_of(other, self)


class _Everything(Mask):
    """Every leaf; `rest` keeps the other parts of a list it absorbed (``[None, "x"]``), whose
    strings are still checked for strictness."""

    __slots__ = ("_rest",)

    def __init__(self, rest: Sequence[Mask] = ()) -> None:
        self._rest = list(rest)

    def strings(self) -> list[str]:
        return [s for mask in self._rest for s in mask.strings()]

    def unmatched(self, keys: Sequence[str]) -> list[str]:
        return [s for mask in self._rest for s in mask.unmatched(keys)]

    def select(
        self, keys: Sequence[str], paths: Sequence[tuple[str, ...]], aliases: Aliases | None = None
    ) -> list[bool]:
        return [True] * len(keys)

    def _one(self, key: str, path: tuple[str, ...]) -> bool:
        return True

    def __repr__(self) -> str:
        return "Mask(None)"


class _Regex(Mask):
    """Glob strings merged into one alternation, or one compiled regex kept as given.

    Globs translate to group-free, flag-free regexes, so any number of them join into one
    pattern safely. A user's regex may carry flags, named groups or backreferences, so it
    is never joined with anything else.
    """

    __slots__ = ("_parts", "_pattern", "_sources")

    def __init__(self, sources: list[str] | re.Pattern[str]) -> None:
        if isinstance(sources, re.Pattern):
            self._sources: list[str] | re.Pattern[str] = sources
            self._pattern = sources
            self._parts: list[str] = []
            return
        self._sources = sources
        self._parts = [glob_to_regex(s) for s in sources]
        parts = self._parts
        self._pattern = re.compile(parts[0] if len(parts) == 1 else "|".join(parts))

    def select(
        self, keys: Sequence[str], paths: Sequence[tuple[str, ...]], aliases: Aliases | None = None
    ) -> list[bool]:
        fullmatch = self._pattern.fullmatch
        hits = [fullmatch(key) is not None for key in keys]
        if aliases and not isinstance(self._sources, re.Pattern):
            for i, names in aliases.items():
                if not hits[i]:
                    hits[i] = any(map(fullmatch, names))
        return hits

    def strings(self) -> list[str]:
        return [] if isinstance(self._sources, re.Pattern) else list(self._sources)

    def unmatched(self, keys: Sequence[str]) -> list[str]:
        if isinstance(self._sources, re.Pattern):
            return []
        # `filter` runs `fullmatch` from C and stops at the first key that matches.
        return [
            source
            for source, part in zip(self._sources, self._parts, strict=True)
            if next(filter(re.compile(part).fullmatch, keys), None) is None
        ]

    def _one(self, key: str, path: tuple[str, ...]) -> bool:
        return self._pattern.fullmatch(key) is not None

    def __repr__(self) -> str:
        if isinstance(self._sources, re.Pattern):
            return f"Mask({self._sources!r})"
        shown = ", ".join(map(repr, self._sources))
        return f"Mask({shown})" if len(self._sources) == 1 else f"Mask([{shown}])"


class _Callable(Mask):
    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[list[str]], bool]) -> None:
        self._fn = fn

    def _one(self, key: str, path: tuple[str, ...]) -> bool:
        result = self._fn(list(path))
        if result is True or result is False:
            return result
        msg = (
            f"The mask {_name(self._fn)} returned {result!r} for path {list(path)!r}.\n"
            "  expected: True or False\n"
            f"  got: {type(result).__name__}\n"
            "  fix: end the function with `return False` (a `match` needs a `case _:`)"
        )
        raise TypeError(msg)

    def __repr__(self) -> str:
        return f"Mask({_name(self._fn)})"


class _AnyOf(Mask):
    __slots__ = ("_masks",)

    def __init__(self, masks: list[Mask]) -> None:
        self._masks = masks

    def select(
        self, keys: Sequence[str], paths: Sequence[tuple[str, ...]], aliases: Aliases | None = None
    ) -> list[bool]:
        if not self._masks:
            return [False] * len(keys)
        chosen = self._masks[0].select(keys, paths, aliases)
        for mask in self._masks[1:]:
            # Only ask the next mask about leaves not chosen yet: each callable runs at most
            # once per leaf, as with short-circuit `or`.
            rest = [i for i, hit in enumerate(chosen) if not hit]
            if not rest:
                break
            sub = [keys[i] for i in rest], [paths[i] for i in rest], _subset(aliases, rest)
            for i, hit in zip(rest, mask.select(*sub), strict=True):
                chosen[i] = hit
        return chosen

    def strings(self) -> list[str]:
        return [s for mask in self._masks for s in mask.strings()]

    def unmatched(self, keys: Sequence[str]) -> list[str]:
        return [s for mask in self._masks for s in mask.unmatched(keys)]

    def _one(self, key: str, path: tuple[str, ...]) -> bool:
        return any(mask._one(key, path) for mask in self._masks)

    def __repr__(self) -> str:
        return "any_of(" + ", ".join(map(repr, self._masks)) + ")"


class _AllOf(Mask):
    __slots__ = ("_masks",)

    def __init__(self, masks: list[Mask]) -> None:
        self._masks = masks

    def select(
        self, keys: Sequence[str], paths: Sequence[tuple[str, ...]], aliases: Aliases | None = None
    ) -> list[bool]:
        chosen = [True] * len(keys)
        for mask in self._masks:
            rest = [i for i, hit in enumerate(chosen) if hit]
            if not rest:
                break
            sub = [keys[i] for i in rest], [paths[i] for i in rest], _subset(aliases, rest)
            for i, hit in zip(rest, mask.select(*sub), strict=True):
                chosen[i] = hit
        return chosen

    def strings(self) -> list[str]:
        return [s for mask in self._masks for s in mask.strings()]

    def unmatched(self, keys: Sequence[str]) -> list[str]:
        return [s for mask in self._masks for s in mask.unmatched(keys)]

    def _one(self, key: str, path: tuple[str, ...]) -> bool:
        return all(mask._one(key, path) for mask in self._masks)

    def __repr__(self) -> str:
        return "all_of(" + ", ".join(map(repr, self._masks)) + ")"


class _Not(Mask):
    __slots__ = ("_mask",)

    def __init__(self, mask: Mask) -> None:
        self._mask = mask

    def select(
        self, keys: Sequence[str], paths: Sequence[tuple[str, ...]], aliases: Aliases | None = None
    ) -> list[bool]:
        return [not hit for hit in self._mask.select(keys, paths, aliases)]

    def strings(self) -> list[str]:
        return self._mask.strings()

    def unmatched(self, keys: Sequence[str]) -> list[str]:
        return self._mask.unmatched(keys)

    def _one(self, key: str, path: tuple[str, ...]) -> bool:
        return not self._mask._one(key, path)

    def __repr__(self) -> str:
        return f"not_({self._mask!r})"


def compile_mask(mask: MaskLike) -> Mask:
    """Compile any accepted mask form into one `Mask`.

    >>> m = compile_mask(["encoder.**", "**.bias"])
    >>> m(["encoder", "layers", "0", "weight"]), m(["head", "bias"]), m(["head", "weight"])
    (True, True, False)
    """
    if mask is None:
        return _Everything()
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, str):
        return _Regex([mask])
    if isinstance(mask, re.Pattern):
        if not isinstance(mask.pattern, str):
            msg = (
                "A regex mask must be compiled from a str pattern, not bytes: keys are str.\n"
                f"  got: {mask!r}\n  fix: re.compile({mask.pattern.decode(errors='replace')!r})"
            )
            raise TypeError(msg)
        return _Regex(mask)
    if isinstance(mask, (list, tuple)):
        return _combine_any([compile_mask(item) for item in mask])
    if callable(mask) and not isinstance(mask, type):
        return _Callable(mask)
    msg = (
        f"A mask must be None, a glob string, a compiled regex, a callable over paths, "
        f"or a list of these.\n  got: {type(mask).__name__} {mask!r}"
    )
    if isinstance(mask, bool):
        msg += "\n  fix: pass None to select every leaf, or a function returning a bool"
    raise TypeError(msg)


def _combine_any(masks: list[Mask]) -> Mask:
    # Merge every glob/regex into one alternation so string masks cost one match per key.
    sources: list[str] = []
    others: list[Mask] = []
    if any(isinstance(mask, _Everything) for mask in masks):
        rest = [m for mask in masks for m in _parts_of_everything(mask)]
        return _Everything(rest)
    for mask in masks:
        if isinstance(mask, _Regex) and isinstance(mask._sources, list):
            sources.extend(mask._sources)
        elif isinstance(mask, _AnyOf):
            others.extend(mask._masks)
        else:
            others.append(mask)
    merged: list[Mask] = [_Regex(sources)] if sources else []
    merged += others
    return merged[0] if len(merged) == 1 else _AnyOf(merged)


def any_of(*masks: MaskLike) -> Mask:
    """A leaf matches if any of `masks` matches (the same as passing a list).

    >>> any_of("head.*", "**.bias")(["blocks", "0", "bias"])
    True
    """
    return _combine_any([compile_mask(m) for m in masks])


def all_of(*masks: MaskLike) -> Mask:
    """A leaf matches if every one of `masks` matches.

    >>> all_of("blocks.**", "**.weight")(["blocks", "0", "weight"])
    True
    """
    return _AllOf([compile_mask(m) for m in masks])


def not_(mask: MaskLike) -> Mask:
    """A leaf matches if `mask` does not.

    >>> not_("head.**")(["head", "weight"])
    False
    """
    return _Not(compile_mask(mask))


def _parts_of_everything(mask: Mask) -> list[Mask]:
    return mask._rest if isinstance(mask, _Everything) else [mask]


def _subset(aliases: Aliases | None, rest: list[int]) -> Aliases | None:
    """`aliases` renumbered for the leaves at positions `rest` (in that order)."""
    if not aliases:
        return None
    return {j: aliases[i] for j, i in enumerate(rest) if i in aliases}


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
