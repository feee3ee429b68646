"""Weight tying: identity and transform ties, gradients, survival and the checks."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from _ties_models import (
    AutoEncoder,
    Normed,
    Twin,
    assert_refused,
    assert_same,
    autoencoder,
    snapshot,
    tied_autoencoder,
    tied_twin,
    triple,
    twin,
)
from torch import Tensor, nn

import torch_modelstate as tms
from torch_modelstate import ModelState

# --------------------------------------------------------------------------- identity ties


def test_identity_tie_makes_destination_the_source_parameter_object() -> None:
    """An identity tie makes the destination attribute the source's very nn.Parameter."""
    model = twin()
    source = model.a.weight
    ModelState.new(model).tie("b.weight", "a.weight")
    assert model.b.weight is source
    assert model.a.weight is source
    assert isinstance(model.b.weight, nn.Parameter)


def test_tie_accepts_paths_as_lists() -> None:
    """Destination and source may be given as lists of strings."""
    model = twin()
    ModelState.new(model).tie(["b", "weight"], ["a", "weight"])
    assert model.b.weight is model.a.weight


def test_tie_returns_the_same_model_state() -> None:
    """`tie` and `untie` return the ModelState itself, so calls chain."""
    model = twin()
    ms = ModelState.new(model)
    assert ms.tie("b.weight", "a.weight") is ms
    assert ms.untie("b.weight") is ms


def test_identity_tie_onto_earlier_key_is_reported_as_made() -> None:
    """`ties()` reports an identity tie onto an earlier key as {destination: source}."""
    model = twin()
    ms = ModelState.new(model).tie("a.weight", "b.weight")
    assert model.a.weight is model.b.weight
    assert ms.ties() == {"a.weight": "b.weight"}


def test_identity_tie_onto_earlier_key_can_be_untied() -> None:
    """`untie(destination)` undoes an identity tie onto an earlier key."""
    model = twin()
    ms = ModelState.new(model).tie("a.weight", "b.weight")
    ms.untie("a.weight")
    assert model.a.weight is not model.b.weight


def test_identity_tie_onto_earlier_key_twice_is_a_no_op() -> None:
    """Repeating an identity tie onto an earlier key is a no-op."""
    model = twin()
    ms = ModelState.new(model).tie("a.weight", "b.weight")
    ms.tie("a.weight", "b.weight")
    assert model.a.weight is model.b.weight


def test_identity_tie_onto_earlier_key_takes_source_value() -> None:
    """An identity tie onto an earlier key makes both keys hold the source's values."""
    model = twin()
    expected = model.b.weight.detach().clone()
    source = model.b.weight
    ModelState.new(model).tie("a.weight", "b.weight")
    assert model.a.weight is source
    assert torch.equal(model.a.weight, expected)


def test_identity_tie_forward_uses_source_values() -> None:
    """After an identity tie the destination layer computes with the source's weights."""
    model, _ = tied_twin()
    x = torch.randn(2, 3)
    expected = torch.nn.functional.linear(x, model.a.weight, model.b.bias)
    torch.testing.assert_close(model.b(x), expected)


# --------------------------------------------------------------------------- transform ties


def test_transform_tie_value_is_transposed_source() -> None:
    """A transpose tie's destination equals the source transposed."""
    model, _ = tied_autoencoder()
    assert torch.equal(model.dec.weight, model.enc.weight.t())


def test_transform_tie_by_registered_name() -> None:
    """`transform="transpose"` is the same tie as `transform=torch.t`."""
    model = autoencoder()
    ms = ModelState.new(model).tie("dec.weight", "enc.weight", transform="transpose")
    assert torch.equal(model.dec.weight, model.enc.weight.t())
    assert ms.transforms() == {"dec.weight": "transpose"}


def test_transform_tie_holds_no_storage() -> None:
    """A transform destination is no parameter, buffer or attribute of its own."""
    model, _ = tied_autoencoder()
    assert "dec.weight" not in dict(model.named_parameters())
    assert "weight" not in model.dec._parameters
    assert "weight" not in model.dec._buffers
    assert "weight" not in vars(model.dec)
    assert [name for name, _ in model.named_parameters()] == ["enc.weight", "enc.bias", "dec.bias"]


def test_transform_tie_computes_on_use() -> None:
    """Changing the source in place changes the destination's value at the next use."""
    model, _ = tied_autoencoder()
    with torch.no_grad():
        model.enc.weight.mul_(3.0).add_(1.0)
    assert torch.equal(model.dec.weight, model.enc.weight.t())
    x = torch.randn(2, 3)
    expected = torch.nn.functional.linear(x, model.enc.weight.t(), model.dec.bias)
    torch.testing.assert_close(model.dec(x), expected)


def test_transform_tie_keeps_state_dict_keys() -> None:
    """The state_dict of a transform-tied model has the same keys; `dec.weight` stays."""
    model = autoencoder()
    keys = set(model.state_dict())
    ModelState.new(model).tie("dec.weight", "enc.weight", transform=torch.t)
    sd = model.state_dict()
    assert set(sd) == keys
    assert torch.equal(sd["dec.weight"], model.enc.weight.t())
    assert "parametrizations" not in " ".join(sd)


def test_transform_tie_keeps_state_dict_key_order() -> None:
    """The state_dict keys of a transform-tied model keep their order."""
    model = autoencoder()
    keys = list(model.state_dict())
    ModelState.new(model).tie("dec.weight", "enc.weight", transform=torch.t)
    assert list(model.state_dict()) == keys


def test_transform_tied_state_dict_loads_back() -> None:
    """load_state_dict of a transform-tied model's own state_dict works and sets the source."""
    model, ms = tied_autoencoder()
    sd = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    result = model.load_state_dict(sd)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    assert torch.equal(model.enc.weight, sd["enc.weight"])
    assert torch.equal(model.dec.weight, sd["enc.weight"].t())
    assert ms.ties() == {"dec.weight": "enc.weight"}


def test_transform_tied_state_dict_loads_into_untied_model() -> None:
    """A transform-tied model's state_dict loads strictly into a plain, untied model."""
    model, _ = tied_autoencoder()
    plain = AutoEncoder()
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain.dec.weight, model.enc.weight.t())


def test_transform_tie_with_lambda_works_in_memory() -> None:
    """A tie with an unnamed callable computes its value and reports no transform name."""
    model = autoencoder()
    ms = ModelState.new(model).tie("dec.weight", "enc.weight", transform=lambda w: 2.0 * w.t())
    assert torch.equal(model.dec.weight, 2.0 * model.enc.weight.t())
    assert ms.transforms() == {"dec.weight": None}
    assert ms.ties() == {"dec.weight": "enc.weight"}


def test_register_transform_makes_a_named_transform() -> None:
    """A transform registered by name can be used by name and is reported by that name."""

    def negate_transpose(w: Tensor) -> Tensor:
        return -w.t()

    tms.register_transform("test_ties.negate_transpose", negate_transpose)
    assert "test_ties.negate_transpose" in tms.registered_transforms()
    model = autoencoder()
    ms = ModelState.new(model).tie(
        "dec.weight", "enc.weight", transform="test_ties.negate_transpose"
    )
    assert torch.equal(model.dec.weight, -model.enc.weight.t())
    assert ms.transforms() == {"dec.weight": "test_ties.negate_transpose"}


def test_registered_callable_is_named_when_passed_directly() -> None:
    """A tie made with a registered callable reports the callable's registered name."""

    def scaled_transpose(w: Tensor) -> Tensor:
        return 0.5 * w.t()

    tms.register_transform("test_ties.scaled_transpose", scaled_transpose)
    model = autoencoder()
    ms = ModelState.new(model).tie("dec.weight", "enc.weight", transform=scaled_transpose)
    assert ms.transforms() == {"dec.weight": "test_ties.scaled_transpose"}


def test_register_transform_refuses_a_different_callable_under_a_taken_name() -> None:
    """Registering another callable under a name already taken is a ValueError."""
    tms.register_transform("test_ties.taken", torch.neg)
    tms.register_transform("test_ties.taken", torch.neg)  # the same callable again is fine
    with pytest.raises(ValueError, match="already registered"):
        tms.register_transform("test_ties.taken", torch.abs)
    assert tms.registered_transforms()["test_ties.taken"] is torch.neg


def test_transpose_is_registered() -> None:
    """`"transpose"` is a registered transform."""
    assert "transpose" in tms.registered_transforms()


# --------------------------------------------------------------------------- gradients


def test_identity_tie_gradient_is_sum_over_uses() -> None:
    """The source's gradient through an identity tie is the untied reference's sum of both."""
    model, _ = tied_twin()
    reference = Twin()
    with torch.no_grad():
        reference.a.weight.copy_(model.a.weight)
        reference.a.bias.copy_(model.a.bias)
        reference.b.weight.copy_(model.a.weight)
        reference.b.bias.copy_(model.b.bias)
    x = torch.randn(5, 3)
    model(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    assert reference.a.weight.grad is not None and reference.b.weight.grad is not None
    expected = reference.a.weight.grad + reference.b.weight.grad
    torch.testing.assert_close(model.a.weight.grad, expected)
    torch.testing.assert_close(model.b.bias.grad, reference.b.bias.grad)


def test_transform_tie_gradient_is_sum_over_uses() -> None:
    """The source's gradient through a transpose tie is the reference's enc + dec.t() grads."""
    model, _ = tied_autoencoder()
    reference = AutoEncoder()
    with torch.no_grad():
        reference.enc.weight.copy_(model.enc.weight)
        reference.enc.bias.copy_(model.enc.bias)
        reference.dec.weight.copy_(model.enc.weight.t())
        reference.dec.bias.copy_(model.dec.bias)
    x = torch.randn(5, 4)
    model(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    assert reference.enc.weight.grad is not None and reference.dec.weight.grad is not None
    expected = reference.enc.weight.grad + reference.dec.weight.grad.t()
    torch.testing.assert_close(model.enc.weight.grad, expected)
    torch.testing.assert_close(model.dec.bias.grad, reference.dec.bias.grad)


# --------------------------------------------------------------------------- survival


def test_identity_tie_survives_to_dtype() -> None:
    """`.to(torch.float64)` keeps an identity tie: one Parameter, now float64."""
    model, ms = tied_twin()
    model.to(torch.float64)
    assert model.b.weight is model.a.weight
    assert model.a.weight.dtype == torch.float64
    assert ms.ties() == {"b.weight": "a.weight"}


def test_transform_tie_survives_to_dtype() -> None:
    """`.to(torch.float64)` keeps a transform tie following the converted source."""
    model, ms = tied_autoencoder()
    model.to(torch.float64)
    assert model.dec.weight.dtype == torch.float64
    assert torch.equal(model.dec.weight, model.enc.weight.t())
    assert model(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64
    assert ms.ties() == {"dec.weight": "enc.weight"}


def test_identity_tie_survives_deepcopy() -> None:
    """A deep copy ties its own destination to its own source."""
    model, _ = tied_twin()
    clone = copy.deepcopy(model)
    assert clone.b.weight is clone.a.weight
    assert clone.a.weight is not model.a.weight
    assert ModelState.new(clone).ties() == {"b.weight": "a.weight"}


def test_transform_tie_deepcopy_follows_its_own_source() -> None:
    """Changing a deep copy's source changes the copy's destination, not the original's."""
    model, _ = tied_autoencoder()
    original = model.dec.weight.detach().clone()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.enc.weight.add_(1.0)
    assert torch.equal(clone.dec.weight, clone.enc.weight.t())
    assert torch.equal(model.dec.weight, original)
    assert ModelState.new(clone).transforms() == {"dec.weight": "transpose"}


def test_transform_tie_follows_a_replaced_source_parameter() -> None:
    """Assigning a new Parameter to the source re-points the transform destination."""
    model, ms = tied_autoencoder()
    model.enc.weight = nn.Parameter(torch.ones(3, 4))
    assert torch.equal(model.dec.weight, torch.ones(4, 3))
    assert ms.parameters()["enc.weight"] is model.enc.weight


def test_transform_tie_survives_to_empty() -> None:
    """A transform tie made on the meta device follows the source through `to_empty`."""
    with torch.device("meta"):
        model = AutoEncoder()
    ms = ModelState.new(model).tie("dec.weight", "enc.weight", "transpose")
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.enc.weight.copy_(torch.arange(12.0).reshape(3, 4))  # to_empty leaves garbage
    assert model.dec.weight.device == torch.device("cpu")
    assert torch.equal(model.dec.weight, model.enc.weight.t())
    assert ms.ties() == {"dec.weight": "enc.weight"}


def test_transform_tie_survives_pickle() -> None:
    """A transform-tied module pickles and the loaded copy follows its own source."""
    model, _ = tied_autoencoder()
    loaded = pickle.loads(pickle.dumps(model))
    assert type(loaded.dec) is type(model.dec)
    assert torch.equal(loaded.dec.weight, loaded.enc.weight.t())
    with torch.no_grad():
        loaded.enc.weight.add_(1.0)
    assert torch.equal(loaded.dec.weight, loaded.enc.weight.t())
    assert not torch.equal(model.dec.weight, loaded.dec.weight)
    ms = ModelState.new(loaded)
    assert ms.ties() == {"dec.weight": "enc.weight"}
    assert ms.transforms() == {"dec.weight": "transpose"}


def test_identity_tie_survives_sgd_steps() -> None:
    """SGD on trainable_parameters() updates the source and the destination is still it."""
    model, ms = tied_twin()
    params = list(ms.trainable_parameters().values())
    assert len(params) == len({id(p) for p in params}) == 3
    before = model.a.weight.detach().clone()
    optimizer = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()
    assert model.b.weight is model.a.weight
    assert not torch.equal(model.a.weight, before)


def test_transform_tie_survives_adamw_steps() -> None:
    """AdamW on trainable_parameters() updates the source and the destination follows."""
    model, ms = tied_autoencoder()
    before = model.enc.weight.detach().clone()
    optimizer = torch.optim.AdamW(ms.trainable_parameters().values(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 4)).pow(2).sum().backward()
        optimizer.step()
    assert not torch.equal(model.enc.weight, before)
    assert torch.equal(model.dec.weight, model.enc.weight.t())
    assert ms.ties() == {"dec.weight": "enc.weight"}


def test_ties_survive_train_and_eval() -> None:
    """`train()` and `eval()` keep identity and transform ties."""
    model, ms = tied_autoencoder()
    pair, pair_ms = tied_twin()
    for training in (False, True):
        model.train(training)
        pair.train(training)
        assert model.dec.training is training
        assert torch.equal(model.dec.weight, model.enc.weight.t())
        assert pair.b.weight is pair.a.weight
        assert ms.ties() == {"dec.weight": "enc.weight"}
        assert pair_ms.ties() == {"b.weight": "a.weight"}


# --------------------------------------------------------------------------- validation


def test_tie_unknown_destination_is_key_error() -> None:
    """An unknown destination key is a KeyError and nothing changes."""
    model = twin()
    assert_refused(model, ModelState.new(model), KeyError, "c.weight", "c.weight", "a.weight")


def test_tie_unknown_source_is_key_error() -> None:
    """An unknown source key is a KeyError and nothing changes."""
    model = twin()
    assert_refused(model, ModelState.new(model), KeyError, "a.wieght", "b.weight", "a.wieght")


def test_tie_to_itself_is_value_error() -> None:
    """Tying a key to itself is a ValueError and nothing changes."""
    model = twin()
    assert_refused(model, ModelState.new(model), ValueError, "same", "a.weight", "a.weight")


def test_tie_shape_mismatch_is_value_error() -> None:
    """A source whose shape does not fit the destination is a ValueError naming the shapes."""
    model = triple()
    assert_refused(model, ModelState.new(model), ValueError, r"\(3,\)", "a.weight", "a.bias")


def test_tie_shape_mismatch_suggests_transpose() -> None:
    """When the transposed source would fit, the shape error suggests the transpose."""
    model = triple()
    assert_refused(
        model, ModelState.new(model), ValueError, "transpose", "down.weight", "up.weight"
    )


def test_tie_transformed_shape_mismatch_is_value_error() -> None:
    """A transform whose result does not fit the destination is a ValueError."""
    model = triple()
    ms = ModelState.new(model)
    assert_refused(model, ms, ValueError, "does not fit", "a.weight", "up.weight", "transpose")
    assert_refused(model, ms, ValueError, "does not fit", "a.bias", "up.bias", transform=torch.neg)


def test_tie_dtype_mismatch_is_value_error() -> None:
    """A source of another dtype is a ValueError and nothing changes."""
    model = twin()
    model.a.to(torch.float64)
    assert_refused(model, ModelState.new(model), ValueError, "dtype", "b.weight", "a.weight")


def test_tie_transform_dtype_mismatch_is_value_error() -> None:
    """A transform whose result has another dtype is a ValueError and nothing changes."""
    model = autoencoder()
    ms = ModelState.new(model)
    assert_refused(
        model, ms, ValueError, "dtype", "dec.weight", "enc.weight", lambda w: w.t().double()
    )


def test_tie_transform_returning_no_tensor_is_type_error() -> None:
    """A transform that returns no tensor is a TypeError and nothing changes."""
    model = autoencoder()
    ms = ModelState.new(model)
    assert_refused(model, ms, TypeError, "tensor", "dec.weight", "enc.weight", lambda w: 3)


def test_tie_device_mismatch_is_value_error() -> None:
    """A source on another device (here: meta) is a ValueError and nothing changes."""
    model = twin()
    model.a = nn.Linear(3, 3, device="meta")
    assert_refused(model, ModelState.new(model), ValueError, "device", "b.weight", "a.weight")


def test_tie_onto_tied_destination_is_value_error() -> None:
    """Tying an already-tied destination to another source is a ValueError."""
    model = triple()
    ms = ModelState.new(model).tie("c.weight", "a.weight")
    assert_refused(model, ms, ValueError, "already tied", "c.weight", "b.weight")


def test_tie_onto_transform_destination_is_value_error() -> None:
    """Tying a transform destination again to another source is a ValueError."""
    model = triple()
    ms = ModelState.new(model).tie("c.weight", "a.weight", transform="transpose")
    assert_refused(model, ms, ValueError, "c.weight", "c.weight", "b.weight")


def test_tie_source_of_other_ties_as_destination_is_value_error() -> None:
    """A key that is the source of other ties cannot become a destination (no chains)."""
    model = triple()
    ms = ModelState.new(model).tie("b.weight", "a.weight")
    assert_refused(model, ms, ValueError, "source of other ties", "a.weight", "c.weight")


def test_tie_to_identity_destination_resolves_to_root_source() -> None:
    """A source that is itself an identity destination is resolved to its root source."""
    model = triple()
    ms = ModelState.new(model).tie("b.weight", "a.weight").tie("c.weight", "b.weight")
    assert ms.ties() == {"b.weight": "a.weight", "c.weight": "a.weight"}
    assert model.c.weight is model.a.weight


def test_tie_to_transform_destination_is_value_error() -> None:
    """A source that is a transform destination is a ValueError and nothing changes."""
    model = triple()
    ms = ModelState.new(model).tie("b.weight", "a.weight", transform="transpose")
    assert_refused(model, ms, ValueError, "transform destination", "c.weight", "b.weight")


def test_tie_buffers_in_a_module_is_value_error() -> None:
    """Buffers cannot be tied in a module, as destination or source."""
    model = Normed()
    ms = ModelState.new(model)
    assert_refused(model, ms, ValueError, "buffer", "bn2.running_mean", "bn1.running_mean")
    assert_refused(model, ms, ValueError, "buffer", "fc.bias", "bn1.running_mean")
    assert_refused(model, ms, ValueError, "buffer", "bn1.running_var", "fc.bias")


def test_tie_unknown_transform_name_is_value_error() -> None:
    """An unregistered transform name is a ValueError listing the known ones."""
    model = autoencoder()
    ms = ModelState.new(model)
    assert_refused(model, ms, ValueError, "transpose", "dec.weight", "enc.weight", "transpoze")


def test_tie_bad_transform_type_is_type_error() -> None:
    """A transform that is neither a name nor a callable is a TypeError."""
    model = autoencoder()
    ms = ModelState.new(model)
    assert_refused(model, ms, TypeError, "transform", "dec.weight", "enc.weight", 3)


def test_tie_twice_to_the_same_source_is_a_no_op() -> None:
    """Repeating a tie is a no-op, for identity and transform ties."""
    model = triple()
    ms = (
        ModelState.new(model)
        .tie("b.weight", "a.weight")
        .tie("up.weight", "down.weight", "transpose")
    )
    before = snapshot(model, ms)
    ms.tie("b.weight", "a.weight").tie("up.weight", "down.weight", "transpose")
    assert_same(before, snapshot(model, ms))
    assert model.b.weight is model.a.weight


def test_tie_twice_by_callable_and_name_is_a_no_op() -> None:
    """`torch.t` after `"transpose"` is the same tie, not a conflict."""
    model = autoencoder()
    ms = ModelState.new(model).tie("dec.weight", "enc.weight", "transpose")
    ms.tie("dec.weight", "enc.weight", torch.t)
    assert ms.transforms() == {"dec.weight": "transpose"}
