"""Models and helpers shared by the tie tests (`test_ties.py`, `test_ties_use.py`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from torch_modelstate import ModelState


class Twin(nn.Module):
    """Two square layers: ``b.weight`` can be the very same tensor as ``a.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


class AutoEncoder(nn.Module):
    """A tied autoencoder: ``dec.weight`` can be ``enc.weight.t()``."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.dec = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.enc(x)))


class Triple(nn.Module):
    """Three square layers and a transposable pair, for chains and refused ties."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.c = nn.Linear(3, 3)
        self.up = nn.Linear(3, 5)
        self.down = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.up(self.c(self.b(self.a(x)))))


class Normed(nn.Module):
    """Two BatchNorms (buffers) next to a square layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.bn1 = nn.BatchNorm1d(3)
        self.bn2 = nn.BatchNorm1d(3)


def twin() -> Twin:
    torch.manual_seed(0)
    return Twin()


def autoencoder() -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder()


def triple() -> Triple:
    torch.manual_seed(0)
    return Triple()


def tied_twin() -> tuple[Twin, ModelState]:
    model = twin()
    return model, ModelState.new(model).tie("b.weight", "a.weight")


def tied_autoencoder() -> tuple[AutoEncoder, ModelState]:
    model = autoencoder()
    return model, ModelState.new(model).tie("dec.weight", "enc.weight", transform=torch.t)


def snapshot(model: nn.Module, ms: ModelState) -> dict[str, Any]:
    """Everything a refused tie must leave as it was."""
    return {
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "keys": list(model.state_dict()),
        "objects": [(name, id(p)) for name, p in model.named_parameters(remove_duplicate=False)],
        "classes": [type(m) for m in model.modules()],
        "ties": ms.ties(),
        "transforms": ms.transforms(),
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for name in before:
        if name == "values":
            assert before[name].keys() == after[name].keys()
            for key, value in before[name].items():
                other = after[name][key]
                assert (value.device, value.dtype) == (other.device, other.dtype), key
                assert value.is_meta or torch.equal(value, other), key
        else:
            assert before[name] == after[name], name


def assert_refused(
    model: nn.Module, ms: ModelState, error: type[Exception], match: str, *args: Any, **kwargs: Any
) -> None:
    """``ms.tie(*args, **kwargs)`` raises `error` and leaves `model` and `ms` unchanged."""
    before = snapshot(model, ms)
    with pytest.raises(error, match=match):
        ms.tie(*args, **kwargs)
    assert_same(before, snapshot(model, ms))
