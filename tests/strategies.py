"""Shared hypothesis strategies, example modules and helpers for the tests.

Module trees and masks are drawn as *specs*: plain nested tuples that hypothesis prints and
shrinks readably. `build_model` turns a model spec into an ``nn.Module``; `build_mask` turns a
mask spec into one of the mask forms that DESIGN.md accepts, and `reference_select` decides
the same spec with glob semantics written here, independently of the library.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

import torch_modelstate as tms

# --------------------------------------------------------------------------- example modules


class Stat(nn.Module):
    """A custom module with a parameter, persistent buffers (float and integer) and a
    non-persistent one, all updated in place by `forward` in training mode."""

    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("scratch", torch.zeros(n), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.count += 1
            self.mean.mul_(0.5).add_(x.detach().mean(0), alpha=0.5)
            self.scratch.copy_(x.detach().mean(0))
        return x * self.scale


class Custom(nn.Module):
    """A module with arbitrary named parameters and buffers (persistent or not); in
    training mode `forward` adds one to every buffer in place."""

    def __init__(
        self,
        params: Sequence[tuple[str, tuple[int, ...]]] = (),
        buffers: Sequence[tuple[str, tuple[int, ...], torch.dtype, bool]] = (),
    ) -> None:
        super().__init__()
        for name, shape in params:
            self.register_parameter(name, nn.Parameter(torch.randn(shape)))
        for name, shape, dtype, persistent in buffers:
            self.register_buffer(name, torch.zeros(shape, dtype=dtype), persistent=persistent)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            for buffer in self._buffers.values():
                if buffer is not None:
                    buffer.add_(1)
        return x


# --------------------------------------------------------------------------- model trees

_DIGIT_NAMES = st.from_regex(r"[0-9]{1,2}", fullmatch=True)
_WORD_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,4}", fullmatch=True)


def _free(name: str) -> bool:
    # Names that ModuleDict / register_buffer would refuse, because an attribute exists.
    return not hasattr(nn.ModuleDict, name) and not name.startswith("_")


#: Child names for ModuleDicts: words with digits, and all-digit names like "10".
child_names = st.one_of(_WORD_NAMES, _DIGIT_NAMES).filter(_free)
#: Attribute names for parameters and buffers of `Custom`.
leaf_names = _WORD_NAMES.filter(_free)

_SHAPES = st.sampled_from([(), (1,), (2,), (3,), (2, 3), (1, 2, 2)])
_BUFFER_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.int64])
_SIZES = st.integers(1, 3)


@st.composite
def _custom_specs(draw: st.DrawFn) -> tuple[Any, ...]:
    names = draw(st.lists(leaf_names, min_size=1, max_size=4, unique=True))
    n_params = draw(st.integers(0, len(names)))
    params = tuple((name, draw(_SHAPES)) for name in names[:n_params])
    buffers = tuple(
        (name, draw(_SHAPES), draw(_BUFFER_DTYPES), draw(st.booleans()))
        for name in names[n_params:]
    )
    return ("custom", params, buffers)


_leaf_specs = st.one_of(
    st.tuples(st.just("linear"), _SIZES, _SIZES, st.booleans()),
    st.tuples(st.just("bn"), _SIZES),
    st.tuples(st.just("stat"), _SIZES),
    _custom_specs(),
)


def _extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    lists = st.lists(children, max_size=3).map(tuple)
    named = st.lists(
        st.tuples(child_names, children), max_size=3, unique_by=lambda item: item[0]
    ).map(tuple)
    return st.one_of(
        st.tuples(st.just("list"), lists),
        st.tuples(st.just("seq"), lists),
        st.tuples(st.just("dict"), named),
    )


def model_specs(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    """Specs of module trees: nested ModuleList / Sequential / ModuleDict over Linear,
    BatchNorm1d, `Stat` and `Custom` modules (custom persistent and non-persistent buffers,
    integer buffers, keys with digits)."""
    return st.recursive(_leaf_specs, _extend, max_leaves=max_leaves)


def build_model(spec: Any) -> nn.Module:
    """The module a spec from `model_specs` describes (fresh random initial values)."""
    kind = spec[0]
    if kind == "linear":
        return nn.Linear(spec[1], spec[2], bias=spec[3])
    if kind == "bn":
        return nn.BatchNorm1d(spec[1])
    if kind == "stat":
        return Stat(spec[1])
    if kind == "custom":
        return Custom(spec[1], spec[2])
    if kind == "list":
        return nn.ModuleList([build_model(child) for child in spec[1]])
    if kind == "seq":
        return nn.Sequential(*[build_model(child) for child in spec[1]])
    if kind == "dict":
        return nn.ModuleDict({name: build_model(child) for name, child in spec[1]})
    raise AssertionError(spec)


def models(max_leaves: int = 6) -> st.SearchStrategy[nn.Module]:
    """Random module trees (see `model_specs`)."""
    return model_specs(max_leaves).map(build_model)


# --------------------------------------------------------------------------- masks


def last_is(name: str) -> Callable[[list[str]], bool]:
    """A callable mask: the leaf's own name is `name`."""

    def mask(path: list[str]) -> bool:
        return path[-1] == name

    return mask


def depth_is(depth: int) -> Callable[[list[str]], bool]:
    """A callable mask: the path has `depth` segments."""

    def mask(path: list[str]) -> bool:
        return len(path) == depth

    return mask


def contains(segment: str) -> Callable[[list[str]], bool]:
    """A callable mask: some segment is `segment`."""

    def mask(path: list[str]) -> bool:
        return segment in path

    return mask


def match_mask(path: list[str]) -> bool:
    """A callable mask written with Python's `match`, as DESIGN.md shows."""
    match path:
        case [*_, "weight"]:
            return True
        case [first, *_] if first.isdigit():
            return int(first) % 2 == 0
        case [_, "bias"]:
            return True
        case _:
            return False


_CALLABLES: dict[str, Callable[[Any], Callable[[list[str]], bool]]] = {
    "last": last_is,
    "depth": depth_is,
    "contains": contains,
    "match": lambda _: match_mask,
}

_GLOB_SEGMENTS = [
    "**",
    "*",
    "?",
    "??",
    "0",
    "1",
    "10",
    "weight",
    "bias",
    "w*",
    "*t",
    "?0",
    "b?as",
    "running_*",
    "*_*",
    "mean",
    "count",
]


@st.composite
def globs(draw: st.DrawFn, keys: Sequence[str] = ()) -> str:
    """Glob strings: mutations of real keys (segments to `*`, `?`, `**`, partial stars)
    and random globs over a small alphabet of segments."""
    if keys and draw(st.booleans()):
        segments: list[str] = []
        for segment in draw(st.sampled_from(sorted(keys))).split("."):
            how = draw(st.sampled_from(["keep", "keep", "star", "qs", "head", "tail", "dstar"]))
            if how == "keep":
                segments.append(segment)
            elif how == "star":
                segments.append("*")
            elif how == "qs":
                segments.append("?" * len(segment))
            elif how == "head":
                segments.append(segment[:1] + "*")
            elif how == "tail":
                segments.append("*" + segment[-1:])
            else:
                segments.append("**")
            if draw(st.integers(0, 5)) == 0:
                segments.append("**")
        return ".".join(segments)
    parts = draw(st.lists(st.sampled_from(_GLOB_SEGMENTS), min_size=1, max_size=4))
    return ".".join(parts)


@st.composite
def regexes(draw: st.DrawFn, keys: Sequence[str] = ()) -> str:
    """Regex sources (no flags, no backreferences) built from keys or generic ones."""
    templates = [r".*", r"[^.]*\d[^.]*(\..*)?", r".*\.(weight|bias)", r"(\d+\.)*\w+"]
    if keys:
        key = draw(st.sampled_from(sorted(keys)))
        segments = key.split(".")
        cut = draw(st.integers(1, len(segments)))
        templates += [
            re.escape(key),
            re.escape(".".join(segments[:cut])) + r"(\..*)?",
            r".*\.?" + re.escape(segments[-1]),
        ]
    return draw(st.sampled_from(templates))


def _mask_leaves(keys: Sequence[str]) -> st.SearchStrategy[Any]:
    names = sorted({segment for key in keys for segment in key.split(".")}) or ["weight"]
    return st.one_of(
        st.just(("none",)),
        st.tuples(st.just("glob"), globs(keys)),
        st.tuples(st.just("glob"), globs(keys)),
        st.tuples(st.just("regex"), regexes(keys)),
        st.tuples(st.just("fn"), st.just("last"), st.sampled_from(names)),
        st.tuples(st.just("fn"), st.just("depth"), st.integers(1, 4)),
        st.tuples(st.just("fn"), st.just("contains"), st.sampled_from(names)),
        st.just(("fn", "match", None)),
    )


def _mask_extend(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    many = st.lists(inner, max_size=3).map(tuple)
    return st.one_of(
        st.tuples(st.just("list"), many),
        st.tuples(st.just("tuple"), many),
        st.tuples(st.just("any"), many),
        st.tuples(st.just("all"), many),
        st.tuples(st.just("not"), inner),
        st.tuples(st.just("or"), inner, inner),
        st.tuples(st.just("and"), inner, inner),
        st.tuples(st.just("invert"), inner),
    )


def mask_specs(keys: Sequence[str] = ()) -> st.SearchStrategy[Any]:
    """Specs of masks of every form, biased towards the given keys: None, globs with `*`,
    `?` and `**`, compiled regexes, callables over list paths (one with `match`), lists,
    tuples, nested lists, `any_of` / `all_of` / `not_` and `|` / `&` / `~`."""
    return st.recursive(_mask_leaves(keys), _mask_extend, max_leaves=5)


def build_mask(spec: Any) -> Any:
    """The mask form a spec from `mask_specs` describes, as a user would write it."""
    kind = spec[0]
    if kind == "none":
        return None
    if kind == "glob":
        return spec[1]
    if kind == "regex":
        return re.compile(spec[1])
    if kind == "fn":
        return _CALLABLES[spec[1]](spec[2])
    if kind == "list":
        return [build_mask(s) for s in spec[1]]
    if kind == "tuple":
        return tuple(build_mask(s) for s in spec[1])
    if kind == "any":
        return tms.any_of(*[build_mask(s) for s in spec[1]])
    if kind == "all":
        return tms.all_of(*[build_mask(s) for s in spec[1]])
    if kind == "not":
        return tms.not_(build_mask(spec[1]))
    if kind == "or":
        return tms.any_of(build_mask(spec[1])) | build_mask(spec[2])
    if kind == "and":
        return tms.all_of(build_mask(spec[1])) & build_mask(spec[2])
    if kind == "invert":
        return ~tms.any_of(build_mask(spec[1]))
    raise AssertionError(spec)


def segment_matches(pattern: str, text: str) -> bool:
    """Whether one glob segment matches one key segment: `*` any run, `?` one character."""

    @cache
    def go(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(text)
        if pattern[i] == "*":
            return go(i + 1, j) or (j < len(text) and go(i, j + 1))
        if j == len(text):
            return False
        return (pattern[i] == "?" or pattern[i] == text[j]) and go(i + 1, j + 1)

    return go(0, 0)


def reference_glob(glob: str, key: str) -> bool:
    """Glob semantics of DESIGN.md, by dynamic programming over whole segments: `**`
    matches zero or more segments, other segments match one key segment each."""
    pattern = glob.split(".")
    segments = key.split(".")

    @cache
    def go(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(segments)
        if pattern[i] == "**":
            return go(i + 1, j) or (j < len(segments) and go(i, j + 1))
        return j < len(segments) and segment_matches(pattern[i], segments[j]) and go(i + 1, j + 1)

    return go(0, 0)


def reference_select(spec: Any, key: str) -> bool:
    """Decide a mask spec for one key, without the library."""
    kind = spec[0]
    if kind == "none":
        return True
    if kind == "glob":
        return reference_glob(spec[1], key)
    if kind == "regex":
        return re.fullmatch(spec[1], key) is not None
    if kind == "fn":
        return bool(_CALLABLES[spec[1]](spec[2])(key.split(".")))
    if kind in ("list", "tuple", "any"):
        return any(reference_select(s, key) for s in spec[1])
    if kind == "all":
        return all(reference_select(s, key) for s in spec[1])
    if kind in ("not", "invert"):
        return not reference_select(spec[1], key)
    if kind == "or":
        return reference_select(spec[1], key) or reference_select(spec[2], key)
    if kind == "and":
        return reference_select(spec[1], key) and reference_select(spec[2], key)
    raise AssertionError(spec)


# --------------------------------------------------------------------------- helpers


def leaf_keys(model: nn.Module) -> list[str]:
    """Every parameter and persistent-buffer key of `model`, in ``state_dict()`` order."""
    return list(model.state_dict().keys())


def snapshot(model: nn.Module | tms.ModelState) -> dict[str, tuple[Tensor, Tensor, int]]:
    """``{key: (tensor, clone, data_ptr)}`` for every key, to prove nothing changed later."""
    tensors = model.state_dict(keep_vars=True) if isinstance(model, nn.Module) else model.to_dict()
    return {k: (t, t.detach().clone(), t.data_ptr()) for k, t in tensors.items()}


def assert_unchanged(model: nn.Module | tms.ModelState, snap: dict[str, Any]) -> None:
    """Every tensor of `model` is the object it was, at the same address, with its values."""
    now = model.state_dict(keep_vars=True) if isinstance(model, nn.Module) else model.to_dict()
    assert list(now) == list(snap)
    for key, (tensor, clone, ptr) in snap.items():
        assert now[key] is tensor, key
        assert tensor.data_ptr() == ptr, key
        assert torch.equal(tensor.detach(), clone), key
