"""Tying a `ModelState`: `tie` and `untie` (rules in `_ties`, mechanism in `_tied_module`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from torch_modelstate import _tied_module, _ties
from torch_modelstate._errors import KeyNotFoundError
from torch_modelstate._index import Index, Tie, current_index
from torch_modelstate._paths import to_key
from torch_modelstate._views import KeyLike

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Tying"]


class Tying:
    """Making and breaking ties (a mixin; `ModelState` holds the state)."""

    __slots__ = ()

    if TYPE_CHECKING:
        _module: nn.Module | None
        _entries: dict[str, Tensor | Tie]
        _frozen: set[str]

        def _idx(self) -> Index: ...

        def _changed(self) -> None: ...

    def tie(
        self,
        destination: KeyLike,
        source: KeyLike,
        transform: str | Callable[[Tensor], Tensor] | None = None,
    ) -> Self:
        """Tie `destination` to `source`: the same tensor, or ``transform(source)``.

        Without a transform, the destination becomes the source's ``nn.Parameter`` object.
        With one (a registered name such as ``"transpose"``, or a callable), the
        destination is computed from the source on every use, holds no storage and passes
        gradients to the source. Ties survive ``.to()``, ``copy.deepcopy``, optimizer steps
        and checkpoints. Everything is checked before the model changes.

        >>> from torch_modelstate import ModelState
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

    def untie(self, destination: KeyLike) -> Self:
        """Give a tie destination its own copy of its current value (for a transform tie,
        the materialised value); the model keeps working and the source is unchanged.

        >>> from torch_modelstate import ModelState
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
