"""Weight ties inside a module: identity ties, transform ties and their transforms.

An *identity* tie needs no machinery: the destination module attribute is made the
source's ``nn.Parameter`` object, so optimizers, ``.to()``, ``deepcopy`` and gradient
accumulation treat the two names as the one tensor they are.

A *transform* tie (``transform=torch.t``) must hold no storage, stay live after
``.to()``/``deepcopy``/optimizer steps and let gradients reach the source. We do not use
``torch.nn.utils.parametrize``: it keeps an ``original`` tensor of its own and renames the
destination's state_dict key. Instead the destination module's class is swapped for a
subclass (made once per class, like parametrize does) whose ``__getattr__`` computes the
attribute from the source *on every access*. The tie's record holds the source's owning
module and attribute name, never the tensor, so it follows a replaced or moved parameter,
and ``copy.deepcopy`` of the whole model maps it to the copy's own source. The subclass
also writes the computed value under the original key in ``state_dict()`` and skips that
key in ``load_state_dict()``, so checkpoints and keys look exactly as before the tie.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from torch_modelstate._errors import KeyNotFoundError

if TYPE_CHECKING:
    from torch_modelstate._index import Index
    from torch_modelstate._state import ModelState

__all__ = ["register_transform", "registered_transforms"]

Transform = Callable[[Tensor], Tensor]

_BY_NAME: dict[str, Transform] = {}
_NAME_OF: dict[int, str] = {}
_KEEP: list[object] = []  # keep aliased callables alive so their ids stay unique


def register_transform(name: str, fn: Transform, *, aliases: tuple[object, ...] = ()) -> None:
    """Register `fn` under `name`, so ties using it can be saved in checkpoints.

    `aliases` are other callables that mean the same transform (``torch.Tensor.t`` for
    ``torch.t``); a tie made with any of them is saved under `name`. Names are unique.

    >>> import torch
    >>> def flip_rows(t):
    ...     return t.flip(0)
    >>> register_transform("flip_rows", flip_rows)
    >>> "flip_rows" in registered_transforms()
    True
    """
    if not isinstance(name, str) or not name:
        msg = f"A transform name must be a non-empty string.\n  got: {name!r}"
        raise TypeError(msg)
    if not callable(fn):
        msg = f"Transform {name!r} must be callable.\n  got: {type(fn).__name__} {fn!r}"
        raise TypeError(msg)
    for item in (fn, *aliases):
        other = _NAME_OF.get(id(item))
        if other is not None and other != name:
            msg = (
                f"{item!r} is already registered as the transform {other!r}.\n"
                "  fix: use that name; one callable has one name so checkpoints stay unambiguous"
            )
            raise ValueError(msg)
    known = _BY_NAME.get(name)
    if known is not None and known is not fn:
        msg = (
            f"A different transform is already registered as {name!r}.\n"
            f"  registered: {known!r}\n  got: {fn!r}\n  fix: choose another name"
        )
        raise ValueError(msg)
    _BY_NAME[name] = fn
    for item in (fn, *aliases):
        _KEEP.append(item)
        _NAME_OF[id(item)] = name


def registered_transforms() -> dict[str, Transform]:
    """The registered transforms by name."""
    return dict(_BY_NAME)


def resolve_transform(transform: str | Transform | None) -> tuple[Transform | None, str | None]:
    """``(callable, name)`` for a tie's `transform`; the name is None for unnamed callables."""
    if transform is None:
        return None, None
    if isinstance(transform, str):
        fn = _BY_NAME.get(transform)
        if fn is None:
            msg = (
                f"Unknown transform {transform!r}.\n"
                f"  expected: one of {sorted(_BY_NAME)}\n"
                "  fix: register it with `torch_modelstate.register_transform(name, fn)`"
            )
            raise ValueError(msg)
        return fn, transform
    if callable(transform):
        return transform, _NAME_OF.get(id(transform))
    msg = (
        "`transform` must be None, a registered name or a callable.\n"
        f"  got: {type(transform).__name__} {transform!r}"
    )
    raise TypeError(msg)


register_transform("transpose", torch.t, aliases=(torch.Tensor.t,))


@dataclass(eq=False)
class TransformTie:
    """The record kept on a destination module for one transform-tied attribute."""

    source_owner: nn.Module
    source_name: str
    fn: Transform
    name: str | None

    def value(self) -> Tensor:
        return self.fn(getattr(self.source_owner, self.source_name))


_TIED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}
_ORDER = "_tms_param_order"  # parameter names in their order before the first transform tie
IDENTITY_DESTS = "_tms_tied_params"  # names made identity destinations by `tie` (a direction hint)


def transform_ties_of(module: nn.Module) -> dict[str, TransformTie]:
    ties: dict[str, TransformTie] | None = module.__dict__.get("_tms_ties")
    return ties if ties is not None else {}


def parameter_order(module: nn.Module) -> list[str]:
    """Parameter names, transform-tied ones included, in their order before the first tie."""
    before: list[str] = module.__dict__.get(_ORDER, [])
    present = set(module._parameters) | set(transform_ties_of(module))
    names = [name for name in before if name in present]
    return names + [name for name in module._parameters if name not in set(names)]


def _tied_getattr(self: nn.Module, name: str) -> Any:
    ties = self.__dict__.get("_tms_ties")
    if ties is not None and name in ties:
        return ties[name].value()
    base: Any = self.__class__.__mro__[1]
    return base.__getattr__(self, name)


def _tied_setattr(self: nn.Module, name: str, value: Any) -> None:
    ties = self.__dict__.get("_tms_ties")
    if ties is not None and name in ties:
        msg = (
            f"`{name}` of this {type(self).__name__} is computed from a tied source "
            "(a transform tie) and cannot be assigned.\n"
            "  fix: untie it first with `ModelState.untie`, or write to the source"
        )
        raise AttributeError(msg)
    base: Any = self.__class__.__mro__[1]
    base.__setattr__(self, name, value)


def _tied_save(self: nn.Module, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
    base: Any = self.__class__.__mro__[1]
    start = len(destination)
    base._save_to_state_dict(self, destination, prefix, keep_vars)
    for name, tie in transform_ties_of(self).items():
        value = tie.value()
        # Materialised and contiguous: a state dict is a snapshot, and readers such as
        # safetensors' save_model refuse non-contiguous views (a transpose is one).
        destination[prefix + name] = value if keep_vars else value.detach().contiguous()
    # This module's keys are the newest entries: put them back in their order before the tie.
    own = list(islice(reversed(destination), len(destination) - start))[::-1]
    rank = {prefix + name: i for i, name in enumerate(self.__dict__.get(_ORDER, ()))}
    for key in sorted(own, key=lambda k: (0, rank[k]) if k in rank else (1, 0)):
        destination[key] = destination.pop(key)


def _tied_load(self: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # The destination's value comes from its source's key; its own key is accepted and skipped.
    for name in transform_ties_of(self):
        state_dict.pop(prefix + name, None)
    base: Any = self.__class__.__mro__[1]
    base._load_from_state_dict(self, state_dict, prefix, *args)


def _tied_reduce_ex(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    # Pickle as "base class + state" so tied modules pickle, which parametrizations cannot.
    state = self.__dict__.copy()
    return (_new_tied, (self.__class__.__mro__[1],), state)


def _new_tied(base: type[nn.Module]) -> nn.Module:
    module: nn.Module = object.__new__(_tied_class(base))
    return module


def _tied_class(base: type[nn.Module]) -> type[nn.Module]:
    cls = _TIED_CLASSES.get(base)
    if cls is None:
        namespace = {
            "__getattr__": _tied_getattr,
            "__setattr__": _tied_setattr,
            "_save_to_state_dict": _tied_save,
            "_load_from_state_dict": _tied_load,
            "__reduce_ex__": _tied_reduce_ex,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "_tms_tied_class": True,
        }
        cls = type(base.__name__, (base,), namespace)
        _TIED_CLASSES[base] = cls
    return cls


def add_transform_tie(
    owner: nn.Module,
    name: str,
    source_owner: nn.Module,
    source_name: str,
    fn: Transform,
    fn_name: str | None,
) -> None:
    """Replace ``owner.<name>`` (a parameter) by a value computed from the source on access."""
    if not type(owner).__dict__.get("_tms_tied_class", False):
        owner.__class__ = _tied_class(type(owner))
    ties = owner.__dict__.setdefault("_tms_ties", {})
    owner.__dict__.setdefault(_ORDER, list(owner._parameters))
    del owner._parameters[name]
    ties[name] = TransformTie(source_owner, source_name, fn, fn_name)


def remove_transform_tie(owner: nn.Module, name: str) -> Tensor:
    """Undo `add_transform_tie`, giving ``owner.<name>`` its materialised value; returns it."""
    ties = transform_ties_of(owner)
    tie = ties[name]
    source = getattr(tie.source_owner, tie.source_name)
    with torch.no_grad():
        value = tie.fn(source).detach().clone(memory_format=torch.contiguous_format)
    parameter = nn.Parameter(value, requires_grad=bool(source.requires_grad))
    del ties[name]
    order = owner.__dict__[_ORDER]
    owner._parameters[name] = parameter
    rank = {n: i for i, n in enumerate(order)}
    items = sorted(owner._parameters.items(), key=lambda item: rank.get(item[0], len(rank)))
    owner._parameters.clear()
    owner._parameters.update(items)
    if not ties:
        del owner.__dict__["_tms_ties"]
        del owner.__dict__[_ORDER]
        owner.__class__ = owner.__class__.__mro__[1]
    return parameter


# --------------------------------------------------------------------- ModelState.tie / untie


def tie(ms: ModelState, dest: str, source: str, transform: str | Transform | None) -> None:
    """Check everything about a tie, then make it (see `ModelState.tie`)."""
    from torch_modelstate._index import bump_version

    fn, fn_name = resolve_transform(transform)
    index = ms._idx()
    src_leaf = index.by_key.get(source)
    if src_leaf is None:
        raise _missing_or_computed(index, source, "source")
    root = src_leaf.key  # a source that is an identity destination resolves to its root
    if dest not in index.by_key and dest not in index.ties:
        raise _missing_or_computed(index, dest, "destination")
    if dest in (source, root):
        msg = (
            f"tie: the destination and the source are the same tensor, `{dest}`.\n"
            "  fix: name two different keys"
        )
        raise ValueError(msg)
    existing = index.ties.get(dest)
    if existing is not None:
        if existing.source == root and existing.fn is fn:
            return
        msg = (
            f"tie: `{dest}` is already tied to `{existing.source}`.\n"
            f"  fix: call untie({dest!r}) first"
        )
        raise ValueError(msg)
    dependents = sorted(d for d, t in index.ties.items() if t.source == dest)
    if dependents:
        msg = (
            f"tie: `{dest}` is the source of other ties ({', '.join(dependents)}); "
            "tying it would chain ties.\n"
            f"  fix: untie those first, or tie `{dest}` the other way round"
        )
        raise ValueError(msg)
    dest_leaf = index.by_key[dest]
    if ms._module is not None and not (dest_leaf.is_param and src_leaf.is_param):
        which = dest if not dest_leaf.is_param else root
        msg = f"tie: `{which}` is a buffer; only parameters can be tied in a module."
        raise ValueError(msg)
    if dest_leaf.is_param != src_leaf.is_param:
        msg = f"tie: `{dest}` and `{root}` must both be parameters or both be state."
        raise ValueError(msg)
    _check_compatible(dest, dest_leaf.tensor, root, src_leaf.tensor, fn)

    owner, src_owner = dest_leaf.owner, src_leaf.owner
    if owner is not None and src_owner is not None:
        if fn is None:
            # The very same Parameter object: optimizers, .to() and deepcopy see one tensor.
            owner.register_parameter(dest_leaf.name, _as_parameter(src_leaf.tensor))
            # Discovery reads direction from module order; remember which end is the tie's.
            owner.__dict__.setdefault(IDENTITY_DESTS, set()).add(dest_leaf.name)
        else:
            add_transform_tie(owner, dest_leaf.name, src_owner, src_leaf.name, fn, fn_name)
    else:
        from torch_modelstate._index import Tie

        ms._entries[dest] = Tie(dest, root, fn, fn_name, None, dest)
        ms._frozen.discard(dest)
    ms._changed()
    bump_version()


def untie(ms: ModelState, dest: str) -> None:
    """Give a tie destination its own tensor (see `ModelState.untie`)."""
    from torch_modelstate._index import bump_version

    index = ms._idx()
    tie = index.ties.get(dest)
    if tie is None:
        if dest in index.by_key:
            msg = (
                f"untie: `{dest}` is not a tie destination.\n  fix: `ties()` lists the destinations"
            )
            raise ValueError(msg)
        raise _missing_or_computed(index, dest, "destination")
    src_leaf = index.by_key[tie.source]
    source = src_leaf.tensor
    owner = tie.owner
    if owner is None:
        with torch.no_grad():
            value = source if tie.fn is None else tie.fn(source)
            ms._entries[dest] = value.detach().clone(memory_format=torch.contiguous_format)
        if src_leaf.key in ms._frozen:
            ms._frozen.add(dest)
    elif tie.fn is not None:
        remove_transform_tie(owner, tie.name)
    else:
        if owner is src_leaf.owner and tie.name == src_leaf.name:
            msg = (
                f"untie: `{dest}` and `{tie.source}` are one attribute of one shared submodule; "
                "they cannot be told apart.\n"
                "  fix: replace the shared submodule by a copy (copy.deepcopy) instead"
            )
            raise ValueError(msg)
        copy = source.detach().clone()
        owner.__dict__.get(IDENTITY_DESTS, set()).discard(tie.name)
        if isinstance(source, nn.Parameter):
            owner._parameters[tie.name] = nn.Parameter(
                copy, requires_grad=bool(source.requires_grad)
            )
        else:
            owner._buffers[tie.name] = copy
    ms._changed()
    bump_version()


def _as_parameter(tensor: Tensor) -> nn.Parameter:
    assert isinstance(tensor, nn.Parameter)  # a module leaf with is_param set is one
    return tensor


def _check_compatible(
    dest: str, target: Tensor, source: str, src: Tensor, fn: Transform | None
) -> None:
    if fn is None:
        shape, dtype, device = src.shape, src.dtype, src.device
        what = f"`{source}`"
    else:
        value = _probe(fn, src)
        shape, dtype, device = value.shape, value.dtype, value.device
        what = f"the transformed `{source}`"
    if shape != target.shape:
        msg = (
            f"tie: {what} does not fit `{dest}`.\n"
            f"  expected shape: {tuple(target.shape)}\n  got: {tuple(shape)}"
        )
        if fn is None and tuple(reversed(shape)) == tuple(target.shape):
            msg += "\n  fix: pass transform='transpose'"
        raise ValueError(msg)
    if dtype != target.dtype or device != target.device:
        msg = (
            f"tie: {what} and `{dest}` differ in dtype or device.\n"
            f"  expected: {target.dtype} on {target.device}\n  got: {dtype} on {device}\n"
            "  fix: move both to one dtype and device with .to() first"
        )
        raise ValueError(msg)


def _probe(fn: Transform, src: Tensor) -> Tensor:
    """Run `fn` on a meta copy of `src` to learn its shape and dtype without computing."""
    try:
        value = fn(torch.empty_like(src, device="meta"))
        if isinstance(value, Tensor):
            return torch.empty_like(value, device=src.device) if value.is_meta else value
    except Exception:
        pass
    try:
        with torch.no_grad():
            value = fn(src)
    except Exception as err:
        msg = (
            f"tie: the transform {getattr(fn, '__name__', fn)!r} fails on the source "
            f"(shape {tuple(src.shape)}, {src.dtype}).\n  got: {type(err).__name__}: {err}"
        )
        raise ValueError(msg) from err
    if not isinstance(value, Tensor):
        msg = f"tie: the transform must return a tensor.\n  got: {type(value).__name__}"
        raise TypeError(msg)
    return value


def _missing_or_computed(index: Index, key: str, role: str) -> Exception:
    tie = index.ties.get(key)
    if tie is not None:
        msg = (
            f"tie: the {role} `{key}` is itself a transform destination of `{tie.source}`.\n"
            f"  fix: tie to `{tie.source}` directly, or untie `{key}` first"
        )
        return ValueError(msg)
    return KeyNotFoundError(f"tie: unknown {role} key `{key}`.{index.did_you_mean(key)}")
