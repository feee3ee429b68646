"""Freezing a `ModelState`: which leaves are frozen, and `freeze`/`unfreeze` by mask.

`Freezing` is a mixin of `ModelState`; over a module the truth is ``requires_grad`` and
`_frozen`'s buffer marks, over a dict the state's own frozen set.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torch_modelstate import _frozen, _groups, _kernels
from torch_modelstate._index import Index, Leaf
from torch_modelstate._masks import MaskLike, compile_mask
from torch_modelstate._views import tie_aliases

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Freezing"]


class Freezing:
    """Reading and changing what is frozen (a mixin; `ModelState` holds the state)."""

    __slots__ = ()

    if TYPE_CHECKING:
        _module: nn.Module | None
        _frozen: set[str]

        def _idx(self) -> Index: ...

    def _is_frozen(self, leaf: Leaf) -> bool:
        if leaf.owner is None:
            return leaf.key in self._frozen
        if leaf.is_param:
            return not leaf.tensor.requires_grad
        return leaf.name in _frozen.frozen_buffers(leaf.owner)

    def _frozen_keys(self, index: Index) -> set[str]:
        return {leaf.key for leaf in index.leaves if self._is_frozen(leaf)}

    # ----------------------------------------------------------------- freezing

    def freeze(self, mask: MaskLike = None, *, strict: bool = True) -> Self:
        """Freeze the leaves `mask` selects (all by default), adding to what is frozen.

        A frozen parameter gets ``requires_grad=False``; a frozen buffer keeps its value
        through forward passes (a frozen BatchNorm still normalises with batch statistics
        in training, but its running statistics stay put). A key or glob that names a tie
        destination freezes its source (one tensor). With `strict` (the default) each key
        or glob in `mask` must match at least one key, tie destinations included: a typo
        is a `KeyError` with a "did you mean"; ``strict=False`` lets strings match nothing.
        The whole mask is checked and evaluated before anything changes.

        >>> from torch_modelstate import ModelState
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
    ) -> Self:
        """Unfreeze the leaves `mask` selects (all by default); strict as `freeze`.

        With `optimizer`, the selected parameters it does not hold yet (by identity) are
        added to it as one new param group with `group_options` (gradual unfreezing);
        nothing is added twice. The mask and the optimizer are checked before anything
        changes.

        >>> from torch_modelstate import ModelState
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
        hits = compiled.select(index.keys, index.paths, tie_aliases(index))
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
