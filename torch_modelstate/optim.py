"""Training with a ModelState: param groups by mask, recipes, optimizer state in safetensors.

The recipes people write by hand for every fine-tune, each as one call:

- no weight decay on biases and normalisation weights::

      groups = ms.param_groups(
          {tms.optim.no_decay(model): {"weight_decay": 0.0}}, weight_decay=0.05
      )
      opt = torch.optim.AdamW(groups, lr=3e-4)

- layer-wise learning-rate decay (the top layer at ``lr``, each layer below ``decay``
  times the one above)::

      opt = torch.optim.AdamW(
          ms.param_groups(tms.optim.layerwise_lr(model, "blocks.*", lr=1e-3, decay=0.8))
      )

- gradual unfreezing into a live optimizer: ``ms.unfreeze("blocks.3.**", optimizer=opt,
  lr=1e-4)`` adds the newly trainable parameters as one new param group;
- resuming: ``tms.save_optimizer(opt, model, path)`` / ``tms.load_optimizer(opt, model,
  path)`` store the state by parameter key in a plain safetensors file.

>>> import torch
>>> from torch import nn
>>> from torch_modelstate import ModelState, optim
>>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
>>> ms = ModelState.new(model).freeze("2.**")
>>> opt = torch.optim.AdamW(ms.param_groups({optim.no_decay(model): {"weight_decay": 0.0}}))
>>> _ = ms.unfreeze("2.**", optimizer=opt, lr=1e-4)
>>> [g["param_names"] for g in opt.param_groups]
[['0.bias', '1.weight', '1.bias'], ['0.weight'], ['2.weight', '2.bias']]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from torch_modelstate._errors import KeyNotFoundError
from torch_modelstate._groups import Rules, add_param_group, as_mask, check_optimizer
from torch_modelstate._masks import Mask, compile_mask
from torch_modelstate._optim_state import load_optimizer, save_optimizer
from torch_modelstate._state import ModelState

__all__ = [
    "NORM_TYPES",
    "Rules",
    "add_param_group",
    "check_optimizer",
    "layerwise_lr",
    "load_optimizer",
    "no_decay",
    "save_optimizer",
]

# Normalisation layers of torch; any other module whose class name ends in "Norm"
# (Hugging Face's `LlamaRMSNorm`, `T5LayerNorm`...) counts as one too.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def no_decay(model: nn.Module | ModelState, *, biases: bool = True, norms: bool = True) -> Mask:
    """A mask of the parameters that usually get no weight decay: biases and norm weights.

    Norms are found by module type (torch's BatchNorm, LayerNorm, GroupNorm, RMSNorm...,
    and any module whose class name ends in ``Norm``), biases by name (``bias``). Use it
    as a rule of `ModelState.param_groups`; the mask selects exactly the keys it found.

    >>> import torch
    >>> from torch import nn
    >>> from torch_modelstate import ModelState, optim
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    >>> ms = ModelState.new(model)
    >>> groups = ms.param_groups({optim.no_decay(model): {"weight_decay": 0.0}})
    >>> [g["param_names"] for g in groups]
    [['0.bias', '1.weight', '1.bias', '2.bias'], ['0.weight', '2.weight']]
    """
    ms = ModelState.new(model)
    module = ms.module
    keys: list[str] = []
    if module is None:
        if norms:
            msg = (
                "no_decay: a state built from a dict has no module types to find norms by.\n"
                "  fix: pass the model, or norms=False (biases only)"
            )
            raise ValueError(msg)
        return as_mask(k for k in ms.parameters() if biases and k.rsplit(".", 1)[-1] == "bias")
    norm_prefixes = {
        f"{name}." if name else "" for name, m in module.named_modules() if norms and _is_norm(m)
    }
    for key in ms.parameters():
        owner, _, name = key.rpartition(".")
        prefix = f"{owner}." if owner else ""
        if (biases and name == "bias") or prefix in norm_prefixes:
            keys.append(key)
    return as_mask(keys)


def layerwise_lr(
    model: nn.Module | ModelState,
    layers: str,
    *,
    lr: float,
    decay: float,
    options: Mapping[str, Any] | None = None,
) -> list[tuple[Mask, dict[str, Any]]]:
    """Rules for layer-wise learning-rate decay over the layers the glob `layers` names.

    `layers` is a glob over module names (``"blocks.*"``, ``"encoder.layer.*"``); the layers
    it matches, in module order, get ``lr * decay ** (n - 1 - i)``: the last (top) layer
    trains at `lr`, each one below at `decay` times the one above. Pass the result as the
    `rules` of `ModelState.param_groups` (other parameters, such as embeddings and the
    head, go to its defaults; prepend a rule of your own for them). `options` are added to
    every layer's group.

    >>> import torch
    >>> from torch import nn
    >>> from torch_modelstate import ModelState, optim
    >>> model = nn.ModuleDict({"blocks": nn.ModuleList(nn.Linear(2, 2) for _ in range(3))})
    >>> rules = optim.layerwise_lr(model, "blocks.*", lr=1.0, decay=0.5)
    >>> [(g["param_names"][0], g["lr"]) for g in ModelState.new(model).param_groups(rules)]
    [('blocks.0.weight', 0.25), ('blocks.1.weight', 0.5), ('blocks.2.weight', 1.0)]
    """
    if not isinstance(layers, str):
        msg = f'`layers` must be a glob over module names, e.g. "blocks.*".\n  got: {layers!r}'
        raise TypeError(msg)
    ms = ModelState.new(model)
    pattern = compile_mask(layers)
    found: dict[str, None] = {}
    for key in ms.to_dict():
        parts = key.split(".")
        for n in range(1, len(parts)):
            if pattern(parts[:n]):
                found.setdefault(".".join(parts[:n]), None)
                break
    if not found:
        msg = (
            f"layerwise_lr: the glob {layers!r} matches no module of the model.\n"
            '  fix: a glob over module names, as "blocks.*" for keys "blocks.0.weight"...'
        )
        raise KeyNotFoundError(msg)
    n = len(found)
    extra = dict(options or {})
    return [
        (
            as_mask(k for k in ms.to_dict() if k.startswith(prefix + ".")),
            {**extra, "lr": lr * decay ** (n - 1 - i)},
        )
        for i, prefix in enumerate(found)
    ]
