"""`ModelState`: a model's parameters and state by key, with masks, ties, update and merge."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from torch_modelstate import _kernels, _pack, _update
from torch_modelstate._errors import KeyNotFoundError
from torch_modelstate._freezing import Freezing
from torch_modelstate._index import Index, Tie, current_index, forget, index_entries, unwrap
from torch_modelstate._memory import check_extents
from torch_modelstate._paths import to_flat, to_key
from torch_modelstate._summary import format_bytes as format_bytes  # re-exported
from torch_modelstate._summary import refuse_constructor_arguments
from torch_modelstate._tying import Tying
from torch_modelstate._views import StateViews
from torch_modelstate.merges import Merge

__all__ = ["ModelState"]

Values: TypeAlias = "Mapping[str, Any] | ModelState"
MergeFn: TypeAlias = "Callable[[list[str], Tensor, Tensor], Tensor] | Merge"


# Here: construction, the index, clone/pack, update/merge, load_state_dict. The read-only
# views are in `_views`, freezing in `_freezing`, ties in `_tying` (mixins, no state).
class ModelState(Freezing, Tying, StateViews):
    """A model's parameters and state (persistent buffers), addressed by key.

    Over an ``nn.Module`` it is a *live view*: accessors return the module's own tensors,
    ``requires_grad`` is the truth for frozen parameters, and ``update``/``merge`` write
    into the existing tensors in place. Over a dict it owns its own frozen set and ties.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    >>> ms = ModelState.new(model).freeze("0.**")
    >>> list(ms.trainable_parameters())
    ['1.weight', '1.bias', '2.weight', '2.bias']
    >>> ms
    ModelState<
      Parameters: 47 (192 B)
      Trainable Parameters: 18 (72 B)
      Trainable State: 9 (40 B)
    >

    It reads like a read-only mapping over `to_dict`'s keys: ``ms["key"]`` is the live
    tensor (tie destinations resolved), ``"key" in ms``, ``len(ms)`` and ``iter(ms)`` (keys
    in module order). Build one with `new` (``ModelState(model)`` is a `TypeError`).

    >>> ms["0.bias"] is model[0].bias, "1.running_mean" in ms, len(ms), list(ms)[:2]
    (True, True, 9, ['0.weight', '0.bias'])
    >>> try:
    ...     ms["0.bais"]
    ... except KeyError as err:
    ...     print(err)
    ModelState['0.bais']: unknown key; the model has no such parameter or state.
      did you mean: 0.bias, 2.bias, 1.bias
    """

    __slots__ = ("_entries", "_frozen", "_index", "_module", "_state_keys")

    def __init__(self, *args: object, **kwargs: object) -> None:
        # Use `ModelState.new` or `ModelState.empty`; this makes an empty standalone state.
        if args or kwargs:
            refuse_constructor_arguments(args, kwargs)
        self._module: nn.Module | None = None
        self._entries: dict[str, Tensor | Tie] = {}
        self._state_keys: set[str] = set()
        self._frozen: set[str] = set()
        self._index: Index | None = None

    # ----------------------------------------------------------------- construction

    @classmethod
    def new(cls, obj: nn.Module | Mapping[str, Any] | ModelState) -> ModelState:
        """A ModelState over a module (a live view), a flat or nested dict, or a ModelState.

        From a dict every tensor is a parameter and all are trainable (as Axon's ``new``);
        the dict's tensors are used as they are, not copied. A ModelState is returned as is.

        >>> import torch
        >>> ModelState.new({"fc": {"weight": torch.ones(2, 2)}}).to_dict().keys()
        dict_keys(['fc.weight'])
        """
        if isinstance(obj, ModelState):
            return obj
        if isinstance(obj, nn.Module):
            state = cls()
            state._module = unwrap(obj)  # torch.compile / DDP / DataParallel: the plain model
            return state
        if isinstance(obj, Mapping):
            return cls._from_parts(to_flat(obj))
        msg = (
            "`ModelState.new` takes an nn.Module, a dict of tensors or a ModelState.\n"
            f"  got: {type(obj).__name__}"
        )
        raise TypeError(msg)

    @classmethod
    def empty(cls) -> ModelState:
        """A standalone ModelState with no tensors.

        >>> ModelState.empty().to_dict()
        {}
        """
        return cls()

    @classmethod
    def _from_parts(
        cls,
        tensors: Mapping[str, Any],
        *,
        state_keys: Iterable[str] = (),
        frozen: Iterable[str] = (),
        ties: Mapping[str, tuple[str, str | None]] | None = None,
    ) -> ModelState:
        """A standalone state; the same tensor object under two keys is an identity tie."""
        state = cls()
        first: dict[int, str] = {}
        for key, value in tensors.items():
            to_key(key)
            if not isinstance(value, Tensor):
                msg = (
                    f"Every value must be a tensor; `{key}` holds a {type(value).__name__}.\n"
                    "  fix: convert it with torch.as_tensor, or leave it out"
                )
                raise TypeError(msg)
            source = first.setdefault(id(value), key)
            if source == key:
                state._entries[key] = value
            else:
                state._entries[key] = Tie(key, source, None, None, None, key)
        state._state_keys = set(state_keys) & set(state._entries)
        state._frozen = set(frozen) & set(state._entries)
        for dest, (source, fn_name) in (ties or {}).items():
            state.tie(dest, source, fn_name)
        return state

    @property
    def module(self) -> nn.Module | None:
        """The module this state views (the plain model inside a ``torch.compile``, DDP or
        DataParallel wrapper), or None for a standalone state.

        >>> from torch import nn
        >>> model = nn.Linear(2, 2)
        >>> ModelState.new(nn.DataParallel(model)).module is model
        True
        """
        return self._module

    def clone(
        self, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> ModelState:
        """A standalone deep copy: new tensors, the same state keys, frozen set and ties.

        The usual start of an EMA: ``ema = ModelState.new(model).clone()``. `dtype` casts
        the floating-point tensors (integer and bool buffers such as ``num_batches_tracked``
        keep theirs): ``clone(dtype=torch.float32)`` is a full-precision shadow of a bf16
        model, which ``merges.ema`` can update without stalling. `device` puts the copy
        elsewhere, e.g. an EMA on the CPU of a model on the GPU.

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).to(torch.bfloat16)
        >>> shadow = ModelState.new(model).clone(dtype=torch.float32)
        >>> sorted({str(t.dtype) for t in shadow.to_dict().values()})
        ['torch.float32', 'torch.int64']
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            msg = (
                "`dtype` must be a floating-point torch.dtype (integer buffers keep theirs).\n"
                f"  got: {dtype!r}\n  fix: e.g. dtype=torch.float32"
            )
            raise TypeError(msg)
        target = None if device is None else torch.device(device)
        index = self._idx()
        tensors = [leaf.tensor for leaf in index.leaves]
        check_extents("clone", index.keys, tensors, "")  # a freed storage is read otherwise
        if dtype is None and target is None:
            cloned = _kernels.clone(tensors)
            layout = _pack.layout_of(tensors)
            if layout is not None:  # a packed state clones packed alike (speed)
                _pack.pack(cloned, like=layout)
        else:
            cloned = [_empty_copy(t, dtype, target) for t in tensors]
            if target is None or target.type != "meta":
                _kernels.copy_(cloned, tensors)
        copies = dict(zip(index.keys, cloned, strict=True))
        frozen = self._frozen_keys(index)
        state = type(self)()
        for key in index.order:
            tie = index.ties.get(key)
            if tie is None:
                state._entries[key] = copies[key]
            else:
                state._entries[key] = Tie(key, tie.source, tie.fn, tie.fn_name, None, key)
        state._state_keys = {leaf.key for leaf in index.leaves if not leaf.is_param}
        state._frozen = frozen
        return state

    def pack(self) -> ModelState:
        """Opt-in packed storage: one flat buffer per (device, dtype) group of the tensors.

        Every parameter and buffer keeps its identity (its ``.data`` becomes a view of the
        group's buffer), so optimizers and hooks are unaffected; `clone()` of a packed state
        is packed alike, and `update`/`merge` between two packed states of one layout run one
        op per group instead of one per tensor. Whatever later replaces a tensor or its data
        (``.to()``, ``fully_shard``, ``load_state_dict(assign=True)``) just ends the fast path.
        Costs one copy of the state when called. Returns self.

        >>> import torch
        >>> from torch import nn
        >>> from torch_modelstate import merges
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> weight = model[0].weight
        >>> ms = ModelState.new(model).pack()
        >>> ema = ms.clone()
        >>> _ = ema.merge(ms, merges.ema(0.9))
        >>> model[0].weight is weight, torch.equal(ema["0.weight"], weight)
        (True, True)
        """
        index = self._idx()
        _pack.pack([leaf.tensor for leaf in index.leaves], index.keys)
        return self

    # ----------------------------------------------------------------- the index

    def _idx(self) -> Index:
        index = self._index
        if index is not None and index.is_current():
            return index
        if self._module is not None:
            index = current_index(self._module)  # kept with the module, shared by its views
            index.raise_orphans()
        else:
            index = index_entries(self._entries.items(), self._state_keys)
        self._index = index
        return index

    def _changed(self) -> None:
        self._index = None
        if self._module is not None:
            forget(self._module)

    # ----------------------------------------------------------------- update

    def update(self, updated_parameters: Values, updated_state: Values | None = None) -> ModelState:
        """Copy values into the existing tensors, in place.

        `updated_parameters` may hold any key, parameters and state alike, frozen or not,
        so ``ms.update(state_dict)`` loads a whole state dict; frozen state in
        `updated_state` is skipped (as in Axon). Values are cast to each destination's
        dtype and moved to its device; identity, ``data_ptr`` and ``requires_grad`` stay.
        Everything is checked before anything is written, for every input: on any error
        (a `KeyError`, `ValueError` or `TypeError` naming the key) nothing has been written.

        >>> import torch
        >>> ms = ModelState.new({"w": torch.zeros(2)})
        >>> ms.update({"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}).to_dict()["w"]
        tensor([1., 2.])
        """
        index = self._idx()
        state = None if updated_state is None else _as_values(updated_state)
        values = _as_values(updated_parameters)
        plan = _update.plan_update(index, values, state, self._is_frozen, self._module)
        plan.apply()
        return self

    # ----------------------------------------------------------------- merge

    def merge(self, rhs: ModelState | nn.Module | Mapping[str, Any], fun: MergeFn) -> ModelState:
        """Merge `rhs` into this state in place: ``lhs[key] = fun(path, lhs, rhs)``.

        Keys in both are merged, keys only here are kept, keys only in `rhs` are ignored;
        each tied tensor is merged once. Everything is checked first (shapes, and for the
        values `fun` returns, their layout, device and dtype), and if `fun` raises, nothing
        has been written. The functions in `torch_modelstate.merges` run as grouped
        in-place kernels.

        >>> import torch
        >>> from torch_modelstate import merges
        >>> soup = ModelState.new({"w": torch.zeros(2)})
        >>> soup.merge({"w": torch.ones(2)}, merges.lerp(0.5)).to_dict()["w"]
        tensor([0.5000, 0.5000])
        """
        plan = _update.plan_merge(self._idx(), ModelState.new(rhs)._idx(), fun, self._module)
        plan.apply()
        return self

    # ----------------------------------------------------------------- DCP Stateful (write side)

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Write `state_dict` (every key of `state_dict()`) in place, as `update` does:
        checked first, all or nothing. Values that are the live tensors themselves (what
        DCP hands back after loading into them) are left as they are.

        >>> import torch
        >>> ms = ModelState.new(torch.nn.Linear(2, 1))
        >>> ms.load_state_dict({"weight": torch.ones(1, 2), "bias": torch.zeros(1)})
        >>> ms.module.weight.tolist()
        [[1.0, 1.0]]
        """
        index = self._idx()
        missing = [leaf.key for leaf in index.leaves if leaf.key not in state_dict]
        if missing:
            shown = ", ".join(f"`{k}`" for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
            msg = (
                f"load_state_dict: {len(missing)} key(s) missing: {shown}.\n"
                "  expected: every key of state_dict()\n"
                "  fix: pass a whole state dict, or use update() for some keys"
            )
            raise KeyNotFoundError(msg)
        live = index.by_key
        values = {
            key: value
            for key, value in state_dict.items()
            if key not in live or value is not live[key].tensor
        }
        if values:
            self.update(values)


def _as_values(obj: Values) -> Mapping[str, Any] | Index:
    """An update argument as `_update` takes it: a ModelState stands as its index."""
    return obj._idx() if isinstance(obj, ModelState) else obj


def _empty_copy(t: Tensor, dtype: torch.dtype | None, device: torch.device | None) -> Tensor:
    """Uninitialised memory for a copy of `t`: floats cast to `dtype`, on `device`."""
    cast = dtype if dtype is not None and t.dtype.is_floating_point else t.dtype
    return torch.empty_like(t, dtype=cast, device=device if device is not None else t.device)
