"""The mechanism of transform ties: a cooperative class swap on the destination module.

A transform tie (``transform=torch.t``) must hold no storage, stay live after
``.to()``/``deepcopy``/optimizer steps and let gradients reach the source. We do not use
``torch.nn.utils.parametrize``: it keeps an ``original`` tensor of its own and renames the
destination's state_dict key. Instead the destination's parameter is removed and the
module's class is swapped for a subclass, ``Tied{Base}`` (made once per class, honestly
named as parametrize's ``Parametrized{Base}``), whose ``__getattr__`` computes the
attribute from the source *on every access*. ``isinstance`` stays true.

Cooperation with other class swaps (parametrize, ``fully_shard``, our own on top of theirs):
every generated method reaches the rest of the class chain through ``super(cls, self)``
of the class it belongs to, never through ``__mro__[1]``; untie only restores the class
when ours is still the outermost, and otherwise leaves it in place with no ties, where it
forwards everything.

The tie's record holds the source's owning module and attribute name, never the tensor,
so it follows a replaced or moved parameter (``fully_shard``, ``to_empty``), and
``copy.deepcopy`` of the model maps it to the copy's own source. State-dict keys stay as
before the tie through the public hooks: a state-dict post-hook writes the computed value
under the destination's key, in its place, and a load pre-hook accepts and skips it.

Assigning a plain tensor to the tied attribute shadows it until the value read before is
assigned back or the attribute is deleted: that is what ``torch.func.functional_call``
does. Assigning an ``nn.Parameter`` is refused (untie first).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torch_modelstate._ties import Transform

_TIES = "_tms_ties"  # {name: TransformTie} on the destination module
_ORDER = "_tms_param_order"  # parameter names in their order before the first transform tie
_SHADOWS = "_tms_shadows"  # {name: tensor} assigned over a tied attribute (functional_call)
_LAST = "_tms_last_read"  # {name: weakref to the value last computed}
_KEEP_VARS = "_tms_keep_vars"  # keep_vars of the state_dict() call in progress
_HOOKS = "_tms_tie_hooks"  # ids of our state-dict hooks, to remove them on the last untie
_MARK = "_tms_tied_class"

_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


@dataclass(eq=False)
class TransformTie:
    """The record kept on a destination module for one transform-tied attribute."""

    source_owner: nn.Module
    source_name: str
    fn: Transform
    name: str | None

    def value(self) -> Tensor:
        """The destination's value now: the transform of the source's current tensor."""
        return self.fn(getattr(self.source_owner, self.source_name))


def transform_ties_of(module: nn.Module) -> dict[str, TransformTie]:
    """The transform ties whose destination is an attribute of `module`, by name."""
    ties: dict[str, TransformTie] | None = module.__dict__.get(_TIES)
    return ties if ties is not None else {}


def parameter_order(module: nn.Module) -> list[str]:
    """Parameter names, transform-tied ones included, in their order before the first tie."""
    before: list[str] = module.__dict__.get(_ORDER, [])
    present = set(module._parameters) | set(transform_ties_of(module))
    names = [name for name in before if name in present]
    return names + [name for name in module._parameters if name not in set(names)]


def _is_compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def _make_class(base: type[nn.Module]) -> type[nn.Module]:
    cls: type[nn.Module]  # the class made below; every method reaches past it with super()

    def __getattr__(self: nn.Module, name: str) -> Any:  # noqa: N807
        ties = self.__dict__.get(_TIES)
        if ties is not None:
            tie = ties.get(name)
            if tie is not None:
                shadows = self.__dict__.get(_SHADOWS)
                if shadows and name in shadows:
                    return shadows[name]
                value = tie.value()
                if not _is_compiling():
                    self.__dict__.setdefault(_LAST, {})[name] = weakref.ref(value)
                return value
        return super(cls, self).__getattr__(name)  # type: ignore[misc]

    def __setattr__(self: nn.Module, name: str, value: Any) -> None:  # noqa: N807
        ties = self.__dict__.get(_TIES)
        if ties is None or name not in ties:
            super(cls, self).__setattr__(name, value)
            return
        if isinstance(value, nn.Parameter) or not isinstance(value, Tensor):
            msg = (
                f"`{name}` of this {type(self).__name__} is computed from a tied source "
                "(a transform tie); it cannot be made a parameter or a non-tensor.\n"
                f"  got: {type(value).__name__}\n"
                "  fix: untie it first with `ModelState.untie`, or write to the source"
            )
            raise AttributeError(msg)
        shadows: dict[str, Tensor] = self.__dict__.setdefault(_SHADOWS, {})
        last = self.__dict__.get(_LAST, {}).get(name)
        if name in shadows and last is not None and last() is value:
            del shadows[name]  # the value read before the shadow was set: the tie is back
        else:
            shadows[name] = value

    def __delattr__(self: nn.Module, name: str) -> None:  # noqa: N807
        ties = self.__dict__.get(_TIES)
        if ties is None or name not in ties:
            super(cls, self).__delattr__(name)
            return
        shadows = self.__dict__.get(_SHADOWS)
        if not shadows or name not in shadows:
            msg = (
                f"`{name}` of this {type(self).__name__} is computed from a tied source "
                "(a transform tie) and cannot be deleted.\n"
                "  fix: untie it first with `ModelState.untie`"
            )
            raise AttributeError(msg)
        del shadows[name]

    def __reduce_ex__(self: nn.Module, protocol: Any) -> Any:  # noqa: N807
        if type(self) is not cls:  # another class was swapped in on top: its rules apply
            return super(cls, self).__reduce_ex__(protocol)
        # Pickle as "base class + state", so tied modules pickle (parametrized ones cannot).
        state = self.__dict__.copy()
        state.pop(_LAST, None)
        return (_new_tied, (base,), state)

    namespace = {
        "__getattr__": __getattr__,
        "__setattr__": __setattr__,
        "__delattr__": __delattr__,
        "__reduce_ex__": __reduce_ex__,
        "__qualname__": f"Tied{base.__qualname__}",
        "__doc__": f"{base.__name__} with transform-tied attributes (see torch_modelstate).",
        _MARK: True,
    }
    cls = type(f"Tied{base.__name__}", (base,), namespace)
    return cls


def _tied_class(base: type[nn.Module]) -> type[nn.Module]:
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = _make_class(base)
    return cls


def _new_tied(base: type[nn.Module]) -> nn.Module:
    module: nn.Module = object.__new__(_tied_class(base))
    return module


def _has_tied_class(module: nn.Module) -> bool:
    return any(klass.__dict__.get(_MARK, False) for klass in type(module).__mro__)


# --------------------------------------------------------------------------- state-dict hooks


def _state_dict_pre_hook(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    module.__dict__[_KEEP_VARS] = keep_vars


def _state_dict_post_hook(
    module: nn.Module, destination: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    ties = transform_ties_of(module)
    if not ties:
        return
    keep_vars = module.__dict__.pop(_KEEP_VARS, False)
    for name in ties:
        value = getattr(module, name)  # what forward sees: computed, or a shadow set over it
        # Materialised and contiguous: a state dict is a snapshot, and readers such as
        # safetensors' save_model refuse non-contiguous views (a transpose is one).
        destination[prefix + name] = value if keep_vars else value.detach().contiguous()
    # This module's entries are the newest ones (children included): put its parameters
    # back in their order before the tie, ahead of its buffers and children.
    order = parameter_order(module)
    own = set(order) | set(module._buffers) | set(module._modules) | {"_extra_state"}
    tail: list[str] = []
    for key in reversed(destination):
        if not key.startswith(prefix) or key[len(prefix) :].split(".", 1)[0] not in own:
            break
        tail.append(key)
    tail.reverse()
    rank = {prefix + name: i for i, name in enumerate(order)}
    for key in sorted(tail, key=lambda k: rank.get(k, len(rank))):
        destination[key] = destination.pop(key)


def _load_pre_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # The destination's value comes from its source's key; its own key is accepted and skipped.
    for name in transform_ties_of(module):
        state_dict.pop(prefix + name, None)


# --------------------------------------------------------------------------- tie / untie


def add_transform_tie(
    owner: nn.Module,
    name: str,
    source_owner: nn.Module,
    source_name: str,
    fn: Transform,
    fn_name: str | None,
) -> None:
    """Replace ``owner.<name>`` (a parameter) by a value computed from the source on access."""
    if not _has_tied_class(owner):
        owner.__class__ = _tied_class(type(owner))
    if _TIES not in owner.__dict__:
        owner.__dict__[_ORDER] = list(owner._parameters)
        owner.__dict__[_HOOKS] = (
            owner.register_state_dict_pre_hook(_state_dict_pre_hook).id,  # type: ignore[no-untyped-call]
            owner.register_state_dict_post_hook(_state_dict_post_hook).id,  # type: ignore[no-untyped-call]
            owner.register_load_state_dict_pre_hook(_load_pre_hook).id,  # type: ignore[no-untyped-call]
        )
        owner.__dict__[_TIES] = {}
    del owner._parameters[name]
    owner.__dict__[_TIES][name] = TransformTie(source_owner, source_name, fn, fn_name)


def remove_transform_tie(owner: nn.Module, name: str) -> Tensor:
    """Undo `add_transform_tie`, giving ``owner.<name>`` its materialised value; returns it."""
    ties = transform_ties_of(owner)
    tie = ties[name]
    source = getattr(tie.source_owner, tie.source_name)
    with torch.no_grad():
        value = tie.fn(source).detach().clone(memory_format=torch.contiguous_format)
    parameter = nn.Parameter(value, requires_grad=bool(source.requires_grad))
    del ties[name]
    owner.__dict__.get(_SHADOWS, {}).pop(name, None)
    owner.__dict__.get(_LAST, {}).pop(name, None)
    order = owner.__dict__[_ORDER]
    owner._parameters[name] = parameter
    rank = {n: i for i, n in enumerate(order)}
    items = sorted(owner._parameters.items(), key=lambda item: rank.get(item[0], len(rank)))
    owner._parameters.clear()
    owner._parameters.update(items)
    if not ties:
        _remove_machinery(owner)
    return parameter


def _remove_machinery(owner: nn.Module) -> None:
    pre, post, load = owner.__dict__.pop(_HOOKS)
    owner._state_dict_pre_hooks.pop(pre, None)
    owner._state_dict_hooks.pop(post, None)
    owner._load_state_dict_pre_hooks.pop(load, None)
    for attr in (_TIES, _ORDER, _SHADOWS, _LAST, _KEEP_VARS):
        owner.__dict__.pop(attr, None)
    cls = type(owner)
    if cls.__dict__.get(_MARK, False):
        # Ours is the outermost class: restore the one we replaced. Otherwise another
        # library swapped its class in on top; ours stays below it, holding no ties.
        owner.__class__ = cls.__bases__[0]
