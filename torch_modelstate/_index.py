"""The index: every leaf of a model by key, in ``state_dict()`` order, with its ties.

Building an index walks the module tree once. The index is kept *with the module it
indexes* (`current_index`), so ``ModelState.new(model)`` at every step finds the one built
before, and it re-checks itself before each use, because ``fully_shard``, ``to_empty``,
``.to()`` (for buffers) and ``load_state_dict(assign=True)`` replace tensor objects, and
users add, swap, delete or re-register submodules, parameters and buffers.

Invariant (what `Index.is_current` proves, in C-level passes and no Python call per tensor):
every parameter, buffer and child the index saw is still the object its module's
``_parameters``, ``_buffers`` or ``_modules`` dict holds under that name (an entry that held
``None`` is still there), those dicts together hold no more entries than then (nothing was
added), and each module with buffers has the same non-persistent names. Anything that changes
what the index says changes one of those; nothing outside the model is looked at, so an
assignment in an unrelated module invalidates nothing. Keys, leaves and ties of a current
index are exactly those a fresh walk would give. (Not noticed: a module's ``_parameters``,
``_buffers`` or ``_modules`` dict object replaced wholesale, which nothing in torch does.)
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter, eq
from typing import Any

from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from torch_modelstate._facts import Facts
from torch_modelstate._guard import DictGuard, plain
from torch_modelstate._tied_module import TransformTie, parameter_order, transform_ties_of
from torch_modelstate._ties import Tie as Tie
from torch_modelstate._ties import identity_sources

_HELD = "_tms_index"  # the module attribute that keeps a root's index
_TENSOR = attrgetter("tensor")
_MAX_BACKOFF = 32  # full checks between rebuilds of facts that break before serving


@dataclass(eq=False, slots=True)
class Leaf:
    """One stored tensor: a parameter or a persistent buffer that is no tie destination."""

    key: str
    path: tuple[str, ...]
    is_param: bool
    tensor: Tensor
    owner: nn.Module | None  # None for a state built from a dict
    name: str


class Index:
    """Leaves, ties and the key order of one model (or dict of tensors).

    ``keys``/``paths``/``leaves`` list the stored tensors (tie destinations left out),
    ``order`` every key in module order, ``by_key`` maps stored keys and identity
    destinations to their leaf, ``ties`` maps each destination to its `Tie`.
    """

    __slots__ = (
        "_backoff",
        "_checks",
        "_facts",
        "_full",
        "_root",
        "by_key",
        "keys",
        "leaves",
        "order",
        "orphans",
        "paths",
        "ties",
    )

    def __init__(self, leaves: list[Leaf], ties: dict[str, Tie], order: list[str]) -> None:
        self.leaves = leaves
        self.ties = ties
        self.order = order
        self.keys = [leaf.key for leaf in leaves]
        self.paths = [leaf.path for leaf in leaves]
        self.by_key: dict[str, Leaf] = {leaf.key: leaf for leaf in leaves}
        for tie in ties.values():
            if tie.fn is None:
                self.by_key[tie.dest] = self.by_key[tie.source]
        # What `is_current` compares: the module dicts' entries and non-persistent names.
        self._checks: tuple[DictGuard, list[set[str]], list[set[str]]] | None = None
        # What write checks proved (`_facts`), built once `_full` more full checks have run
        # (one: the second plan builds them); `_backoff` grows while facts keep breaking
        # before they serve (metadata that changes every step), so they are rebuilt rarely.
        self._facts: Facts | None = None
        self._full = 1
        self._backoff = 0
        self._root: nn.Module | None = None  # the module indexed (None for a dict)
        # Transform destinations whose source's module left the model: {key: (owner, name)}.
        self.orphans: dict[str, tuple[nn.Module, str]] = {}

    def raise_orphans(self) -> None:
        """Refuse to serve a view in which a destination computes from outside the model."""
        if self.orphans:
            key = next(iter(self.orphans))
            msg = (
                f"`{key}` is transform-tied to a tensor of a module that is no longer part of "
                "this model (it was replaced or removed).\n"
                f"  fix: untie({key!r}) to keep the value it has now, then tie it again to a "
                "source in the model"
            )
            raise ValueError(msg)

    def is_current(self) -> bool:
        """Whether the model still holds exactly what this index was built from.

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> index = current_index(model)
        >>> index.is_current(), current_index(model) is index
        (True, True)
        >>> model[0].bias = nn.Parameter(model[0].bias.detach().clone())
        >>> index.is_current()
        False
        """
        checks = self._checks
        if checks is None:
            return True
        entries, np_sets, np_copies = checks
        return entries.check() and all(map(eq, np_sets, np_copies))

    def facts(self) -> Facts | None:
        """The facts kept for this index's tensors, if they still hold (else None: the full
        checks run, then `keep_facts`). Call it on a current index."""
        facts = self._facts
        if facts is None:
            return None
        if facts.holds():
            facts.served += 1
            return facts
        # Something moved: rebuilt after the next full check, or, if these facts never
        # served a call, after twice as many as last time (at most `_MAX_BACKOFF`).
        self._facts = None
        self._backoff = 0 if facts.served else min(max(1, 2 * self._backoff), _MAX_BACKOFF)
        self._full = self._backoff
        return None

    def kept(self) -> Facts | None:
        """The facts kept for this index, not revalidated: to see whether they hold
        anything worth revalidating (`facts` revalidates)."""
        return self._facts

    def keep_facts(self) -> Facts | None:
        """After the full checks passed: facts that hold now, to record what they found in.
        Built the second time an index is planned for (a one-off write pays nothing), and
        only for plain tensors (a DTensor's shards are checked each time)."""
        facts = self._facts
        if facts is not None and facts.holds():
            return facts
        self._facts = None
        if self._full > 0:
            self._full -= 1
            return None
        tensors = list(map(_TENSOR, self.leaves))
        if not plain(tensors):
            return None
        self._facts = Facts(tensors)
        return self._facts

    def did_you_mean(self, key: str) -> str:
        """A hint line naming the keys closest to an unknown `key` (or nothing)."""
        close = difflib.get_close_matches(key, self.order, n=3)
        return f"\n  did you mean: {', '.join(close)}" if close else ""

    def resolve(self, key: str) -> Tensor | None:
        """The value under `key`: a stored tensor, or a transform destination computed now."""
        leaf = self.by_key.get(key)
        if leaf is not None:
            return leaf.tensor
        tie = self.ties.get(key)
        if tie is not None and tie.fn is not None:
            return self.computed(tie)
        return None

    def computed(self, tie: Tie) -> Tensor:
        """A transform destination's value now (the module's own attribute in a model)."""
        assert tie.fn is not None
        if tie.owner is not None:
            value: Tensor = getattr(tie.owner, tie.name)
            return value
        return tie.fn(self.by_key[tie.source].tensor)

    def __reduce__(self) -> tuple[Any, ...]:
        # Kept on the module it indexes: a pickled or copied module starts without one.
        return (type(None), ())

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None


def unwrap(module: nn.Module) -> nn.Module:
    """The plain model inside ``torch.compile``, DDP and DataParallel wrappers.

    >>> from torch import nn
    >>> model = nn.Linear(2, 2)
    >>> unwrap(nn.DataParallel(model)) is model
    True
    """
    while True:
        if isinstance(module, (DistributedDataParallel, DataParallel)):
            inner = module.module
        else:
            # Only look for torch.compile's wrapper once dynamo is loaded (it is heavy).
            eval_frame = sys.modules.get("torch._dynamo.eval_frame")
            wrapper = getattr(eval_frame, "OptimizedModule", None)
            if wrapper is None or not isinstance(module, wrapper):
                return module
            inner = module._orig_mod
        assert isinstance(inner, nn.Module)
        module = inner


def current_index(root: nn.Module) -> Index:
    """The index kept with `root` if it is still current, else a fresh one (then kept)."""
    held = root.__dict__.get(_HELD)
    # `held._root is root`: a module whose __dict__ was copied (DataParallel's replicas,
    # copy.copy) carries its original's index, which describes the original.
    if isinstance(held, Index) and held._root is root and held.is_current():
        return held
    index = index_module(root)
    root.__dict__[_HELD] = index
    return index


def forget(root: nn.Module) -> None:
    """Drop the index kept with `root` (after our own tie or untie)."""
    root.__dict__.pop(_HELD, None)


def index_module(root: nn.Module) -> Index:
    """Walk `root` in ``state_dict()`` order: a module's parameters, buffers, then children."""
    found: list[tuple[str, Tensor, bool, nn.Module, str]] = []
    order: list[str] = []
    prefixes: dict[int, str] = {}
    pending: list[tuple[str, nn.Module, str, TransformTie]] = []
    watched: list[dict[str, Any]] = []
    np_sets: list[set[str]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        prefixes.setdefault(id(module), prefix)
        params, buffers, children = module._parameters, module._buffers, module._modules
        skip = module._non_persistent_buffers_set
        watched.extend((params, buffers, children))
        if buffers:  # without buffers, a change of persistence changes `_buffers` too
            np_sets.append(skip)
        tied = transform_ties_of(module)
        for name in parameter_order(module) if tied else params:
            record = tied.get(name)
            if record is not None:
                order.append(prefix + name)
                pending.append((prefix + name, module, name, record))
                continue
            param = params[name]
            if param is not None:
                found.append((prefix + name, param, True, module, name))
                order.append(prefix + name)
        for name, buffer in buffers.items():
            if buffer is not None and name not in skip:
                found.append((prefix + name, buffer, False, module, name))
                order.append(prefix + name)
        for name, child in children.items():
            if child is not None:
                visit(child, prefix + name + ".")

    visit(root, "")
    source_of = identity_sources((key, t, owner, name) for key, t, _, owner, name in found)
    leaves: list[Leaf] = []
    ties: dict[str, Tie] = {}
    for key, tensor, is_param, owner, name in found:
        source = source_of[id(tensor)]
        if source == key:
            leaves.append(Leaf(key, tuple(key.split(".")), is_param, tensor, owner, name))
        else:
            ties[key] = Tie(key, source, None, None, owner, name)
    stored = {leaf.key for leaf in leaves}
    orphans: dict[str, tuple[nn.Module, str]] = {}
    for key, owner, name, record in pending:
        source_key = _source_key(record, prefixes, stored)
        if source_key is None:
            orphans[key] = (owner, name)
        else:
            ties[key] = Tie(key, source_key, record.fn, record.name, owner, name)
    index = Index(leaves, ties, [key for key in order if key not in orphans])
    index.orphans = orphans
    index._root = root
    index._checks = (DictGuard(watched), np_sets, [set(s) for s in np_sets])
    return index


def _source_key(record: TransformTie, prefixes: dict[int, str], stored: set[str]) -> str | None:
    """The key of a transform tie's source in this model (None: its module is not in it)."""
    prefix = prefixes.get(id(record.source_owner))
    if prefix is None:
        return None
    source = prefix + record.source_name
    # A source parametrized after the tie (torch.nn.utils.parametrize) is stored as its
    # parametrization's `original`; the tie reads the parametrized value, computed from it.
    original = f"{prefix}parametrizations.{record.source_name}.original"
    if source not in stored and original in stored:
        return original
    return source


def index_entries(entries: Iterable[tuple[str, Tensor | Tie]], state_keys: set[str]) -> Index:
    """Index a standalone state: tensors by key, ties recorded as `Tie` entries."""
    leaves: list[Leaf] = []
    ties: dict[str, Tie] = {}
    order: list[str] = []
    for key, value in entries:
        order.append(key)
        if isinstance(value, Tie):
            ties[key] = value
        else:
            leaves.append(Leaf(key, tuple(key.split(".")), key not in state_keys, value, None, key))
    return Index(leaves, ties, order)
