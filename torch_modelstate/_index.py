"""The index: every leaf of a model by key, in ``state_dict()`` order, with its ties.

Building an index walks the module tree once. A module-bound `ModelState` keeps its index
and re-checks it before each use, because ``fully_shard``, ``to_empty``, ``.to()`` (for
buffers) and ``load_state_dict(assign=True)`` replace tensor objects, and users add, swap
or delete submodules. The check is three C-level passes, about 0.1 us per tensor,
which keeps `update` on thousands of small tensors close to a bare ``_foreach_copy_``:

- every cached tensor is still the object its owner holds under its name (this catches
  replaced and deleted parameters and buffers, whoever replaced them);
- no module anywhere registered a parameter, buffer or submodule since the index was built
  (torch's global registration hooks bump a counter; tying and untying bump it too);
- every module's ``_modules`` still has its length (this catches deleted submodules).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import is_
from typing import Any

from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from torch_modelstate import _tie

_VERSION = [0]


def bump_version(*args: object) -> None:
    """Mark every cached index as possibly stale (a registration hook, or our own ties)."""
    _VERSION[0] += 1


_module_hooks.register_module_parameter_registration_hook(bump_version)
_module_hooks.register_module_buffer_registration_hook(bump_version)
_module_hooks.register_module_module_registration_hook(bump_version)


@dataclass(eq=False, slots=True)
class Leaf:
    """One stored tensor: a parameter or a persistent buffer that is no tie destination."""

    key: str
    path: tuple[str, ...]
    is_param: bool
    tensor: Tensor
    owner: nn.Module | None  # None for a state built from a dict
    name: str


@dataclass(eq=False, slots=True)
class Tie:
    """A tie destination: the source's tensor itself, or `fn` applied to it."""

    dest: str
    source: str
    fn: Callable[[Tensor], Tensor] | None
    fn_name: str | None
    owner: nn.Module | None
    name: str


class Index:
    """Leaves, ties and the key order of one model (or dict of tensors)."""

    __slots__ = ("_checks", "by_key", "keys", "leaves", "order", "paths", "ties")

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
        self._checks: tuple[Any, ...] | None = None

    def is_current(self) -> bool:
        """Whether the module still holds exactly the objects this index was built from."""
        checks = self._checks
        if checks is None:
            return True
        version, dicts, names, tensors, module_dicts, lens = checks
        return (
            version == _VERSION[0]
            and all(map(is_, map(dict.get, dicts, names), tensors))
            and list(map(len, module_dicts)) == lens
        )

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
            return tie.fn(self.by_key[tie.source].tensor)
        return None


def index_module(root: nn.Module) -> Index:
    """Walk `root` in ``state_dict()`` order: a module's parameters, buffers, then children."""
    found: list[tuple[str, Tensor, bool, nn.Module, str]] = []
    order: list[str] = []
    prefixes: dict[int, str] = {}
    pending: list[tuple[str, nn.Module, str, _tie.TransformTie]] = []
    version = _VERSION[0]
    module_dicts: list[dict[str, Any]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        prefixes.setdefault(id(module), prefix)
        module_dicts.append(module._modules)
        tied = _tie.transform_ties_of(module)
        for name in _tie.parameter_order(module) if tied else module._parameters:
            record = tied.get(name)
            if record is not None:
                order.append(prefix + name)
                pending.append((prefix + name, module, name, record))
                continue
            param = module._parameters[name]
            if param is not None:
                found.append((prefix + name, param, True, module, name))
                order.append(prefix + name)
        skip = module._non_persistent_buffers_set
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in skip:
                found.append((prefix + name, buffer, False, module, name))
                order.append(prefix + name)
        for name, child in module._modules.items():
            if child is not None:
                visit(child, prefix + name + ".")

    visit(root, "")
    # A tensor under several keys is an identity tie. Its source is the first key in module
    # order, unless `tie` recorded that key as a destination (the user tied it the other way).
    source_of: dict[int, str] = {}
    source_hinted: dict[int, bool] = {}
    for key, tensor, _, owner, name in found:
        hinted = _is_tied_dest(owner, name)
        if id(tensor) not in source_of or (source_hinted[id(tensor)] and not hinted):
            source_of[id(tensor)] = key
            source_hinted[id(tensor)] = hinted
    leaves: list[Leaf] = []
    ties: dict[str, Tie] = {}
    for key, tensor, is_param, owner, name in found:
        source = source_of[id(tensor)]
        if source == key:
            leaves.append(Leaf(key, tuple(key.split(".")), is_param, tensor, owner, name))
        else:
            ties[key] = Tie(key, source, None, None, owner, name)
    for key, owner, name, record in pending:
        source_prefix = prefixes.get(id(record.source_owner))
        if source_prefix is None:
            msg = (
                f"`{key}` is tied to `{record.source_name}` of a module outside this model.\n"
                "  fix: untie it, or build the ModelState over the model that holds both"
            )
            raise ValueError(msg)
        ties[key] = Tie(
            key, source_prefix + record.source_name, record.fn, record.name, owner, name
        )
    index = Index(leaves, ties, order)
    dicts = [
        owner._parameters if is_param else owner._buffers for _, _, is_param, owner, _ in found
    ]
    names = [name for *_, name in found]
    tensors = [tensor for _, tensor, *_ in found]
    index._checks = (version, dicts, names, tensors, module_dicts, list(map(len, module_dicts)))
    return index


def _is_tied_dest(owner: nn.Module, name: str) -> bool:
    return name in owner.__dict__.get(_tie.IDENTITY_DESTS, ())


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
