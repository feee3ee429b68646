"""Plans from kept facts: an update or merge repeated between the same views, unchecked.

The first time an index is planned for, `_update` runs every check; the second time it also
keeps what they found (`Index.keep_facts`, `_facts.Facts`). From then on, while the facts
hold, a repeated merge (an EMA step) or an update with the same keys reuses them:

- **merge** between the same two views (same keys in the same order): the destination
  checks, the value checks, the storage that the two sides keep apart and the kernels'
  float / other split all stand. Only the check that depends on the merge function
  (arithmetic for its dtypes) runs again.
- **update** from a dict with the keys of the last update: the destinations and their
  checks stand; the new values are checked against a guard of the last values' dtype,
  device, shape and strides (what `check_values` looks at), and for memory they share with
  a destination (always: values are new tensors each time).

Anything that does not match returns None, and the full checks run.

>>> import torch
>>> from torch_modelstate._index import index_entries
>>> index = index_entries([("w", torch.zeros(2))], set())
>>> update(index, {"w": torch.ones(2)}, None) is None  # nothing kept yet
True
"""

from __future__ import annotations

from itertools import compress
from operator import attrgetter, is_
from typing import TypeAlias

from torch import Tensor, nn

from torch_modelstate import _distributed
from torch_modelstate._facts import KeptUpdate, PairFacts
from torch_modelstate._guard import Guard, plain
from torch_modelstate._index import Index
from torch_modelstate._kernels import Prepared
from torch_modelstate._memory import owned_starts
from torch_modelstate._writable import check_arithmetic
from torch_modelstate.merges import Merge

__all__ = ["keep_merge", "keep_update", "merge", "update"]

_IS_CPU = attrgetter("is_cpu")

Pairs: TypeAlias = "tuple[list[Tensor], list[Tensor], Prepared | None]"


def merge(index: Index, other: Index, fun: Merge, module: nn.Module | None) -> Pairs | None:
    """(lhs, rhs, prepared) of a merge between two views whose kept facts hold, or None."""
    kept = index.kept()
    if kept is None or kept.pair is None:
        return None
    lhs = index.facts()
    if lhs is None or lhs.pair is None:
        return None
    pair = lhs.pair
    rhs = other.facts()
    if rhs is None or pair.rhs() is not rhs:
        return None
    _distributed.check_sharded(module, "merge")  # gathered FSDP parameters are plain too
    check_arithmetic(index.keys, lhs.tensors, fun, lhs.dtypes)
    return lhs.tensors, rhs.tensors, pair.prepared(lhs, rhs)


def keep_merge(index: Index, other: Index) -> None:
    """Record that a merge of `other` (same keys, same order) into `index` passed every
    check, so the next one between them can skip them."""
    lhs = index.keep_facts()
    rhs = other.keep_facts()
    if lhs is None or rhs is None or lhs is rhs:
        return
    if PairFacts.possible(lhs, rhs):
        lhs.pair = PairFacts(lhs, rhs)


def update(
    index: Index, values: dict[str, object], module: nn.Module | None
) -> tuple[list[str], list[Tensor], list[Tensor], Prepared | None] | None:
    """(keys, dsts, srcs, prepared) of an update whose kept facts hold, or None."""
    peek = index.kept()
    if peek is None or peek.update is None:
        return None
    facts = index.facts()
    kept = None if facts is None else facts.update
    if kept is None:
        return None
    assert facts is not None
    keys = list(values)
    if keys != kept.keys:
        return None
    given: list[Tensor] = list(values.values())  # type: ignore[arg-type]
    if not kept.guard.check(given):  # a non-tensor, or shaped unlike the last values
        return None
    _distributed.check_sharded(module, "update")
    found = owned_starts(given)
    if found is None:
        return None  # memory torch did not allocate: aliases are found by byte ranges
    # A value that holds elements at address 0 has had its storage freed (the full checks
    # refuse it); one that shares memory with a destination is copied first by the kernels.
    held = found if kept.held is None else compress(found, kept.held)
    if 0 in held or not facts.storages.isdisjoint(found):
        return None
    return keys, kept.dsts, given, kept.prepared


def keep_update(
    index: Index,
    values: dict[str, object],
    keys: list[str],
    dsts: list[Tensor],
    srcs: list[Tensor],
) -> None:
    """Record an update that passed every check, if it wrote each value of `values` to its
    own destination (no key left out, none computed, no two on one tied tensor)."""
    facts = index.keep_facts()
    if facts is None or not facts.owned:
        return
    if len(keys) != len(values) or len(set(map(id, dsts))) != len(dsts):
        return
    if not plain(srcs) or not _as_given(values, keys, srcs):
        return
    all_cpu = facts.all_cpu and all(map(_IS_CPU, srcs))
    found = owned_starts(srcs)
    if found is None or not facts.storages.isdisjoint(found):
        return
    prepared = Prepared() if all_cpu else None
    held = list(map(bool, map(Tensor.numel, srcs)))
    # (None, the common case: every value holds elements, so none may sit at address 0.)
    facts.update = KeptUpdate(keys, dsts, Guard(srcs), None if all(held) else held, prepared)


def _as_given(values: dict[str, object], keys: list[str], srcs: list[Tensor]) -> bool:
    """Whether the plan's pairs are the dict's own items, in its order."""
    return list(values) == keys and all(map(is_, values.values(), srcs))
