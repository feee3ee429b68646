"""Transform ties composed with the rest of PyTorch: class swaps, torch.func, compile, export."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from _ties_models import AutoEncoder
from torch import Tensor, nn
from torch.nn.utils import parametrize

from torch_modelstate import ModelState

# --------------------------------------------------------------------------- models


class Neg(nn.Module):
    """A parametrization: the negated tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return -x


class Double(nn.Module):
    """A parametrization: twice the tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * x


def autoencoder() -> AutoEncoder:
    torch.manual_seed(0)
    return AutoEncoder()


def tied() -> tuple[AutoEncoder, ModelState]:
    model = autoencoder()
    return model, ModelState.new(model).tie("dec.weight", "enc.weight", transform="transpose")


def expected(model: AutoEncoder, x: Tensor, dec_weight: Tensor, dec_bias: Tensor) -> Tensor:
    """The autoencoder's output computed by hand from the given decoder tensors."""
    hidden = torch.tanh(model.enc(x))
    return torch.nn.functional.linear(hidden, dec_weight, dec_bias)


X = torch.linspace(-1.0, 1.0, 8).reshape(2, 4)


# --------------------------------------------------------------------------- the tied class


def test_transform_tied_class_is_honestly_named_and_still_an_instance() -> None:
    """The destination's class is `TiedLinear`, a subclass of the class it had."""
    model, _ = tied()
    assert type(model.dec).__name__ == "TiedLinear"
    assert isinstance(model.dec, nn.Linear)
    assert "TiedLinear" in repr(model)


def test_assigning_a_parameter_to_a_transform_destination_is_refused() -> None:
    """Making the computed attribute a parameter again needs untie: AttributeError."""
    model, _ = tied()
    with pytest.raises(AttributeError, match="untie"):
        model.dec.weight = nn.Parameter(torch.zeros(4, 3))
    assert torch.equal(model.dec.weight, model.enc.weight.t())


def test_a_plain_tensor_shadows_a_transform_destination_until_deleted() -> None:
    """A tensor assigned over the tied attribute is used until `del`, then the tie is back."""
    model, ms = tied()
    model.dec.weight = torch.zeros(4, 3)
    assert torch.equal(model.dec.weight, torch.zeros(4, 3))
    del model.dec.weight
    assert torch.equal(model.dec.weight, model.enc.weight.t())
    assert ms.ties() == {"dec.weight": "enc.weight"}


# --------------------------------------------------------------------------- parametrize


def test_parametrize_after_a_transform_tie_on_the_same_module() -> None:
    """Parametrizing the destination module's other tensor after the tie composes."""
    model, ms = tied()
    bias = model.dec.bias.detach().clone()
    parametrize.register_parametrization(model.dec, "bias", Neg())
    assert torch.equal(model.dec.bias, -bias)
    assert torch.equal(model.dec.weight, model.enc.weight.t())
    assert torch.allclose(model(X), expected(model, X, model.enc.weight.t(), -bias))
    assert ms.ties() == {"dec.weight": "enc.weight"}
    assert "dec.parametrizations.bias.original" in ms.parameters()


def test_parametrize_before_a_transform_tie_on_the_same_module() -> None:
    """A transform tie on a module parametrized before composes, and untie restores it."""
    model = autoencoder()
    bias = model.dec.bias.detach().clone()
    parametrize.register_parametrization(model.dec, "bias", Neg())
    parametrized = type(model.dec)
    ms = ModelState.new(model).tie("dec.weight", "enc.weight", "transpose")
    assert torch.allclose(model(X), expected(model, X, model.enc.weight.t(), -bias))
    ms.untie("dec.weight")
    assert type(model.dec) is parametrized
    assert torch.equal(model.dec.bias, -bias)


def test_parametrize_after_a_transform_tie_on_the_source_module() -> None:
    """Parametrizing the source after the tie: the destination follows the parametrized
    value, and the view names the stored original as the source."""
    model, ms = tied()
    parametrize.register_parametrization(model.enc, "weight", Double())
    original = model.enc.parametrizations.weight.original
    assert torch.equal(model.dec.weight, (2 * original).t())
    assert ms.ties() == {"dec.weight": "enc.parametrizations.weight.original"}
    assert torch.equal(ms.to_dict()["dec.weight"], (2 * original).t())
    dec_bias = model.dec.bias
    assert torch.allclose(model(X), expected(model, X, (2 * original).t(), dec_bias))


def test_parametrize_before_a_transform_tie_on_the_source_module() -> None:
    """A parametrized source's stored original can be a tie's source."""
    model = autoencoder()
    parametrize.register_parametrization(model.enc, "weight", Double())
    ms = ModelState.new(model)
    ms.tie("dec.weight", "enc.parametrizations.weight.original", "transpose")
    original = model.enc.parametrizations.weight.original
    assert torch.equal(model.dec.weight, original.t())
    assert list(model.state_dict()) == list(ms.to_dict())


def test_untie_under_a_later_class_swap_keeps_the_other_class() -> None:
    """Untie when another class was swapped in on top leaves that class, tie-free."""
    model, ms = tied()
    parametrize.register_parametrization(model.dec, "bias", Neg())
    outer = type(model.dec)
    ms.untie("dec.weight")
    assert type(model.dec) is outer
    assert isinstance(model.dec.weight, nn.Parameter)
    assert ms.ties() == {}
    model(X).sum().backward()
    assert model.dec.weight.grad is not None


# --------------------------------------------------------------------------- fully_shard


def test_fully_shard_after_a_transform_tie(one_rank: None) -> None:
    """`fully_shard` of the destination module after a transform tie runs the same forward."""
    from torch.distributed.fsdp import fully_shard

    reference, _ = tied()
    model, _ = tied()
    fully_shard(model.dec)
    fully_shard(model)
    assert torch.allclose(model(X), reference(X))
    assert ModelState.new(model).ties() == {"dec.weight": "enc.weight"}


# --------------------------------------------------------------------------- torch.func


def test_functional_call_with_the_state_dict_of_a_transform_tied_model() -> None:
    """`functional_call(model, model.state_dict(), x)` runs, and the tie is live afterwards."""
    model, ms = tied()
    out = torch.func.functional_call(model, model.state_dict(), (X,))
    assert torch.allclose(out, model(X))
    with torch.no_grad():
        model.enc.weight.add_(1.0)
    assert torch.equal(model.dec.weight, model.enc.weight.t())
    assert ms.ties() == {"dec.weight": "enc.weight"}


def test_functional_call_uses_the_values_given() -> None:
    """The values given to `functional_call` replace the model's for that call only."""
    model, _ = tied()
    values = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    out = torch.func.functional_call(model, values, (X,))
    assert torch.equal(out, torch.zeros(2, 4))
    assert torch.equal(model.dec.weight, model.enc.weight.t())


def test_functional_call_with_to_dict() -> None:
    """`functional_call` takes a ModelState's `to_dict()`, transform destinations included."""
    model, ms = tied()
    out = torch.func.functional_call(model, ms.to_dict(), (X,))
    assert torch.allclose(out, model(X))


def test_functional_call_with_parameters_only_reaches_the_source() -> None:
    """With only parameters given, the destination is computed from the given source."""
    model, ms = tied()
    params = {k: v.detach().clone().requires_grad_() for k, v in ms.parameters().items()}
    out = torch.func.functional_call(model, params, (X,))
    out.sum().backward()
    grad = params["enc.weight"].grad
    assert grad is not None
    model(X).sum().backward()
    assert model.enc.weight.grad is not None
    assert torch.allclose(grad, model.enc.weight.grad)


# --------------------------------------------------------------------------- compile / export


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_of_a_transform_tied_model(backend: str) -> None:
    """`torch.compile` gives the eager result, with no graph break from the tie."""
    model, _ = tied()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    assert torch.allclose(compiled(X), model(X))
    explained = torch._dynamo.explain(model)(X)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_export_of_a_transform_tied_model() -> None:
    """`torch.export` traces the computed destination; the program gives the eager result."""
    model, _ = tied()
    program = torch.export.export(model, (X,))
    assert torch.allclose(program.module()(X), model(X))
    assert "dec.weight" not in program.state_dict


# --------------------------------------------------------------------------- copies


def test_deepcopy_of_a_transform_tied_model_follows_its_own_source() -> None:
    """A deep copy keeps the class and ties to the copy's own source."""
    model, _ = tied()
    clone = copy.deepcopy(model)
    assert type(clone.dec) is type(model.dec)
    with torch.no_grad():
        clone.enc.weight.mul_(2.0)
    assert torch.equal(clone.dec.weight, clone.enc.weight.t())
    assert not torch.equal(model.dec.weight, clone.dec.weight)
    assert ModelState.new(clone).ties() == {"dec.weight": "enc.weight"}


def test_pickle_of_a_transform_tied_model() -> None:
    """A transform-tied model pickles; the copy computes from its own source."""
    model, _ = tied()
    loaded = pickle.loads(pickle.dumps(model))
    assert type(loaded.dec).__name__ == "TiedLinear"
    assert torch.allclose(loaded(X), model(X))
    with torch.no_grad():
        loaded.enc.weight.zero_()
    assert torch.equal(loaded.dec.weight, torch.zeros(4, 3))
    assert list(loaded.state_dict()) == list(model.state_dict())


def test_tie_after_fully_shard_is_refused(one_rank: None) -> None:
    """A tie onto a sharded model is a ValueError saying to tie first; nothing changes."""
    from torch.distributed.fsdp import fully_shard

    model = autoencoder()
    fully_shard(model.dec)
    fully_shard(model)
    ms = ModelState.new(model)
    with pytest.raises(ValueError, match="tie before calling fully_shard"):
        ms.tie("dec.weight", "enc.weight", "transpose")
    assert ms.ties() == {}
    assert "weight" in model.dec._parameters


def test_state_dict_inside_functional_call_shows_the_values_in_use() -> None:
    """Within `functional_call`, `state_dict()` shows the tensors the call uses, as torch does."""
    model, _ = tied()
    seen: dict[str, Tensor] = {}

    class Probe(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            seen.update(self.inner.state_dict())
            out: Tensor = self.inner(x)
            return out

    values = {f"inner.{k}": torch.zeros_like(v) for k, v in model.state_dict().items()}
    torch.func.functional_call(Probe(model), values, (X,))
    assert torch.equal(seen["dec.weight"], torch.zeros(4, 3))
    assert torch.equal(seen["enc.weight"], torch.zeros(3, 4))
    assert torch.equal(model.state_dict()["dec.weight"], model.enc.weight.detach().t())
