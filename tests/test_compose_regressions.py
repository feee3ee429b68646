"""Compositions that already worked, kept working: frozen state, ties and PyTorch's tools."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from torch_modelstate import ModelState


class Net(nn.Module):
    """A square layer, a BatchNorm, and a head that can be tied to the first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bn(torch.relu(self.fc(x))))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def frozen_tied(transform: str | None) -> tuple[Net, ModelState]:
    """The net with its BatchNorm frozen and its head tied to `fc`."""
    model = net()
    ms = ModelState.new(model).freeze("bn.**").tie("head.weight", "fc.weight", transform)
    return model, ms


X = torch.linspace(-2.0, 2.0, 24).reshape(6, 4)


@pytest.mark.parametrize("transform", [None, "transpose"])
def test_compile_with_frozen_batchnorm_and_ties(transform: str | None) -> None:
    """A compiled net with a frozen BatchNorm and a tie matches eager; statistics stay put."""
    model, ms = frozen_tied(transform)
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in ms.state().items()}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    model.train()
    reference.train()
    assert torch.allclose(compiled(X), reference(X))
    for key, value in ms.state().items():
        assert torch.equal(value, before[key]), key


def test_export_with_frozen_batchnorm_and_a_tie() -> None:
    """`torch.export` of an eval-mode net with a frozen BatchNorm and an identity tie."""
    model, _ = frozen_tied(None)
    model.eval()
    program = torch.export.export(model, (X,))
    assert torch.allclose(program.module()(X), model(X))


@pytest.mark.parametrize("transform", [None, "transpose"])
def test_deepcopy_keeps_frozen_set_and_ties(transform: str | None) -> None:
    """A deep copy has the same frozen set and ties, on its own tensors."""
    model, ms = frozen_tied(transform)
    clone = copy.deepcopy(model)
    other = ModelState.new(clone)
    assert other.ties() == ms.ties()
    assert list(other.frozen_state()) == list(ms.frozen_state())
    assert other.to_dict().keys() == ms.to_dict().keys()
    pairs = zip(other.to_dict().values(), ms.to_dict().values(), strict=True)
    assert all(a is not b for a, b in pairs)


@pytest.mark.parametrize("transform", [None, "transpose"])
def test_pickle_keeps_frozen_set_and_ties(transform: str | None) -> None:
    """A pickled copy has the same frozen set, ties and outputs."""
    model, ms = frozen_tied(transform)
    model.eval()
    loaded = pickle.loads(pickle.dumps(model))
    other = ModelState.new(loaded)
    assert other.ties() == ms.ties()
    assert list(other.frozen_state()) == list(ms.frozen_state())
    assert torch.allclose(loaded(X), model(X))


def test_parametrize_then_identity_tie() -> None:
    """A parametrized layer's other tensor can be tied; the parametrization keeps working."""
    model = net()
    parametrize.register_parametrization(model.fc, "bias", nn.Identity())
    ms = ModelState.new(model).tie("head.weight", "fc.weight")
    assert model.head.weight is model.fc.weight
    assert ms.ties() == {"head.weight": "fc.weight"}
    assert "fc.parametrizations.bias.original" in ms.parameters()


def test_weight_norm_composes_with_a_view() -> None:
    """`weight_norm`'s g and v are leaves with their state_dict keys; freezing works."""
    model = net()
    parametrizations.weight_norm(model.fc)
    ms = ModelState.new(model)
    assert list(ms.to_dict()) == list(model.state_dict())
    ms.freeze("fc.**")
    assert not model.fc.parametrizations.weight.original0.requires_grad
    model(X).sum().backward()


def test_spectral_norm_composes_with_a_view() -> None:
    """`spectral_norm`'s vectors are state; update and merge write them in place."""
    model = net()
    parametrizations.spectral_norm(model.head)
    ms = ModelState.new(model)
    assert list(ms.to_dict()) == list(model.state_dict())
    u = "head.parametrizations.weight.0._u"
    assert u in ms.state()
    ms.update({u: torch.ones(4)})
    assert torch.equal(model.head.parametrizations.weight[0]._u, torch.ones(4))


def test_shared_submodule_is_seen_as_ties() -> None:
    """A submodule registered twice shows each tensor once, the later keys tied."""
    model = net()
    model.head = model.fc
    ms = ModelState.new(model)
    assert ms.ties() == {"head.weight": "fc.weight", "head.bias": "fc.bias"}
    assert "head.weight" not in ms.parameters()
    ms.update({"head.bias": torch.zeros(4)})
    assert torch.equal(model.fc.bias, torch.zeros(4))


def test_non_persistent_buffers_are_not_state() -> None:
    """Buffers left out of `state_dict()` are not state, exactly as torch sees them."""
    model = net()
    model.register_buffer("scratch", torch.zeros(3), persistent=False)
    ms = ModelState.new(model)
    assert "scratch" not in ms.to_dict()
    assert list(ms.to_dict()) == list(model.state_dict())
