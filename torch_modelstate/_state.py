"""`ModelState`: a model's parameters and state by key, with masks, ties, update and merge."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import repeat
from operator import attrgetter
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from torch_modelstate import _frozen, _kernels, _tied_module, _ties
from torch_modelstate._errors import KeyNotFoundError
from torch_modelstate._index import Index, Leaf, Tie, current_index, forget, index_entries, unwrap
from torch_modelstate._masks import MaskLike, compile_mask
from torch_modelstate._paths import to_flat, to_key
from torch_modelstate.merges import Merge

__all__ = ["ModelState"]

Values: TypeAlias = "Mapping[str, Any] | ModelState"
MergeFn: TypeAlias = Callable[[list[str], Tensor, Tensor], Tensor]
KeyLike: TypeAlias = "str | Sequence[str]"

_TENSOR = attrgetter("tensor")
# One C call per pair, where comparing `.shape`s would build two torch.Size objects.
_SAME_SIZE = Tensor.is_same_size
_DTYPE = attrgetter("dtype")
_IS_CPU = attrgetter("is_cpu")


class ModelState:
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
            _refuse_constructor_arguments(args, kwargs)
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
        """The module this state views, or None for a standalone state."""
        return self._module

    def clone(self) -> ModelState:
        """A standalone deep copy: new tensors, the same state keys, frozen set and ties.

        The usual start of an EMA: ``ema = ModelState.new(model).clone()``.
        """
        index = self._idx()
        copies = dict(
            zip(index.keys, _kernels.clone([leaf.tensor for leaf in index.leaves]), strict=True)
        )
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

    def _is_frozen(self, leaf: Leaf) -> bool:
        if leaf.owner is None:
            return leaf.key in self._frozen
        if leaf.is_param:
            return not leaf.tensor.requires_grad
        return leaf.name in _frozen.frozen_buffers(leaf.owner)

    def _frozen_keys(self, index: Index) -> set[str]:
        return {leaf.key for leaf in index.leaves if self._is_frozen(leaf)}

    # ----------------------------------------------------------------- accessors

    def _select(self, params: bool | None, frozen: bool | None) -> dict[str, Tensor]:
        index = self._idx()
        out: dict[str, Tensor] = {}
        for leaf in index.leaves:
            if params is not None and leaf.is_param is not params:
                continue
            if frozen is not None and self._is_frozen(leaf) is not frozen:
                continue
            out[leaf.key] = leaf.tensor
        return out

    def parameters(self) -> dict[str, Tensor]:
        """Every parameter by key, in module order; tie destinations left out."""
        return self._select(True, None)

    def state(self) -> dict[str, Tensor]:
        """Every persistent buffer (BatchNorm statistics, counters...) by key."""
        return self._select(False, None)

    def trainable_parameters(self) -> dict[str, Tensor]:
        """Parameters that are not frozen: hand ``.values()`` to an optimizer."""
        return self._select(True, False)

    def frozen_parameters(self) -> dict[str, Tensor]:
        """Frozen parameters (``requires_grad=False`` for a module)."""
        return self._select(True, True)

    def trainable_state(self) -> dict[str, Tensor]:
        """State that forward passes may update."""
        return self._select(False, False)

    def frozen_state(self) -> dict[str, Tensor]:
        """State that keeps its value through forward passes."""
        return self._select(False, True)

    def to_dict(self) -> dict[str, Tensor]:
        """Every key, like ``state_dict()``: tie destinations included and resolved.

        An identity destination maps to its source's tensor; a transform destination to
        the transform of the source, computed now (detached).

        >>> import torch
        >>> from torch import nn
        >>> model = nn.ModuleDict({"enc": nn.Linear(4, 2), "dec": nn.Linear(2, 4)})
        >>> ms = ModelState.new(model).tie("dec.weight", "enc.weight", "transpose")
        >>> out = ms.to_dict()
        >>> list(out), torch.equal(out["dec.weight"], model["enc"].weight.t())
        (['enc.weight', 'enc.bias', 'dec.weight', 'dec.bias'], True)
        """
        index = self._idx()
        out: dict[str, Tensor] = {}
        for key in index.order:
            leaf = index.by_key.get(key)
            if leaf is not None:
                out[key] = leaf.tensor
            else:
                out[key] = index.computed(index.ties[key]).detach()
        return out

    def ties(self) -> dict[str, str]:
        """``{destination: source}`` for every tie, made here or found in the module.

        Two attributes holding one ``Parameter`` (Hugging Face's tied embeddings) are a tie
        whose destination is the later key in module order.
        """
        return {dest: tie.source for dest, tie in self._idx().ties.items()}

    def transforms(self) -> dict[str, str | None]:
        """``{destination: transform name}`` for transform ties (None: an unnamed callable)."""
        return {d: t.fn_name for d, t in self._idx().ties.items() if t.fn is not None}

    # ----------------------------------------------------------------- freezing

    def freeze(self, mask: MaskLike = None) -> ModelState:
        """Freeze the leaves `mask` selects (all by default), adding to what is frozen.

        A frozen parameter gets ``requires_grad=False``; a frozen buffer keeps its value
        through forward passes (a frozen BatchNorm still normalises with batch statistics
        in training, but its running statistics stay put). The whole mask is evaluated
        before anything changes.

        >>> import torch
        >>> from torch import nn
        >>> ms = ModelState.new(nn.Linear(2, 2)).freeze("bias")
        >>> list(ms.frozen_parameters())
        ['bias']
        """
        return self._set_frozen(mask, True)

    def unfreeze(self, mask: MaskLike = None) -> ModelState:
        """Unfreeze the leaves `mask` selects (all by default)."""
        return self._set_frozen(mask, False)

    def _set_frozen(self, mask: MaskLike, frozen: bool) -> ModelState:
        compiled = compile_mask(mask)
        index = self._idx()
        hits = compiled.select(index.keys, index.paths)
        chosen = [leaf for leaf, hit in zip(index.leaves, hits, strict=True) if hit]
        self._apply_frozen(chosen, frozen)
        return self

    def _restore_frozen(self, frozen_keys: Iterable[str]) -> None:
        """Make exactly `frozen_keys` frozen (keys of tie destinations are ignored)."""
        index = self._idx()
        wanted = set(frozen_keys)
        self._apply_frozen([leaf for leaf in index.leaves if leaf.key in wanted], True)
        self._apply_frozen([leaf for leaf in index.leaves if leaf.key not in wanted], False)

    def _apply_frozen(self, chosen: list[Leaf], frozen: bool) -> None:
        if self._module is None:
            keys = (leaf.key for leaf in chosen)
            if frozen:
                self._frozen.update(keys)
            else:
                self._frozen.difference_update(keys)
            return
        _kernels.set_requires_grad([leaf.tensor for leaf in chosen if leaf.is_param], not frozen)
        by_owner: dict[int, tuple[nn.Module, list[str]]] = {}
        for leaf in chosen:
            if not leaf.is_param and leaf.owner is not None:
                by_owner.setdefault(id(leaf.owner), (leaf.owner, []))[1].append(leaf.name)
        for owner, names in by_owner.values():
            _frozen.set_frozen(owner, names, frozen)

    # ----------------------------------------------------------------- update

    def update(self, updated_parameters: Values, updated_state: Values | None = None) -> ModelState:
        """Copy values into the existing tensors, in place.

        `updated_parameters` may hold any key, parameters and state alike, frozen or not,
        so ``ms.update(state_dict)`` loads a whole state dict; frozen state in
        `updated_state` is skipped (as in Axon). Values are cast to each destination's
        dtype and moved to its device; identity, ``data_ptr`` and ``requires_grad`` stay.
        Everything is checked before anything is written.

        >>> import torch
        >>> ms = ModelState.new({"w": torch.zeros(2)})
        >>> ms.update({"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}).to_dict()["w"]
        tensor([1., 2.])
        """
        index = self._idx()
        dsts: list[Tensor] = []
        srcs: list[Tensor] = []
        keys: list[str] = []
        self._gather(
            index, _values(updated_parameters, "updated_parameters"), dsts, srcs, keys, None
        )
        if updated_state is not None:
            values = _values(updated_state, "updated_state", state_only=True)
            self._gather(index, values, dsts, srcs, keys, "state")
        if index.ties or updated_state is not None:
            dsts, srcs = _dedupe(index, dsts, srcs, keys)
        _kernels.copy_(dsts, srcs)
        return self

    def _gather(
        self,
        index: Index,
        values: Mapping[str, Any],
        dsts: list[Tensor],
        srcs: list[Tensor],
        keys: list[str],
        only: str | None,
    ) -> None:
        # Checks run as C-level passes over all keys (no Python call per tensor); the
        # per-key loops below run only to word an error.
        names = list(values)
        given = list(values.values())
        all_tensors = all(map(isinstance, given, repeat(Tensor)))
        if not all_tensors and any(isinstance(value, Mapping) for value in given):
            self._gather(index, to_flat(values), dsts, srcs, keys, only)
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
        if not all(map(_SAME_SIZE, given, targets)):
            for key, value, target in zip(names, given, targets, strict=True):
                if value.shape != target.shape:
                    msg = (
                        f"update: shape mismatch for `{key}`.\n"
                        f"  expected: {tuple(target.shape)}\n  got: {tuple(value.shape)}"
                    )
                    raise ValueError(msg)
        if not all(map(_IS_CPU, given)):
            for key, value in zip(names, given, strict=True):
                if value.is_meta:
                    msg = (
                        f"update: the value for `{key}` is on the meta device and holds no data.\n"
                        "  fix: materialise it first (e.g. load real values into it)"
                    )
                    raise ValueError(msg)
        if any(dtype.is_complex for dtype in set(map(_DTYPE, given))):
            for key, value, target in zip(names, given, targets, strict=True):
                if value.is_complex() and not target.is_complex():
                    msg = (
                        f"update: the value for `{key}` is complex but the tensor is real.\n"
                        f"  expected: {target.dtype}\n  got: {value.dtype}\n"
                        "  fix: pass value.real (or .abs()) explicitly"
                    )
                    raise TypeError(msg)
        if only is None:
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
            if not self._is_frozen(leaf):
                dsts.append(leaf.tensor)
                srcs.append(value)
                keys.append(key)

    # ----------------------------------------------------------------- merge

    def merge(self, rhs: ModelState | nn.Module | Mapping[str, Any], fun: MergeFn) -> ModelState:
        """Merge `rhs` into this state in place: ``lhs[key] = fun(path, lhs, rhs)``.

        Keys in both are merged, keys only here are kept, keys only in `rhs` are ignored;
        each tied tensor is merged once. Shapes are checked first, and if `fun` raises,
        nothing has been written. The functions in `torch_modelstate.merges` run as
        grouped in-place kernels.

        >>> import torch
        >>> from torch_modelstate import merges
        >>> soup = ModelState.new({"w": torch.zeros(2)})
        >>> soup.merge({"w": torch.ones(2)}, merges.lerp(0.5)).to_dict()["w"]
        tensor([0.5000, 0.5000])
        """
        index = self._idx()
        other = ModelState.new(rhs)._idx()
        found = list(map(other.by_key.get, index.keys))
        if None in found or other.ties:
            # Some keys are missing in rhs or computed there (transform ties): resolve each.
            pairs = [(leaf, other.resolve(leaf.key)) for leaf in index.leaves]
            kept = [(leaf, value) for leaf, value in pairs if value is not None]
            leaves = [leaf for leaf, _ in kept]
            rhs_list: list[Tensor] = [value for _, value in kept]
        else:
            leaves = index.leaves
            rhs_list = list(map(_TENSOR, found))
        lhs_list: list[Tensor] = list(map(_TENSOR, leaves))
        if not all(map(_SAME_SIZE, lhs_list, rhs_list)):
            for leaf, value in zip(leaves, rhs_list, strict=True):
                if value.shape != leaf.tensor.shape:
                    msg = (
                        f"merge: shape mismatch for `{leaf.key}`.\n"
                        f"  expected (lhs): {tuple(leaf.tensor.shape)}\n"
                        f"  got (rhs): {tuple(value.shape)}"
                    )
                    raise ValueError(msg)
        if isinstance(fun, Merge):
            fun.apply_(lhs_list, rhs_list)
            return self
        if not callable(fun):
            msg = f"`fun` must be callable as fun(path, lhs, rhs).\n  got: {type(fun).__name__}"
            raise TypeError(msg)
        results: list[Tensor] = []
        with torch.no_grad():
            for leaf, lhs_t, rhs_t in zip(leaves, lhs_list, rhs_list, strict=True):
                result = fun(list(leaf.path), lhs_t, rhs_t)
                if not isinstance(result, Tensor) or result.shape != lhs_t.shape:
                    got = (
                        tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
                    )
                    msg = (
                        f"merge: `fun` must return a tensor of the lhs shape; for `{leaf.key}`\n"
                        f"  expected: {tuple(lhs_t.shape)}\n  got: {got}"
                    )
                    raise (ValueError if isinstance(result, Tensor) else TypeError)(msg)
                results.append(result)
        _kernels.copy_(lhs_list, results)
        return self

    # ----------------------------------------------------------------- ties

    def tie(
        self,
        destination: KeyLike,
        source: KeyLike,
        transform: str | Callable[[Tensor], Tensor] | None = None,
    ) -> ModelState:
        """Tie `destination` to `source`: the same tensor, or ``transform(source)``.

        Without a transform, the destination becomes the source's ``nn.Parameter`` object.
        With one (a registered name such as ``"transpose"``, or a callable), the
        destination is computed from the source on every use, holds no storage and passes
        gradients to the source. Ties survive ``.to()``, ``copy.deepcopy``, optimizer steps
        and checkpoints. Everything is checked before the model changes.

        >>> import torch
        >>> from torch import nn
        >>> model = nn.ModuleDict({"enc": nn.Linear(4, 2), "dec": nn.Linear(2, 4)})
        >>> ms = ModelState.new(model).tie("dec.weight", "enc.weight", transform="transpose")
        >>> ms.ties()
        {'dec.weight': 'enc.weight'}
        >>> bool((model["dec"].weight == model["enc"].weight.t()).all())
        True
        """
        dest, src = to_key(destination), to_key(source)
        fn, fn_name = _ties.resolve_transform(transform)
        index = self._idx()
        check = _ties.check_tie(index, dest, src, fn, fn_name)
        check.raise_problem("tie")
        if check.exists:
            return self
        dest_leaf, src_leaf = index.by_key[dest], index.by_key[check.root]
        owner, src_owner = dest_leaf.owner, src_leaf.owner
        if owner is not None and src_owner is not None:
            if fn is None:
                assert isinstance(src_leaf.tensor, nn.Parameter)  # checked: both parameters
                _ties.mark_identity_dest(owner, dest_leaf.name, src_leaf.tensor)
            else:
                _tied_module.add_transform_tie(
                    owner, dest_leaf.name, src_owner, src_leaf.name, fn, fn_name
                )
        else:
            self._entries[dest] = Tie(dest, check.root, fn, fn_name, None, dest)
            self._frozen.discard(dest)
        self._changed()
        return self

    def untie(self, destination: KeyLike) -> ModelState:
        """Give a tie destination its own copy of its current value (for a transform tie,
        the materialised value); the model keeps working and the source is unchanged."""
        dest = to_key(destination)
        if self._module is not None:
            orphan = current_index(self._module).orphans.get(dest)
            if orphan is not None:  # its source left the model: keep the value it has now
                _tied_module.remove_transform_tie(*orphan)
                self._changed()
                return self
        index = self._idx()
        tie = index.ties.get(dest)
        if tie is None:
            if dest in index.by_key:
                msg = (
                    f"untie: `{dest}` is not a tie destination.\n"
                    "  fix: `ties()` lists the destinations"
                )
                raise ValueError(msg)
            msg = f"untie: unknown destination key `{dest}`.{index.did_you_mean(dest)}"
            raise KeyNotFoundError(msg)
        src_leaf = index.by_key[tie.source]
        source = src_leaf.tensor
        owner = tie.owner
        if owner is not None and owner is src_leaf.owner and tie.name == src_leaf.name:
            msg = (
                f"untie: `{dest}` and `{tie.source}` are one attribute of one shared "
                "submodule; they cannot be told apart.\n"
                "  fix: replace the shared submodule by a copy (copy.deepcopy) instead"
            )
            raise ValueError(msg)
        if owner is None:
            with torch.no_grad():
                value = source if tie.fn is None else tie.fn(source)
                self._entries[dest] = value.detach().clone(memory_format=torch.contiguous_format)
            if src_leaf.key in self._frozen:
                self._frozen.add(dest)
        elif tie.fn is not None:
            _tied_module.remove_transform_tie(owner, tie.name)
        else:
            grad = bool(source.requires_grad)
            _ties.unmark_identity_dest(owner, tie.name, source.detach().clone(), grad)
        self._changed()
        return self

    # ----------------------------------------------------------------- DCP Stateful

    def state_dict(self) -> dict[str, Tensor]:
        """The live stored tensors by key (DTensors over a sharded model), each once:
        tie destinations left out. With `load_state_dict` this makes a ModelState a
        ``torch.distributed.checkpoint`` ``Stateful``, loaded in place (resharding included):
        ``dcp.save({"model": ms}, checkpoint_id=path)``, then ``dcp.load({"model": ms}, ...)``.

        >>> import torch
        >>> ms = ModelState.new(torch.nn.Linear(2, 1))
        >>> ms.state_dict()["weight"] is ms.module.weight
        True
        """
        return {leaf.key: leaf.tensor for leaf in self._idx().leaves}

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

    # ----------------------------------------------------------------- mapping access

    def __getitem__(self, key: KeyLike) -> Tensor:
        """The live tensor under `key` (a key or a path); tie destinations resolved as in
        `to_dict`: an identity destination is its source's tensor, a transform destination
        is computed now (detached). An unknown key is a `KeyError` with a "did you mean"."""
        name = key if isinstance(key, str) else to_key(key)
        index = self._idx()
        leaf = index.by_key.get(name)
        if leaf is not None:
            return leaf.tensor
        tie = index.ties.get(name)
        if tie is not None and tie.fn is not None:
            return tie.fn(index.by_key[tie.source].tensor).detach()
        msg = f"ModelState[{name!r}]: unknown key; the model has no such parameter or state."
        raise KeyNotFoundError(msg + index.did_you_mean(name))

    def __contains__(self, key: object) -> bool:
        """Whether `key` is one of `to_dict`'s keys (tie destinations included)."""
        index = self._idx()
        return isinstance(key, str) and (key in index.by_key or key in index.ties)

    def __len__(self) -> int:
        """The number of keys in `to_dict` (tie destinations included)."""
        return len(self._idx().order)

    def __iter__(self) -> Iterator[str]:
        """The keys in `to_dict` order (module order, tie destinations included)."""
        return iter(list(self._idx().order))

    # ----------------------------------------------------------------- repr

    def __repr__(self) -> str:
        index = self._idx()
        total = [0, 0]
        params = [0, 0]
        state = [0, 0]
        for leaf in index.leaves:
            n = leaf.tensor.numel()
            size = n * leaf.tensor.element_size()
            total[0] += n
            total[1] += size
            if not self._is_frozen(leaf):
                bucket = params if leaf.is_param else state
                bucket[0] += n
                bucket[1] += size
        return (
            "ModelState<\n"
            f"  Parameters: {total[0]} ({format_bytes(total[1])})\n"
            f"  Trainable Parameters: {params[0]} ({format_bytes(params[1])})\n"
            f"  Trainable State: {state[0]} ({format_bytes(state[1])})\n"
            ">"
        )


def _refuse_constructor_arguments(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    given = type(args[0]).__name__ if args else ", ".join(f"{k}=" for k in kwargs)
    msg = (
        "`ModelState(...)` takes no arguments: build a ModelState with `ModelState.new`.\n"
        f"  got: ModelState({given})\n"
        "  fix: `ModelState.new(model)` for a live view of an nn.Module (or of a dict of "
        "tensors); `ModelState.empty()` for an empty one"
    )
    raise TypeError(msg)


def format_bytes(n: int) -> str:
    """Decimal units with two decimals: ``4840 -> '4.84 KB'``.

    >>> format_bytes(999), format_bytes(4840), format_bytes(3 * 10**15)
    ('999 B', '4.84 KB', '3000.00 TB')
    """
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if round(value, 2) < 1000 or unit == "TB":
            return f"{value:.2f} {unit}"
    raise AssertionError  # unreachable


def _values(obj: Values, name: str, *, state_only: bool = False) -> Mapping[str, Any]:
    """A flat ``{key: value}`` view of an update argument (of a ModelState: its tensors,
    or only its state when it is given as `updated_state`)."""
    if isinstance(obj, ModelState):
        index = obj._idx()
        return {
            leaf.key: leaf.tensor for leaf in index.leaves if not (state_only and leaf.is_param)
        }
    if isinstance(obj, Mapping):
        return obj  # nested dicts are flattened by `_gather` when it meets one
    msg = (
        f"`{name}` must be a dict of tensors (flat or nested) or a ModelState.\n"
        f"  got: {type(obj).__name__}"
    )
    raise TypeError(msg)


def _dedupe(
    index: Index, dsts: list[Tensor], srcs: list[Tensor], keys: list[str]
) -> tuple[list[Tensor], list[Tensor]]:
    """Write each tied tensor once; two different values for it are an error."""
    first: dict[int, int] = {}
    out_d: list[Tensor] = []
    out_s: list[Tensor] = []
    for dst, src, key in zip(dsts, srcs, keys, strict=True):
        seen = first.get(id(dst))
        if seen is None:
            first[id(dst)] = len(out_d)
            out_d.append(dst)
            out_s.append(src)
        elif not _kernels.same_values(out_s[seen], src):
            other = next(k for k, d in zip(keys, dsts, strict=True) if d is dst)
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
    return out_d, out_s


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
            _raise_unknown(index, key, "update")
            continue
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


def _raise_unknown(index: Index, key: str, verb: str) -> Any:
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
