"""Read-only views of a `ModelState`: accessors, param groups, mapping access and repr.

`StateViews` is the mixin `ModelState` is built on. It only reads, through two hooks that
`ModelState` provides: ``_idx()`` (the current index) and ``_is_frozen(leaf)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from torch import Tensor

from torch_modelstate import _groups
from torch_modelstate._errors import KeyNotFoundError
from torch_modelstate._groups import Rules
from torch_modelstate._index import Index, Leaf
from torch_modelstate._paths import to_key
from torch_modelstate._summary import summary

__all__ = ["KeyLike", "StateViews", "tie_aliases"]

KeyLike: TypeAlias = "str | Sequence[str]"


class StateViews:
    """What a `ModelState` shows without changing anything (a mixin; no state of its own)."""

    __slots__ = ()

    if TYPE_CHECKING:

        def _idx(self) -> Index: ...

        def _is_frozen(self, leaf: Leaf) -> bool: ...

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

        >>> from torch_modelstate import ModelState
        >>> from torch import nn
        >>> list(ModelState.new(nn.Linear(2, 2)).parameters())
        ['weight', 'bias']
        """
        return self._select(True, None)

    def state(self) -> dict[str, Tensor]:
        """Every persistent buffer (BatchNorm statistics, counters...) by key.

        >>> from torch_modelstate import ModelState
        >>> from torch import nn
        >>> list(ModelState.new(nn.BatchNorm1d(2)).state())
        ['running_mean', 'running_var', 'num_batches_tracked']
        """
        return self._select(False, None)

    def trainable_parameters(self) -> dict[str, Tensor]:
        """Parameters that are not frozen: hand ``.values()`` to an optimizer.

        >>> from torch_modelstate import ModelState
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

        >>> from torch_modelstate import ModelState
        >>> from torch import nn
        >>> layer = nn.Linear(2, 2)
        >>> _ = layer.bias.requires_grad_(False)
        >>> list(ModelState.new(layer).frozen_parameters())
        ['bias']
        """
        return self._select(True, True)

    def trainable_state(self) -> dict[str, Tensor]:
        """State that forward passes may update.

        >>> from torch_modelstate import ModelState
        >>> from torch import nn
        >>> list(ModelState.new(nn.BatchNorm1d(2)).freeze("running_var").trainable_state())
        ['running_mean', 'num_batches_tracked']
        """
        return self._select(False, False)

    def frozen_state(self) -> dict[str, Tensor]:
        """State that keeps its value through forward passes.

        >>> from torch_modelstate import ModelState
        >>> from torch import nn
        >>> list(ModelState.new(nn.BatchNorm1d(2)).freeze("running_*").frozen_state())
        ['running_mean', 'running_var']
        """
        return self._select(False, True)

    def to_dict(self) -> dict[str, Tensor]:
        """Every key, like ``state_dict()``: tie destinations included and resolved.

        An identity destination maps to its source's tensor; a transform destination to
        the transform of the source, computed now (detached).

        >>> from torch_modelstate import ModelState
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

        >>> from torch_modelstate import ModelState
        >>> from torch import nn
        >>> model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": nn.Linear(4, 10)})
        >>> model["head"].weight = model["embed"].weight
        >>> ModelState.new(model).ties()
        {'head.weight': 'embed.weight'}
        """
        return {dest: tie.source for dest, tie in self._idx().ties.items()}

    def transforms(self) -> dict[str, str | None]:
        """``{destination: transform name}`` for transform ties (None: an unnamed callable).

        >>> from torch_modelstate import ModelState
        >>> from torch import nn
        >>> model = nn.ModuleDict({"enc": nn.Linear(4, 2), "dec": nn.Linear(2, 4)})
        >>> ModelState.new(model).tie("dec.weight", "enc.weight", "transpose").transforms()
        {'dec.weight': 'transpose'}
        """
        return {d: t.fn_name for d, t in self._idx().ties.items() if t.fn is not None}

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

        >>> from torch_modelstate import ModelState
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
            tie_aliases(index),
            [leaf.tensor for leaf in index.leaves],
            trainable,
            rules,
            defaults,
            strict=strict,
            every_key=index.order,
            did_you_mean=index.did_you_mean,
        )

    # ----------------------------------------------------------------- DCP Stateful (read side)

    def state_dict(self) -> dict[str, Tensor]:
        """The live stored tensors by key (DTensors over a sharded model), each once:
        tie destinations left out. With `load_state_dict` this makes a ModelState a
        ``torch.distributed.checkpoint`` ``Stateful``, loaded in place (resharding included):
        ``dcp.save({"model": ms}, checkpoint_id=path)``, then ``dcp.load({"model": ms}, ...)``.

        >>> from torch_modelstate import ModelState
        >>> import torch
        >>> ms = ModelState.new(torch.nn.Linear(2, 1))
        >>> ms.state_dict()["weight"] is ms.module.weight
        True
        """
        return {leaf.key: leaf.tensor for leaf in self._idx().leaves}

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


def tie_aliases(index: Index) -> dict[int, list[str]] | None:
    """``{leaf position: keys of the tie destinations that name it}`` (None: no ties)."""
    if not index.ties:
        return None
    aliases: dict[int, list[str]] = {}
    for dest, tie in index.ties.items():
        source = index.by_key.get(tie.source)
        if source is not None:
            aliases.setdefault(index.keys.index(source.key), []).append(dest)
    return aliases
