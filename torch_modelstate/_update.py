"""Gathering and checking the values of `update` and `merge`: everything before the write.

Both run in three steps, so that a model is never left half-written:

1. **gather** pairs each destination tensor with its new value (its *source*), by key;
2. **check** runs every rule a write could break, as C-level passes over all pairs
   (``map`` over ``Tensor`` methods, sets of dtypes and layouts), with a per-key loop only
   to word the error once a pass has found one;
3. a `Plan` holds the checked pairs, and `Plan.apply` hands them to `_kernels` in one call.

The checks themselves live in `_writable` (what can be written in place); here is the
gathering, the tie rules (one value per tied tensor, transform destinations computed), and
running a plain merge function on every tensor before anything is written.

>>> import torch
>>> from torch_modelstate._index import index_entries
>>> index = index_entries([("w", torch.zeros(2))], set())
>>> plan = plan_update(index, {"w": torch.ones(2)}, None, lambda leaf: False)
>>> plan.keys
['w']
>>> plan.apply()
>>> index.by_key["w"].tensor
tensor([1., 1.])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from itertools import repeat
from operator import attrgetter
from typing import Any, NoReturn, TypeAlias

import torch
from torch import Tensor, nn

from torch_modelstate import _distributed, _kernels, _known
from torch_modelstate._errors import KeyNotFoundError
from torch_modelstate._index import Index, Leaf
from torch_modelstate._kernels import Prepared
from torch_modelstate._paths import to_flat
from torch_modelstate._writable import (
    check_arithmetic,
    check_destinations,
    check_shapes,
    check_values,
)
from torch_modelstate.merges import Merge

__all__ = ["Plan", "plan_merge", "plan_update", "raise_unknown"]

MergeFn: TypeAlias = Callable[[list[str], Tensor, Tensor], Tensor]
Values: TypeAlias = "Mapping[str, Any] | Index"

_TENSOR = attrgetter("tensor")
_PLAIN_DICTS = (dict, OrderedDict)  # what `state_dict()` returns; a subclass may override items


class Plan:
    """Checked (destination, value) pairs, and the kernel that writes them.

    Built by `plan_update` or `plan_merge` once every check has passed; `apply` is the only
    step that writes. ``merge`` is the named merge whose grouped kernel runs, or None for a
    copy.
    """

    __slots__ = ("dsts", "keys", "merge", "prepared", "srcs")

    def __init__(
        self,
        keys: list[str],
        dsts: list[Tensor],
        srcs: list[Tensor],
        prepared: Prepared | None = None,
        *,
        merge: Merge | None = None,
    ) -> None:
        self.keys = keys
        self.dsts = dsts
        self.srcs = srcs
        self.merge = merge
        self.prepared = prepared  # what kept facts proved, for the kernels to skip

    def apply(self) -> None:
        """Write every pair: one grouped kernel call."""
        if self.merge is None:
            _kernels.copy_(self.dsts, self.srcs, self.prepared)
        elif self.prepared is None:
            self.merge.apply_(self.dsts, self.srcs)
        else:
            self.merge.apply_prepared_(self.dsts, self.srcs, self.prepared)

    def __repr__(self) -> str:
        how = "copy" if self.merge is None else repr(self.merge)
        return f"Plan({len(self.keys)} tensors, {how})"


# --------------------------------------------------------------------------- update


def plan_update(
    index: Index,
    updated_parameters: Values,
    updated_state: Values | None,
    is_frozen: Callable[[Leaf], bool],
    module: nn.Module | None = None,
) -> Plan:
    """Gather and check the pairs of ``update(updated_parameters, updated_state)``.

    Index arguments stand for ModelStates (their stored tensors; only their state when
    given as `updated_state`). Frozen state in `updated_state` is skipped.

    A dict with the keys of the last update, and values shaped as its values were, is
    checked from kept facts (`_known`): only the aliasing of the new values is looked at.
    """
    plain_dict = updated_state is None and type(updated_parameters) in _PLAIN_DICTS
    if plain_dict:
        assert isinstance(updated_parameters, dict)
        known = _known.update(index, updated_parameters, module)
        if known is not None:
            return Plan(*known)
    plan = _plan_update(index, updated_parameters, updated_state, is_frozen, module)
    if plain_dict:
        assert isinstance(updated_parameters, dict)
        _known.keep_update(index, updated_parameters, plan.keys, plan.dsts, plan.srcs)
    return plan


def _plan_update(
    index: Index,
    updated_parameters: Values,
    updated_state: Values | None,
    is_frozen: Callable[[Leaf], bool],
    module: nn.Module | None,
) -> Plan:
    keys: list[str] = []
    dsts: list[Tensor] = []
    srcs: list[Tensor] = []
    # Over a sharded model every rank validates, and if one fails all raise the same error
    # before any rank writes. The decision hangs on the model's tensors, alike on all ranks.
    sharded = _distributed.any_dtensor(map(_TENSOR, index.leaves))
    model = list(map(_TENSOR, index.leaves)) if sharded else []
    with _distributed.agreement(model) if sharded else nullcontext():
        _distributed.check_sharded(module, "update")
        values = _as_values(updated_parameters, "updated_parameters")
        _gather(index, values, keys, dsts, srcs, None)
        if updated_state is not None:
            values = _as_values(updated_state, "updated_state", state_only=True)
            _gather(index, values, keys, dsts, srcs, is_frozen)
        check_destinations("update", keys, dsts)
        if index.ties or updated_state is not None:
            keys, dsts, srcs = _dedupe(keys, dsts, srcs)
    return Plan(keys, dsts, srcs)


def _as_values(obj: Values, name: str, *, state_only: bool = False) -> Mapping[str, Any]:
    if isinstance(obj, Index):
        return {leaf.key: leaf.tensor for leaf in obj.leaves if not (state_only and leaf.is_param)}
    if isinstance(obj, Mapping):
        return obj  # nested dicts are flattened by `_gather` when it meets one
    msg = (
        f"`{name}` must be a dict of tensors (flat or nested) or a ModelState.\n"
        f"  got: {type(obj).__name__}"
    )
    raise TypeError(msg)


def _gather(
    index: Index,
    values: Mapping[str, Any],
    keys: list[str],
    dsts: list[Tensor],
    srcs: list[Tensor],
    state_of: Callable[[Leaf], bool] | None,
) -> None:
    """Pair each value with its destination and check the values (`state_of`: the
    frozen test, given for `updated_state`, whose frozen state is skipped)."""
    names = list(values)
    given = list(values.values())
    all_tensors = all(map(isinstance, given, repeat(Tensor)))
    if not all_tensors and any(isinstance(value, Mapping) for value in given):
        _gather(index, to_flat(values), keys, dsts, srcs, state_of)
        return
    leaves = list(map(index.by_key.get, names))
    if None in leaves:
        names, given, leaves = _drop_computed(index, values, names, given, leaves)
    if not all_tensors:
        key, value = next(
            (k, v) for k, v in zip(names, given, strict=True) if not isinstance(v, Tensor)
        )
        msg = (
            f"update: the value for `{key}` is not a tensor.\n"
            f"  expected: a Tensor of shape {tuple(index.by_key[key].tensor.shape)}\n"
            f"  got: {type(value).__name__}"
        )
        raise TypeError(msg)
    targets: list[Tensor] = list(map(_TENSOR, leaves))
    check_values("update", names, given, targets)
    if state_of is None:
        dsts += targets
        srcs += given
        keys += names
        return
    for key, value, leaf in zip(names, given, leaves, strict=True):
        assert leaf is not None
        if leaf.is_param:
            msg = (
                f"update: `{key}` is a parameter, given in `updated_state`.\n"
                "  fix: pass parameters in the first argument"
            )
            raise KeyNotFoundError(msg)
        if not state_of(leaf):
            dsts.append(leaf.tensor)
            srcs.append(value)
            keys.append(key)


# --------------------------------------------------------------------------- merge


def plan_merge(
    index: Index, other: Index, fun: MergeFn | Merge, module: nn.Module | None = None
) -> Plan:
    """Gather and check the pairs of ``merge(other, fun)``; a plain `fun` runs here, on
    every tensor, and its results are checked before the plan is returned. `module` is the
    model `index` views (None for a standalone state). Over a sharded state the checks are
    collective (one all-reduce of a flag): if `fun` or a check fails on one rank, every rank
    raises and none writes.

    Between the same two views again (an EMA step), the checks' findings are kept
    (`_facts`): revalidated in C-level passes, they stand in for the checks and the kernels'
    own grouping, and only what depends on `fun` runs again."""
    if isinstance(fun, Merge):
        known = _known.merge(index, other, fun, module)
        if known is not None:
            return Plan(index.keys, *known, merge=fun)
    model = list(map(_TENSOR, index.leaves))
    with _distributed.agreement(model) if _distributed.any_dtensor(model) else nullcontext():
        plan = _plan_merge(index, other, fun, module, model)
    if isinstance(fun, Merge) and plan.keys is index.keys and other.keys == index.keys:
        _known.keep_merge(index, other)
    return plan


def _plan_merge(
    index: Index,
    other: Index,
    fun: MergeFn | Merge,
    module: nn.Module | None,
    model: list[Tensor],
) -> Plan:
    """`model`: the tensors of ``index.leaves``, in order (one pass, shared with the caller)."""
    _distributed.check_sharded(module, "merge")
    found = list(map(other.by_key.get, index.keys))
    if None in found:
        # Some keys are missing in rhs or computed there (transform ties): resolve each.
        # (An identity tie's destination is in `by_key`, so `found` already resolves it.)
        pairs = [(leaf, other.resolve(leaf.key)) for leaf in index.leaves]
        kept = [(leaf, value) for leaf, value in pairs if value is not None]
        leaves = [leaf for leaf, _ in kept]
        rhs: list[Tensor] = [value for _, value in kept]
    else:
        leaves = index.leaves
        rhs = list(map(_TENSOR, found))
    keys = [leaf.key for leaf in leaves] if leaves is not index.leaves else index.keys
    lhs: list[Tensor] = model if leaves is index.leaves else list(map(_TENSOR, leaves))
    dtypes = check_destinations("merge", keys, lhs)
    if isinstance(fun, Merge):
        check_values("merge", keys, rhs, lhs, side="rhs", target_dtypes=dtypes)
        check_arithmetic(keys, lhs, fun, dtypes)
        return Plan(keys, lhs, rhs, merge=fun)
    if not callable(fun):
        msg = f"`fun` must be callable as fun(path, lhs, rhs).\n  got: {type(fun).__name__}"
        raise TypeError(msg)
    # A plain `fun` gets rhs as it is (it may handle a sparse or complex one itself); its
    # results are what is written, so they get the full checks.
    check_shapes("merge", keys, rhs, lhs, side="rhs")
    results: list[Any] = []
    with torch.no_grad():
        for leaf, lhs_t, rhs_t in zip(leaves, lhs, rhs, strict=True):
            results.append(fun(list(leaf.path), lhs_t, rhs_t))
    if not all(map(isinstance, results, repeat(Tensor))):
        key, result = next(
            (k, r) for k, r in zip(keys, results, strict=True) if not isinstance(r, Tensor)
        )
        msg = (
            f"merge: `fun` must return a tensor of the lhs shape; for `{key}`\n"
            f"  expected: a Tensor of shape {tuple(index.by_key[key].tensor.shape)}\n"
            f"  got: {type(result).__name__}"
        )
        raise TypeError(msg)
    check_values("merge", keys, results, lhs, side="result of `fun`", target_dtypes=dtypes)
    return Plan(keys, lhs, results)


# --------------------------------------------------------------------------- helpers


def _dedupe(
    keys: list[str], dsts: list[Tensor], srcs: list[Tensor]
) -> tuple[list[str], list[Tensor], list[Tensor]]:
    """Write each tied tensor once; two different values for it are an error."""
    first: dict[int, int] = {}
    out_k: list[str] = []
    out_d: list[Tensor] = []
    out_s: list[Tensor] = []
    for dst, src, key in zip(dsts, srcs, keys, strict=True):
        seen = first.get(id(dst))
        if seen is None:
            first[id(dst)] = len(out_d)
            out_k.append(key)
            out_d.append(dst)
            out_s.append(src)
        elif not _kernels.same_values(out_s[seen], src):
            other = out_k[seen]
            if other == key:
                msg = (
                    f"update: `{key}` is given in both arguments, with different values.\n"
                    "  fix: give it once"
                )
            else:
                msg = (
                    f"update: `{other}` and `{key}` are one tied tensor but were given "
                    "different values.\n"
                    "  fix: give one value (the source key is enough), or untie them first"
                )
            raise ValueError(msg)
    return out_k, out_d, out_s


def _drop_computed(
    index: Index,
    values: Mapping[str, Any],
    names: list[str],
    given: list[Any],
    leaves: list[Leaf | None],
) -> tuple[list[str], list[Any], list[Leaf | None]]:
    """Leave out values for transform destinations that agree with their source.

    ``ms.update(model.state_dict())`` on a transform-tied model gives the destination's
    computed value too; it is skipped when it equals the transform of the source's new (or
    current) value, and refused when it does not: one tensor cannot take two values.
    Any other unknown key is a `KeyError`.
    """
    kept_names: list[str] = []
    kept_given: list[Any] = []
    kept_leaves: list[Leaf | None] = []
    for key, value, leaf in zip(names, given, leaves, strict=True):
        if leaf is not None:
            kept_names.append(key)
            kept_given.append(value)
            kept_leaves.append(leaf)
            continue
        tie = index.ties.get(key)
        if tie is None or tie.fn is None:
            raise_unknown(index, key, "update")
        source = values.get(tie.source, index.by_key[tie.source].tensor)
        agrees = False
        if isinstance(value, Tensor) and isinstance(source, Tensor):
            with torch.no_grad():
                agrees = _kernels.same_values(value, tie.fn(source))
        if not agrees:
            name = tie.fn_name or getattr(tie.fn, "__name__", "transform")
            msg = (
                f"update: `{key}` is computed from `{tie.source}` (a transform tie, "
                f"{name}), and the value given for it is not {name}(`{tie.source}`).\n"
                f"  fix: leave `{key}` out and write `{tie.source}`, or untie it first"
            )
            raise ValueError(msg)
    return kept_names, kept_given, kept_leaves


def raise_unknown(index: Index, key: str, verb: str) -> NoReturn:
    """Raise the error for a key that names no stored tensor (a KeyError with a hint)."""
    tie = index.ties.get(key)
    if tie is not None:
        msg = (
            f"{verb}: `{key}` is computed from `{tie.source}` (a transform tie) "
            "and takes no value.\n"
            f"  fix: leave `{key}` out and write `{tie.source}`, or untie it first"
        )
        raise ValueError(msg)
    hint = index.did_you_mean(key)
    msg = f"{verb}: unknown key `{key}`; the model has no such parameter or state.{hint}"
    raise KeyNotFoundError(msg)
