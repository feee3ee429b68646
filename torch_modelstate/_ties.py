"""The rules of weight ties: transforms by name, the checks a tie must pass, its direction.

Every rule about ties lives here, once, and both `ModelState.tie` and checkpoint loading
apply it through `check_tie`:

- both keys exist, and the source is stored (not itself computed by a transform tie);
- they are two different keys; an identity tie that exists already, in either direction,
  is no change;
- the destination is not tied elsewhere and is no source of other ties (no chains);
- in a module only parameters tie; in a standalone state both are parameters or both state;
- the (transformed) source has the destination's shape, dtype and device.

Discovery: one tensor under several keys is an identity tie whose source is the first key
in module order, unless `tie` marked that key as a destination (the user tied it the other
way round, `mark_identity_dest`). The mechanism of transform ties is `_tied_module`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from torch_modelstate._distributed import is_sharded
from torch_modelstate._errors import KeyNotFoundError

__all__ = ["register_transform", "registered_transforms"]

Transform = Callable[[Tensor], Tensor]

_BY_NAME: dict[str, Transform] = {}
_NAME_OF: dict[int, str] = {}
_KEEP: list[object] = []  # keep aliased callables alive so their ids stay unique
IDENTITY_DESTS = "_tms_tied_params"  # names made identity destinations by `tie` (a direction hint)


# --------------------------------------------------------------------------- transforms


def register_transform(name: str, fn: Transform, *, aliases: tuple[object, ...] = ()) -> None:
    """Register `fn` under `name`, so ties using it can be saved in checkpoints.

    `aliases` are other callables that mean the same transform (``torch.Tensor.t`` for
    ``torch.t``); a tie made with any of them is saved under `name`. Names are unique.

    >>> import torch
    >>> def flip_rows(t):
    ...     return t.flip(0)
    >>> register_transform("flip_rows", flip_rows)
    >>> "flip_rows" in registered_transforms()
    True
    """
    if not isinstance(name, str) or not name:
        msg = f"A transform name must be a non-empty string.\n  got: {name!r}"
        raise TypeError(msg)
    if not callable(fn):
        msg = f"Transform {name!r} must be callable.\n  got: {type(fn).__name__} {fn!r}"
        raise TypeError(msg)
    for item in (fn, *aliases):
        other = _NAME_OF.get(id(item))
        if other is not None and other != name:
            msg = (
                f"{item!r} is already registered as the transform {other!r}.\n"
                "  fix: use that name; one callable has one name so checkpoints stay unambiguous"
            )
            raise ValueError(msg)
    known = _BY_NAME.get(name)
    if known is not None and known is not fn:
        msg = (
            f"A different transform is already registered as {name!r}.\n"
            f"  registered: {known!r}\n  got: {fn!r}\n  fix: choose another name"
        )
        raise ValueError(msg)
    _BY_NAME[name] = fn
    for item in (fn, *aliases):
        _KEEP.append(item)
        _NAME_OF[id(item)] = name


def registered_transforms() -> dict[str, Transform]:
    """The registered transforms by name.

    >>> registered_transforms()["transpose"] is torch.t
    True
    """
    return dict(_BY_NAME)


def resolve_transform(transform: str | Transform | None) -> tuple[Transform | None, str | None]:
    """``(callable, name)`` for a tie's `transform`; the name is None for unnamed callables.

    >>> resolve_transform("transpose") == (torch.t, "transpose")
    True
    """
    if transform is None:
        return None, None
    if isinstance(transform, str):
        fn = _BY_NAME.get(transform)
        if fn is None:
            msg = (
                f"Unknown transform {transform!r}.\n"
                f"  expected: one of {sorted(_BY_NAME)}\n"
                "  fix: register it with `torch_modelstate.register_transform(name, fn)`"
            )
            raise ValueError(msg)
        return fn, transform
    if callable(transform):
        return transform, _NAME_OF.get(id(transform))
    msg = (
        "`transform` must be None, a registered name or a callable.\n"
        f"  got: {type(transform).__name__} {transform!r}"
    )
    raise TypeError(msg)


register_transform("transpose", torch.t, aliases=(torch.Tensor.t,))


# --------------------------------------------------------------------------- records


class StoredLike(Protocol):
    """What the rules read of a stored tensor (`_index.Leaf` is one)."""

    @property
    def key(self) -> str: ...
    @property
    def tensor(self) -> Tensor: ...
    @property
    def is_param(self) -> bool: ...
    @property
    def owner(self) -> nn.Module | None: ...


class IndexLike(Protocol):
    """What the rules read of an index (`_index.Index` is one): the rules sit below it."""

    @property
    def by_key(self) -> Mapping[str, StoredLike]: ...
    @property
    def ties(self) -> Mapping[str, Tie]: ...
    def did_you_mean(self, key: str) -> str: ...


@dataclass(eq=False, slots=True)
class Tie:
    """A tie destination: the source's tensor itself, or `fn` applied to it."""

    dest: str
    source: str
    fn: Transform | None
    fn_name: str | None
    owner: nn.Module | None  # the destination's module; None in a standalone state
    name: str


@dataclass(frozen=True, slots=True)
class TieProblem:
    """Why a tie cannot be made: the builtin type to raise, the rule broken, the fix."""

    error: type[Exception]
    text: str  # the rule as it applies here, possibly with "expected/got" lines
    fix: str | None

    def exception(self, verb: str = "tie") -> Exception:
        """The exception to raise, its message starting with `verb`."""
        fix = f"\n  fix: {self.fix}" if self.fix else ""
        return self.error(f"{verb}: {self.text}{fix}")


@dataclass(frozen=True, slots=True)
class TieCheck:
    """The outcome of `check_tie`: a problem, or the root source and whether the tie exists."""

    root: str  # the source's stored key (an identity destination resolves to its source)
    exists: bool  # the tie is already there: nothing to make
    problem: TieProblem | None
    # An identity tie asked for the other way round: one tensor already. `tie` refuses it
    # (the user named a direction); loading accepts it (the file's tie holds as it is).
    reverse: bool = False

    def raise_problem(self, verb: str = "tie") -> None:
        """Raise the problem, if there is one."""
        if self.problem is not None:
            raise self.problem.exception(verb)


def check_tie(
    index: IndexLike, dest: str, source: str, fn: Transform | None, fn_name: str | None = None
) -> TieCheck:
    """Every rule a tie ``dest <- fn(source)`` must pass in `index`; nothing is changed.

    The problem (if any) is returned, not raised, so a caller words it in its own context
    (`ModelState.tie` raises it, checkpoint loading prefixes the file).

    >>> import torch
    >>> from torch_modelstate import ModelState
    >>> index = ModelState.new({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)})._idx()
    >>> check_tie(index, "b", "a", None).problem is None
    True
    >>> print(check_tie(index, "b", "a", torch.t).problem.text)
    the transformed `a` does not fit `b`.
      expected shape: (2, 3)
      got: (3, 2)
    """
    src_leaf = index.by_key.get(source)
    if src_leaf is None:
        return TieCheck(source, False, _missing_or_computed(index, source, "source"))
    root = src_leaf.key

    def problem(error: type[Exception], text: str, fix: str | None = None) -> TieCheck:
        return TieCheck(root, False, TieProblem(error, text, fix))

    if dest not in index.by_key and dest not in index.ties:
        return TieCheck(root, False, _missing_or_computed(index, dest, "destination"))
    if dest == source:
        return problem(
            ValueError,
            f"the destination and the source are the same tensor, `{dest}`.",
            "name two different keys",
        )
    if dest == root:
        if fn is None:  # one tensor already, tied the other way round
            text = (
                f"`{dest}` and `{source}` are the same tensor already (`{source}` is tied to it)."
            )
            fix = f"to turn the tie round, untie({source!r}) first"
            return TieCheck(root, False, TieProblem(ValueError, text, fix), reverse=True)
        return problem(
            ValueError,
            f"`{dest}` and `{source}` are one tensor (an identity tie).",
            f"untie `{source}` first",
        )
    existing = index.ties.get(dest)
    if existing is not None:
        if existing.source == root and _same_transform(existing, fn, fn_name):
            return TieCheck(root, True, None)
        return problem(
            ValueError,
            f"`{dest}` is already tied to {_describe(existing)}.",
            f"call untie({dest!r}) first",
        )
    dependents = sorted(d for d, t in index.ties.items() if t.source == dest)
    if dependents:
        return problem(
            ValueError,
            f"`{dest}` is the source of other ties ({', '.join(dependents)}); "
            "tying it would chain ties.",
            f"untie those first, or tie `{dest}` the other way round",
        )
    dest_leaf = index.by_key[dest]
    if dest_leaf.owner is not None and not (dest_leaf.is_param and src_leaf.is_param):
        which = dest if not dest_leaf.is_param else root
        return problem(
            ValueError, f"`{which}` is a buffer; only parameters can be tied in a module."
        )
    if dest_leaf.is_param != src_leaf.is_param:
        return problem(ValueError, f"`{dest}` and `{root}` must both be parameters or both state.")
    sharded = [k for k, t in ((dest, dest_leaf.tensor), (root, src_leaf.tensor)) if is_sharded(t)]
    if sharded and dest_leaf.owner is not None:
        return problem(
            ValueError,
            f"`{sharded[0]}` is managed by fully_shard (FSDP2, a DTensor); ties are made on the "
            "unsharded model.",
            "tie before calling fully_shard (torch puts tied parameters in one fully_shard group)",
        )
    found = fit_problem(dest, dest_leaf.tensor, root, src_leaf.tensor, fn)
    return TieCheck(root, False, found)


def _same_transform(existing: Tie, fn: Transform | None, fn_name: str | None) -> bool:
    if (existing.fn is None) != (fn is None):
        return False
    return existing.fn is fn or (fn_name is not None and existing.fn_name == fn_name)


def _describe(tie: Tie) -> str:
    if tie.fn is None:
        return f"`{tie.source}`"
    return f"{tie.fn_name or getattr(tie.fn, '__name__', 'a transform')}(`{tie.source}`)"


def fit_problem(
    dest: str, target: Tensor, source: str, src: Tensor, fn: Transform | None
) -> TieProblem | None:
    """Whether the (transformed) source fits the destination in shape, dtype and device."""
    if fn is None:
        shape, dtype, device = src.shape, src.dtype, src.device
        what = f"`{source}`"
    else:
        probed = _probe(fn, src)
        if isinstance(probed, TieProblem):
            return probed
        shape, dtype, device = probed.shape, probed.dtype, probed.device
        what = f"the transformed `{source}`"
    if shape != target.shape:
        fix = None
        if fn is None and tuple(reversed(shape)) == tuple(target.shape):
            fix = "pass transform='transpose'"
        text = (
            f"{what} does not fit `{dest}`.\n"
            f"  expected shape: {tuple(target.shape)}\n  got: {tuple(shape)}"
        )
        return TieProblem(ValueError, text, fix)
    if dtype != target.dtype or device != target.device:
        text = (
            f"{what} and `{dest}` differ in dtype or device.\n"
            f"  expected: {target.dtype} on {target.device}\n  got: {dtype} on {device}"
        )
        return TieProblem(ValueError, text, "move both to one dtype and device with .to() first")
    return None


def _probe(fn: Transform, src: Tensor) -> Tensor | TieProblem:
    """Run `fn` on a meta copy of `src` to learn its shape and dtype without computing."""
    try:
        value = fn(torch.empty_like(src, device="meta"))
        if isinstance(value, Tensor):
            return torch.empty_like(value, device=src.device) if value.is_meta else value
    except Exception:
        pass
    try:
        with torch.no_grad():
            value = fn(src)
    except Exception as err:
        text = (
            f"the transform {getattr(fn, '__name__', fn)!r} fails on the source "
            f"(shape {tuple(src.shape)}, {src.dtype}).\n  got: {type(err).__name__}: {err}"
        )
        return TieProblem(ValueError, text, None)
    if not isinstance(value, Tensor):
        return TieProblem(
            TypeError, f"the transform must return a tensor.\n  got: {type(value).__name__}", None
        )
    return value


def _missing_or_computed(index: IndexLike, key: str, role: str) -> TieProblem:
    tie = index.ties.get(key)
    if tie is not None:
        return TieProblem(
            ValueError,
            f"the {role} `{key}` is itself a transform destination of `{tie.source}`.",
            f"tie to `{tie.source}` directly, or untie `{key}` first",
        )
    return TieProblem(
        KeyNotFoundError, f"unknown {role} key `{key}`.{index.did_you_mean(key)}", None
    )


# --------------------------------------------------------------------------- direction


def mark_identity_dest(owner: nn.Module, name: str, param: nn.Parameter) -> None:
    """Make ``owner.<name>`` the very `param` object, remembered as the tie's destination.

    The same object under two keys is all an identity tie is: optimizers, ``.to()`` and
    ``deepcopy`` see one tensor. The mark keeps the direction the user chose.
    """
    owner.register_parameter(name, param)
    owner.__dict__.setdefault(IDENTITY_DESTS, set()).add(name)


def unmark_identity_dest(owner: nn.Module, name: str, copy: Tensor, requires_grad: bool) -> None:
    """Give ``owner.<name>`` its own tensor `copy` (a parameter if it was one)."""
    owner.__dict__.get(IDENTITY_DESTS, set()).discard(name)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(copy, requires_grad=requires_grad)
    else:
        owner._buffers[name] = copy


def identity_sources(found: Iterable[tuple[str, Tensor, nn.Module | None, str]]) -> dict[int, str]:
    """For each tensor (by id) seen under several keys, the key that is its tie's source.

    `found` is ``(key, tensor, owner, attribute name)`` in module order. The first key is
    the source unless `mark_identity_dest` marked it a destination and a later key is not.
    """
    source_of: dict[int, str] = {}
    hinted_of: dict[int, bool] = {}
    for key, tensor, owner, name in found:
        hinted = owner is not None and name in owner.__dict__.get(IDENTITY_DESTS, ())
        if id(tensor) not in source_of or (hinted_of[id(tensor)] and not hinted):
            source_of[id(tensor)] = key
            hinted_of[id(tensor)] = hinted
    return source_of
