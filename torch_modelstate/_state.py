"""`ModelState`: a model's parameters and state by key, with masks, ties, update and merge."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn

from torch_modelstate import _frozen, _groups, _kernels, _pack, _tied_module, _ties, _update
from torch_modelstate._errors import KeyNotFoundError
from torch_modelstate._groups import Rules
from torch_modelstate._index import Index, Leaf, Tie, current_index, forget, index_entries, unwrap
from torch_modelstate._masks import MaskLike, compile_mask
from torch_modelstate._paths import to_flat, to_key
from torch_modelstate._summary import format_bytes as format_bytes  # re-exported
from torch_modelstate._summary import refuse_constructor_arguments, summary
from torch_modelstate.merges import Merge

__all__ = ["ModelState"]

Values: TypeAlias = "Mapping[str, Any] | ModelState"
MergeFn: TypeAlias = "Callable[[list[str], Tensor, Tensor], Tensor] | Merge"
KeyLike: TypeAlias = "str | Sequence[str]"


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
        if dtype is None and target is None:
            cloned = _kernels.clone(tensors)
            if _pack.layout_of(tensors) is not None:  # a packed state clones packed (speed)
                _pack.pack(cloned)
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
        _pack.pack([leaf.tensor for leaf in self._idx().leaves])
        return self

    def param_groups(
        self, rules: Rules | None = None, *, strict: bool = True, **defaults: Any
    ) -> list[dict[str, Any]]:
        """Param groups for a ``torch.optim`` optimizer, chosen by mask.

        `rules` maps masks to option dicts (a dict, or a list of ``(mask, options)`` pairs);
        the first rule whose mask selects a parameter decides its group, and the rest go
        into a last group with `defaults`, which also fill in options a rule leaves out.
        Only trainable parameters are grouped, each tied tensor once; groups follow rule
        order, empty groups are left out, and each carries ``"param_names"`` (its keys).
        A string in a mask that matches no key is a `KeyError` unless ``strict=False``.

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        >>> groups = ModelState.new(model).param_groups({"**.bias": {"weight_decay": 0.0}})
        >>> [(g["param_names"], g.get("weight_decay")) for g in groups]
        [(['0.bias', '1.bias', '2.bias'], 0.0), (['0.weight', '1.weight', '2.weight'], None)]
        >>> opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05)
        """
        index = self._idx()
        trainable = [leaf.is_param and not self._is_frozen(leaf) for leaf in index.leaves]
        return _groups.build(
            index.keys,
            index.paths,
            _tie_aliases(index),
            [leaf.tensor for leaf in index.leaves],
            trainable,
            rules,
            defaults,
            strict=strict,
            every_key=index.order,
            did_you_mean=index.did_you_mean,
        )

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
        """Every parameter by key, in module order; tie destinations left out.

        >>> from torch import nn
        >>> list(ModelState.new(nn.Linear(2, 2)).parameters())
        ['weight', 'bias']
        """
        return self._select(True, None)

    def state(self) -> dict[str, Tensor]:
        """Every persistent buffer (BatchNorm statistics, counters...) by key.

        >>> from torch import nn
        >>> list(ModelState.new(nn.BatchNorm1d(2)).state())
        ['running_mean', 'running_var', 'num_batches_tracked']
        """
        return self._select(False, None)

    def trainable_parameters(self) -> dict[str, Tensor]:
        """Parameters that are not frozen: hand ``.values()`` to an optimizer.

        >>> import torch
        >>> from torch import nn
        >>> ms = ModelState.new(nn.Linear(2, 2)).freeze("bias")
        >>> optimizer = torch.optim.SGD(ms.trainable_parameters().values(), lr=0.1)
        >>> list(ms.trainable_parameters())
        ['weight']
        """
        return self._select(True, False)

    def frozen_parameters(self) -> dict[str, Tensor]:
        """Frozen parameters (``requires_grad=False`` for a module).

        >>> from torch import nn
        >>> layer = nn.Linear(2, 2)
        >>> _ = layer.bias.requires_grad_(False)
        >>> list(ModelState.new(layer).frozen_parameters())
        ['bias']
        """
        return self._select(True, True)

    def trainable_state(self) -> dict[str, Tensor]:
        """State that forward passes may update.

        >>> from torch import nn
        >>> list(ModelState.new(nn.BatchNorm1d(2)).freeze("running_var").trainable_state())
        ['running_mean', 'num_batches_tracked']
        """
        return self._select(False, False)

    def frozen_state(self) -> dict[str, Tensor]:
        """State that keeps its value through forward passes.

        >>> from torch import nn
        >>> list(ModelState.new(nn.BatchNorm1d(2)).freeze("running_*").frozen_state())
        ['running_mean', 'running_var']
        """
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

        >>> from torch import nn
        >>> model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": nn.Linear(4, 10)})
        >>> model["head"].weight = model["embed"].weight
        >>> ModelState.new(model).ties()
        {'head.weight': 'embed.weight'}
        """
        return {dest: tie.source for dest, tie in self._idx().ties.items()}

    def transforms(self) -> dict[str, str | None]:
        """``{destination: transform name}`` for transform ties (None: an unnamed callable).

        >>> from torch import nn
        >>> model = nn.ModuleDict({"enc": nn.Linear(4, 2), "dec": nn.Linear(2, 4)})
        >>> ModelState.new(model).tie("dec.weight", "enc.weight", "transpose").transforms()
        {'dec.weight': 'transpose'}
        """
        return {d: t.fn_name for d, t in self._idx().ties.items() if t.fn is not None}

    # ----------------------------------------------------------------- freezing

    def freeze(self, mask: MaskLike = None, *, strict: bool = True) -> ModelState:
        """Freeze the leaves `mask` selects (all by default), adding to what is frozen.

        A frozen parameter gets ``requires_grad=False``; a frozen buffer keeps its value
        through forward passes (a frozen BatchNorm still normalises with batch statistics
        in training, but its running statistics stay put). A key or glob that names a tie
        destination freezes its source (one tensor). With `strict` (the default) each key
        or glob in `mask` must match at least one key, tie destinations included: a typo
        is a `KeyError` with a "did you mean"; ``strict=False`` lets strings match nothing.
        The whole mask is checked and evaluated before anything changes.

        >>> import torch
        >>> from torch import nn
        >>> ms = ModelState.new(nn.Linear(2, 2)).freeze("bias")
        >>> list(ms.frozen_parameters())
        ['bias']
        >>> ms.freeze("bais")
        Traceback (most recent call last):
        ...
        torch_modelstate._errors.KeyNotFoundError: freeze: the mask 'bais' matches no key...
        """
        self._apply_frozen(self._chosen(mask, strict, "freeze"), True)
        return self

    def unfreeze(
        self,
        mask: MaskLike = None,
        *,
        strict: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
        **group_options: Any,
    ) -> ModelState:
        """Unfreeze the leaves `mask` selects (all by default); strict as `freeze`.

        With `optimizer`, the selected parameters it does not hold yet (by identity) are
        added to it as one new param group with `group_options` (gradual unfreezing);
        nothing is added twice. The mask and the optimizer are checked before anything
        changes.

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> ms = ModelState.new(model).freeze("0.**")
        >>> opt = torch.optim.SGD(ms.trainable_parameters().values(), lr=0.1)
        >>> _ = ms.unfreeze("0.**", optimizer=opt, lr=0.01)
        >>> [len(group["params"]) for group in opt.param_groups], opt.param_groups[1]["lr"]
        ([2, 2], 0.01)
        """
        chosen = self._chosen(mask, strict, "unfreeze")
        if optimizer is not None:
            _groups.check_optimizer(optimizer, group_options)
        elif group_options:
            names = ", ".join(sorted(group_options))
            msg = (
                "unfreeze: param-group options were given without an optimizer.\n"
                f"  got: {names}\n"
                "  fix: pass optimizer=... to add the unfrozen parameters to it, or drop them"
            )
            raise TypeError(msg)
        self._apply_frozen(chosen, False)
        if optimizer is not None:
            params = {leaf.key: leaf.tensor for leaf in chosen if leaf.is_param}
            _groups.add_param_group(optimizer, params, group_options)
        return self

    def _chosen(self, mask: MaskLike, strict: bool, verb: str) -> list[Leaf]:
        """The leaves `mask` selects (a tie destination's key selects its source), after
        the strict check; nothing is changed here."""
        compiled = compile_mask(mask)
        index = self._idx()
        if strict:
            compiled.check_strict(index.order, index.did_you_mean, verb)
        hits = compiled.select(index.keys, index.paths, _tie_aliases(index))
        return [leaf for leaf, hit in zip(index.leaves, hits, strict=True) if hit]

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
        the materialised value); the model keeps working and the source is unchanged.

        >>> from torch import nn
        >>> model = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
        >>> ms = ModelState.new(model).tie("b.weight", "a.weight").untie("b.weight")
        >>> ms.ties(), model["b"].weight is model["a"].weight
        ({}, False)
        """
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
        return summary(total, params, state)


def _as_values(obj: Values) -> Mapping[str, Any] | Index:
    """An update argument as `_update` takes it: a ModelState stands as its index."""
    return obj._idx() if isinstance(obj, ModelState) else obj


def _tie_aliases(index: Index) -> dict[int, list[str]] | None:
    """``{leaf position: keys of the tie destinations that name it}`` (None: no ties)."""
    if not index.ties:
        return None
    aliases: dict[int, list[str]] = {}
    for dest, tie in index.ties.items():
        source = index.by_key.get(tie.source)
        if source is not None:
            aliases.setdefault(index.keys.index(source.key), []).append(dest)
    return aliases


def _empty_copy(t: Tensor, dtype: torch.dtype | None, device: torch.device | None) -> Tensor:
    """Uninitialised memory for a copy of `t`: floats cast to `dtype`, on `device`."""
    cast = dtype if dtype is not None and t.dtype.is_floating_point else t.dtype
    return torch.empty_like(t, dtype=cast, device=device if device is not None else t.device)
