"""Optimizer param groups by mask, and adding newly thawed parameters to a live optimizer.

`build` turns ``rules`` (masks to option dicts) into ``torch.optim`` param groups: the first
rule whose mask selects a parameter decides its group, the rest go into a last group with
the defaults, each tensor appears once (tied tensors included), and every group carries
``"param_names"``. `check_optimizer` and `add_param_group` serve gradual unfreezing:
``ms.unfreeze(mask, optimizer=opt)`` checks first, thaws, then adds what `opt` does not hold
yet, compared by identity (never by value, as Lightning's ``BaseFinetuning`` does).

This module sits below `_state` (which calls it) and sees only keys, paths and tensors.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor

from torch_modelstate._masks import Aliases, Mask, MaskLike, compile_mask

__all__ = ["Rules", "add_param_group", "as_mask", "build", "check_optimizer", "rule_list"]

Rules: TypeAlias = "Mapping[Any, Mapping[str, Any]] | Sequence[tuple[MaskLike, Mapping[str, Any]]]"

# Keys a param group holds that are not options.
_RESERVED = ("params", "param_names")


def rule_list(rules: Rules | None) -> list[tuple[MaskLike, dict[str, Any]]]:
    """`rules` as a checked list of ``(mask, options)`` pairs (a dict keeps its order)."""
    if rules is None:
        return []
    if isinstance(rules, Mapping):
        pairs: list[Any] = list(rules.items())
    elif isinstance(rules, (list, tuple)):
        pairs = list(rules)
    else:
        msg = (
            "`rules` must map masks to option dicts: a dict, or a list of (mask, options) pairs.\n"
            f"  got: {type(rules).__name__}"
        )
        raise TypeError(msg)
    out: list[tuple[MaskLike, dict[str, Any]]] = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, tuple) and len(pair) == 2):
            msg = (
                f"rule {i} of `rules` must be a (mask, options) pair.\n"
                f"  got: {type(pair).__name__} {pair!r}\n"
                '  fix: [("**.bias", {"weight_decay": 0.0}), ...]'
            )
            raise TypeError(msg)
        mask, options = pair
        out.append((mask, check_options(options, f"the options of rule {i} ({mask!r})")))
    return out


def check_options(options: object, where: str) -> dict[str, Any]:
    """A copy of `options`, a dict of str keys without ``params``/``param_names``."""
    if not isinstance(options, Mapping):
        msg = (
            f"{where} must be a dict of optimizer options.\n"
            f"  got: {type(options).__name__} {options!r}\n"
            '  fix: {"lr": 1e-4, "weight_decay": 0.0}'
        )
        raise TypeError(msg)
    for name in options:
        if not isinstance(name, str):
            msg = f"{where}: option names must be strings.\n  got: {name!r}"
            raise TypeError(msg)
        if name in _RESERVED:
            msg = (
                f"{where}: `{name}` is set from the mask and cannot be given as an option.\n"
                f"  fix: leave `{name}` out"
            )
            raise ValueError(msg)
    return dict(options)


def build(
    keys: Sequence[str],
    paths: Sequence[tuple[str, ...]],
    aliases: Aliases | None,
    tensors: Sequence[Tensor],
    trainable: Sequence[bool],
    rules: Rules | None,
    defaults: Mapping[str, Any],
    *,
    strict: bool,
    every_key: Sequence[str],
    did_you_mean: Callable[[str], str],
) -> list[dict[str, Any]]:
    """Param groups over the leaves: ``keys[i]``, ``paths[i]`` and ``tensors[i]`` name one.

    `aliases` lists the tie destinations naming a leaf (a string mask matching one selects
    the leaf, as in `freeze`); only the leaves flagged `trainable` are grouped. With
    `strict`, each string of a rule's mask must match one of `every_key`.
    """
    pairs = rule_list(rules)
    base = check_options(defaults, "the default options")
    compiled = [compile_mask(mask) for mask, _ in pairs]
    if strict:
        for i, mask in enumerate(compiled):
            mask.check_strict(every_key, did_you_mean, f"param_groups (rule {i})")
    owner: list[int | None] = [None] * len(tensors)  # leaf -> the rule that took it
    for r, mask in enumerate(compiled):
        hits = mask.select(keys, paths, aliases)
        for i, hit in enumerate(hits):
            if hit and owner[i] is None and trainable[i]:
                owner[i] = r
    groups: list[dict[str, Any]] = []
    for r in [*range(len(pairs)), None]:
        chosen = [i for i in range(len(tensors)) if trainable[i] and owner[i] == r]
        if not chosen:
            continue
        options = base if r is None else {**base, **pairs[r][1]}
        group: dict[str, Any] = {"params": [tensors[i] for i in chosen]}
        group.update(options)
        group["param_names"] = [keys[i] for i in chosen]
        groups.append(group)
    return groups


# --------------------------------------------------------------------------- live optimizers


def check_optimizer(optimizer: object, options: Mapping[str, Any]) -> None:
    """Check that `optimizer` can take a new group with `options`; nothing changes.

    An option must be one the optimizer knows (``optimizer.defaults``) or one its groups
    already carry (``initial_lr``, set by LR schedulers): anything else is most likely a typo.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        msg = (
            "`optimizer` must be a torch.optim.Optimizer.\n"
            f"  got: {type(optimizer).__name__}\n"
            "  fix: pass the optimizer that trains the model, e.g. optimizer=opt"
        )
        raise TypeError(msg)
    check_options(options, "`group_options`")
    known = set(optimizer.defaults)
    for group in optimizer.param_groups:
        known.update(k for k in group if k not in _RESERVED)
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"\n  did you mean: {close[0]}" if close else ""
            msg = (
                f"unfreeze: `{name}` is not an option of {type(optimizer).__name__}.\n"
                f"  expected one of: {', '.join(sorted(known))}\n  got: {name}{hint}"
            )
            raise TypeError(msg)
    named = {"param_names" in group for group in optimizer.param_groups}
    if len(named) > 1:
        msg = (
            f"unfreeze: some groups of the {type(optimizer).__name__} have `param_names` and "
            "some do not, so a new group cannot match them.\n"
            "  fix: build the optimizer from ms.param_groups(...) (every group named) or from "
            "a plain list of parameters (none named)"
        )
        raise ValueError(msg)


def add_param_group(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    options: Mapping[str, Any],
) -> dict[str, Any] | None:
    """Add the tensors of `params` that `optimizer` does not hold yet as one new group.

    Tensors are compared by identity; a tensor given under two keys (a tie) is added once.
    The group carries ``"param_names"`` when the optimizer's groups do (torch refuses a mix).
    Options not given default to the optimizer's defaults (torch fills them in). Returns
    the group added, or None when every tensor was held already: no empty group is added.

    >>> import torch
    >>> w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(2))
    >>> opt = torch.optim.SGD([w], lr=0.1)
    >>> add_param_group(opt, {"w": w, "b": b}, {"lr": 0.01})["lr"]
    0.01
    >>> add_param_group(opt, {"w": w, "b": b}, {}) is None
    True
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    items = params.items() if isinstance(params, Mapping) else params
    keys: list[str] = []
    tensors: list[Tensor] = []
    for key, tensor in items:
        if id(tensor) in held:
            continue
        held.add(id(tensor))
        keys.append(key)
        tensors.append(tensor)
    if not tensors:
        return None
    group: dict[str, Any] = {"params": tensors, **options}
    if any("param_names" in g for g in optimizer.param_groups):
        group["param_names"] = keys
    optimizer.add_param_group(group)
    return optimizer.param_groups[-1]


def as_mask(keys: Iterable[str]) -> Mask:
    """A mask selecting exactly `keys` (matched literally, whatever characters they hold)."""
    keys = list(keys)
    if not keys:
        return compile_mask([])
    return compile_mask(re.compile("|".join(map(re.escape, keys))))
