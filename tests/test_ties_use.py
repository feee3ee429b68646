"""Weight tying in use: discovery, accessors, update, merge, untie, standalone states."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
from _ties_models import (
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

from torch_modelstate import ModelState, merges

# --------------------------------------------------------------------------- discovery


def test_ties_discovers_shared_parameters() -> None:
    """`ties()` reports a Parameter assigned to two attributes, the later key being the dest."""
    model = twin()
    model.b.weight = model.a.weight
    assert ModelState.new(model).ties() == {"b.weight": "a.weight"}


def test_ties_discovery_uses_module_order_not_assignment_order() -> None:
    """Assigning the later layer's weight to the earlier one still makes the later key the dest."""
    model = twin()
    model.a.weight = model.b.weight
    assert ModelState.new(model).ties() == {"b.weight": "a.weight"}


def test_ties_discovers_ties_made_after_the_view() -> None:
    """A live view sees a shared Parameter assigned after it was built."""
    model = twin()
    ms = ModelState.new(model)
    assert ms.ties() == {}
    model.b.weight = model.a.weight
    assert ms.ties() == {"b.weight": "a.weight"}


def test_ties_reports_made_and_found_ties() -> None:
    """`ties()` lists ties made with `tie` together with ties found in the module."""
    model = triple()
    model.b.weight = model.a.weight
    ms = ModelState.new(model).tie("down.weight", "up.weight", "transpose")
    assert ms.ties() == {"b.weight": "a.weight", "down.weight": "up.weight"}


def test_ties_discovers_shared_submodule() -> None:
    """A submodule registered twice ties each of its parameters, later keys as destinations."""
    model = twin()
    model.b = model.a
    assert ModelState.new(model).ties() == {"b.weight": "a.weight", "b.bias": "a.bias"}


def test_existing_view_sees_ties_made_through_another_view() -> None:
    """A ModelState already in use sees ties made and removed through another view."""
    model = autoencoder()
    first, second = ModelState.new(model), ModelState.new(model)
    assert second.ties() == {}
    first.tie("dec.weight", "enc.weight", "transpose")
    assert second.ties() == {"dec.weight": "enc.weight"}
    assert "dec.weight" not in second.parameters()
    first.untie("dec.weight")
    assert second.ties() == {}
    assert "dec.weight" in second.parameters()


def test_transforms_names_transform_ties_only() -> None:
    """`transforms()` lists transform ties by name, not identity ties."""
    model = triple()
    ms = ModelState.new(model).tie("b.weight", "a.weight")
    ms.tie("down.weight", "up.weight", torch.Tensor.t)
    ms.tie("c.weight", "a.weight", lambda w: w.t())
    assert ms.transforms() == {"c.weight": None, "down.weight": "transpose"}


def test_a_new_view_sees_transform_ties() -> None:
    """A second ModelState over a transform-tied module reports the tie."""
    model, _ = tied_autoencoder()
    again = ModelState.new(model)
    assert again.ties() == {"dec.weight": "enc.weight"}
    assert again.transforms() == {"dec.weight": "transpose"}


# --------------------------------------------------------------------------- accessors


def test_accessors_list_identity_tied_tensor_once_under_source() -> None:
    """Accessors list an identity-tied tensor once, under its source key."""
    model, ms = tied_twin()
    params = ms.parameters()
    assert list(params) == ["a.weight", "a.bias", "b.bias"]
    assert params["a.weight"] is model.a.weight
    assert list(ms.trainable_parameters()) == ["a.weight", "a.bias", "b.bias"]


def test_accessors_leave_out_transform_destinations() -> None:
    """Accessors leave out transform destinations."""
    _, ms = tied_autoencoder()
    assert list(ms.parameters()) == ["enc.weight", "enc.bias", "dec.bias"]
    assert list(ms.trainable_parameters()) == ["enc.weight", "enc.bias", "dec.bias"]


def test_fully_tied_layer_disappears_from_trainable_parameters() -> None:
    """A layer whose parameters are all tied has no key in trainable_parameters (Axon)."""
    model = nn.ModuleDict({"emb": nn.Embedding(5, 3), "head": nn.Linear(3, 5, bias=False)})
    ms = ModelState.new(model).tie("head.weight", "emb.weight")
    assert list(ms.trainable_parameters()) == ["emb.weight"]
    assert "head.weight" in ms.to_dict()


def test_freezing_the_source_freezes_identity_destination() -> None:
    """Freezing an identity source freezes the destination too."""
    model, ms = tied_twin()
    ms.freeze("a.weight")
    assert model.b.weight.requires_grad is False
    assert list(ms.frozen_parameters()) == ["a.weight"]
    assert "b.weight" not in ms.trainable_parameters()


def test_freezing_the_source_freezes_transform_destination() -> None:
    """Freezing a transform source makes the computed destination need no gradient."""
    model, ms = tied_autoencoder()
    ms.freeze("enc.**")
    assert model.dec.weight.requires_grad is False
    ms.unfreeze("enc.weight")
    assert model.dec.weight.requires_grad is True


def test_masks_do_not_see_tie_destinations() -> None:
    """A mask is called for every leaf except tie destinations."""
    model = triple()
    ms = ModelState.new(model).tie("b.weight", "a.weight").tie("down.weight", "up.weight", torch.t)
    seen: list[str] = []

    def mask(path: list[str]) -> bool:
        seen.append(".".join(path))
        return False

    ms.freeze(mask)
    assert "b.weight" not in seen
    assert "down.weight" not in seen
    assert seen == list(ms.parameters())


def test_to_dict_lists_every_key_with_destinations_resolved() -> None:
    """`to_dict()` has the keys of state_dict(), identity and transform destinations resolved."""
    model = triple()
    ms = ModelState.new(model).tie("b.weight", "a.weight").tie("down.weight", "up.weight", torch.t)
    values = ms.to_dict()
    assert list(values) == list(model.state_dict())
    assert values["b.weight"] is model.a.weight
    assert torch.equal(values["down.weight"], model.up.weight.t())


def test_summary_counts_a_tied_tensor_once() -> None:
    """The repr's parameter count holds each tied tensor once."""
    _, ms = tied_autoencoder()
    assert "Parameters: 19 (76 B)" in repr(ms)  # enc.weight 12 + enc.bias 3 + dec.bias 4


# --------------------------------------------------------------------------- update


def test_update_through_identity_destination_writes_source() -> None:
    """A value for an identity destination is written into the source."""
    model, ms = tied_twin()
    source = model.a.weight
    ms.update({"b.weight": torch.full((3, 3), 2.0)})
    assert model.a.weight is source
    assert torch.equal(source, torch.full((3, 3), 2.0))


def test_update_conflicting_values_for_one_tied_tensor_is_value_error() -> None:
    """Two different values for one tied tensor are a ValueError and nothing is written."""
    model, ms = tied_twin()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    values = {
        "a.bias": torch.zeros(3),
        "a.weight": torch.zeros(3, 3),
        "b.weight": torch.ones(3, 3),
    }
    with pytest.raises(ValueError, match="different values"):
        ms.update(values)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_update_equal_values_for_one_tied_tensor_is_fine() -> None:
    """Equal values under a source and its destination are accepted."""
    model, ms = tied_twin()
    ms.update({"a.weight": torch.ones(3, 3), "b.weight": torch.ones(3, 3)})
    assert torch.equal(model.b.weight, torch.ones(3, 3))


def test_update_from_own_state_dict_of_tied_model() -> None:
    """`ms.update(model.state_dict())` on an identity-tied model is accepted and changes nothing."""
    model, ms = tied_twin()
    before = snapshot(model, ms)
    ms.update(model.state_dict())
    assert_same(before, snapshot(model, ms))


def test_update_from_another_tied_models_state_dict() -> None:
    """`ms.update(other.state_dict())` loads an identity-tied model's values, tie kept."""
    model, ms = tied_twin()
    other = twin()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.b.weight = other.a.weight
    ms.update(other.state_dict())
    for key, value in other.state_dict().items():
        assert torch.equal(ms.to_dict()[key], value), key
    assert model.b.weight is model.a.weight


def test_update_transform_destination_is_value_error() -> None:
    """A value for a transform destination is a ValueError naming the source; nothing written."""
    model, ms = tied_autoencoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"dec\.weight.*transform tie[\s\S]*enc\.weight"):
        ms.update({"enc.bias": torch.zeros(3), "dec.weight": torch.zeros(4, 3)})
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------- merge


def test_merge_applies_once_to_identity_tied_tensor() -> None:
    """`merges.add(1.0)` doubles an identity-tied tensor once, not twice."""
    model, ms = tied_twin()
    before = model.a.weight.detach().clone()
    ms.merge(model.state_dict(), merges.add(1.0))
    torch.testing.assert_close(model.a.weight, 2.0 * before)
    assert model.b.weight is model.a.weight


def test_merge_applies_once_to_transform_tied_tensor() -> None:
    """`merges.add(1.0)` from a transform-tied rhs doubles the source once."""
    model, ms = tied_autoencoder()
    other = copy.deepcopy(model)
    before = model.enc.weight.detach().clone()
    ms.merge(other, merges.add(1.0))
    torch.testing.assert_close(model.enc.weight, 2.0 * before)
    torch.testing.assert_close(model.dec.weight, 2.0 * before.t())


def test_merge_function_is_called_once_per_tied_tensor() -> None:
    """A merge function is called for source keys only, never for destinations."""
    model = triple()
    ms = ModelState.new(model).tie("b.weight", "a.weight").tie("down.weight", "up.weight", torch.t)
    seen: list[str] = []

    def fun(path: list[str], lhs: Tensor, rhs: Tensor) -> Tensor:
        seen.append(".".join(path))
        return lhs + rhs

    ms.merge(model.state_dict(), fun)
    assert seen == list(ms.parameters())


# --------------------------------------------------------------------------- untie


def test_untie_identity_gives_destination_its_own_copy() -> None:
    """Untie gives an identity destination a new Parameter with equal values, own storage."""
    model, ms = tied_twin()
    ms.untie("b.weight")
    assert isinstance(model.b.weight, nn.Parameter)
    assert model.b.weight is not model.a.weight
    assert model.b.weight.data_ptr() != model.a.weight.data_ptr()
    assert torch.equal(model.b.weight, model.a.weight)
    assert ms.ties() == {}
    assert list(ms.parameters()) == list(model.state_dict())
    with torch.no_grad():
        model.a.weight.add_(1.0)
    assert not torch.equal(model.b.weight, model.a.weight)


def test_untie_discovered_tie() -> None:
    """Untie also separates a tie found in the module."""
    model = twin()
    model.b.weight = model.a.weight
    ModelState.new(model).untie("b.weight")
    assert model.b.weight is not model.a.weight


def test_untie_identity_keeps_frozen_flag() -> None:
    """An untied destination of a frozen source is frozen too."""
    model, ms = tied_twin()
    ms.freeze("a.weight").untie("b.weight")
    assert model.b.weight.requires_grad is False


def test_untie_transform_materialises_the_value() -> None:
    """Untie gives a transform destination its current value as its own Parameter."""
    model, ms = tied_autoencoder()
    expected = model.enc.weight.detach().t().clone()
    ms.untie("dec.weight")
    assert isinstance(model.dec.weight, nn.Parameter)
    assert torch.equal(model.dec.weight, expected)
    assert model.dec.weight.is_contiguous()
    with torch.no_grad():
        model.enc.weight.add_(1.0)
    assert torch.equal(model.dec.weight, expected)
    assert ms.ties() == {}


def test_untie_transform_restores_class_and_parameter_order() -> None:
    """After untie the module's class and parameter order are those before the tie."""
    model = autoencoder()
    keys = list(model.state_dict())
    ms = ModelState.new(model).tie("dec.weight", "enc.weight", torch.t)
    ms.untie("dec.weight")
    assert type(model.dec) is nn.Linear
    assert list(model.dec._parameters) == ["weight", "bias"]
    assert list(model.state_dict()) == keys
    assert [name for name, _ in model.named_parameters()] == keys


def test_untie_two_transform_ties_of_one_module_restores_parameter_order() -> None:
    """Untying both transform ties of one module, in the order made, restores its order."""
    model = triple()
    keys = list(model.state_dict())
    ms = ModelState.new(model).tie("c.weight", "a.weight", "transpose")
    ms.tie("c.bias", "a.bias", torch.neg)
    ms.untie("c.weight").untie("c.bias")
    assert list(model.c._parameters) == ["weight", "bias"]
    assert list(model.state_dict()) == keys


def test_untie_two_transform_ties_in_reverse_order_restores_parameter_order() -> None:
    """Untying both transform ties of one module in reverse order restores its order."""
    model = triple()
    ms = ModelState.new(model).tie("c.weight", "a.weight", "transpose")
    ms.tie("c.bias", "a.bias", torch.neg)
    ms.untie("c.bias").untie("c.weight")
    assert list(model.c._parameters) == ["weight", "bias"]
    assert type(model.c) is nn.Linear


def test_untie_transform_module_keeps_working() -> None:
    """An untied module computes, trains and pickles as a plain one."""
    model, ms = tied_autoencoder()
    ms.untie("dec.weight")
    model(torch.randn(2, 4)).sum().backward()
    assert model.dec.weight.grad is not None
    loaded = pickle.loads(pickle.dumps(model))
    assert torch.equal(loaded.dec.weight, model.dec.weight)


def test_untie_then_tie_again() -> None:
    """A destination can be tied again after untie."""
    model, ms = tied_autoencoder()
    ms.untie("dec.weight").tie("dec.weight", "enc.weight", "transpose")
    assert ms.ties() == {"dec.weight": "enc.weight"}
    assert torch.equal(model.dec.weight, model.enc.weight.t())


def test_untie_shared_submodule_is_value_error() -> None:
    """A submodule registered twice cannot be untied attribute by attribute."""
    model = twin()
    model.b = model.a
    ms = ModelState.new(model)
    with pytest.raises(ValueError, match="shared submodule"):
        ms.untie("b.weight")
    assert model.b is model.a


class Forwarding(nn.Linear):
    """A layer with its own `__getattr__` that answers one extra name, as wrappers do."""

    def __getattr__(self, name: str) -> Any:
        if name == "extra":
            return 42
        return super().__getattr__(name)


def test_transform_tie_keeps_the_modules_own_getattr() -> None:
    """A module class's own `__getattr__` still answers after a transform tie on it."""
    model = nn.ModuleDict({"enc": nn.Linear(4, 3), "dec": Forwarding(3, 4)})
    assert model.dec.extra == 42
    ModelState.new(model).tie("dec.weight", "enc.weight", "transpose")
    assert model.dec.extra == 42


def test_transform_tie_within_one_module() -> None:
    """Destination and source may be two attributes of one module, and untie restores it."""
    module = nn.Module()
    module.w1 = nn.Parameter(torch.randn(3, 4))
    module.w2 = nn.Parameter(torch.randn(4, 3))
    ms = ModelState.new(module).tie("w2", "w1", "transpose")
    assert torch.equal(module.w2, module.w1.t())
    clone = copy.deepcopy(module)
    with torch.no_grad():
        clone.w1.add_(1.0)
    assert torch.equal(clone.w2, clone.w1.t())
    ms.untie("w2")
    assert type(module) is nn.Module
    assert list(module.state_dict()) == ["w1", "w2"]


def test_clone_keeps_ties() -> None:
    """A standalone clone of a tied state has the same ties and transforms."""
    model = triple()
    ms = ModelState.new(model).tie("b.weight", "a.weight").tie("down.weight", "up.weight", torch.t)
    clone = ms.clone()
    assert clone.ties() == ms.ties()
    assert clone.transforms() == ms.transforms()
    values = clone.to_dict()
    assert list(values) == list(model.state_dict())
    assert values["b.weight"] is values["a.weight"]
    assert values["a.weight"] is not model.a.weight


def test_untie_key_that_is_not_tied_is_value_error() -> None:
    """Untie of a key that is no tie destination is a ValueError."""
    model, ms = tied_twin()
    before = snapshot(model, ms)
    with pytest.raises(ValueError, match="not a tie destination"):
        ms.untie("a.weight")
    assert_same(before, snapshot(model, ms))


def test_untie_unknown_key_is_key_error() -> None:
    """Untie of an unknown key is a KeyError."""
    _, ms = tied_twin()
    with pytest.raises(KeyError, match=r"c\.weight"):
        ms.untie("c.weight")


# --------------------------------------------------------------------------- standalone


def standalone() -> ModelState:
    torch.manual_seed(0)
    return ModelState.new(
        {
            "a": torch.randn(3, 3),
            "b": torch.randn(3, 3),
            "up": torch.randn(3, 5),
            "down": torch.randn(5, 3),
        }
    )


def test_standalone_identity_tie() -> None:
    """In a dict-backed state an identity destination resolves to the source tensor."""
    ms = standalone().tie("b", "a")
    values = ms.to_dict()
    assert list(values) == ["a", "b", "up", "down"]
    assert values["b"] is values["a"]
    assert ms.ties() == {"b": "a"}
    assert list(ms.parameters()) == ["a", "up", "down"]


def test_standalone_transform_tie() -> None:
    """In a dict-backed state a transform destination is computed from the source."""
    ms = standalone().tie("down", "up", "transpose")
    values = ms.to_dict()
    assert torch.equal(values["down"], values["up"].t())
    assert ms.transforms() == {"down": "transpose"}
    assert list(ms.parameters()) == ["a", "b", "up"]


def test_standalone_discovers_shared_tensor() -> None:
    """One tensor under two keys of a dict is an identity tie, the later key the destination."""
    w = torch.randn(2, 2)
    ms = ModelState.new({"x": torch.zeros(2), "first": w, "second": w})
    assert ms.ties() == {"second": "first"}


def test_standalone_tie_validation() -> None:
    """A dict-backed state refuses unknown keys, self ties and shape mismatches, unchanged."""
    ms = standalone()
    before = {k: v.clone() for k, v in ms.to_dict().items()}
    with pytest.raises(KeyError, match="nope"):
        ms.tie("nope", "a")
    with pytest.raises(ValueError, match="same"):
        ms.tie("a", "a")
    with pytest.raises(ValueError, match="transpose"):
        ms.tie("down", "up")
    with pytest.raises(ValueError, match="does not fit"):
        ms.tie("a", "up")
    assert ms.ties() == {}
    assert all(torch.equal(v, before[k]) for k, v in ms.to_dict().items())


def test_standalone_untie_identity() -> None:
    """Untie in a dict-backed state gives the destination its own copy."""
    ms = standalone().tie("b", "a").untie("b")
    values = ms.to_dict()
    assert values["b"] is not values["a"]
    assert values["b"].data_ptr() != values["a"].data_ptr()
    assert torch.equal(values["b"], values["a"])
    assert ms.ties() == {}
    assert list(ms.parameters()) == ["a", "b", "up", "down"]


def test_standalone_untie_transform() -> None:
    """Untie of a transform destination in a dict-backed state materialises its value."""
    ms = standalone().tie("down", "up", torch.t).untie("down")
    values = ms.to_dict()
    assert torch.equal(values["down"], values["up"].t())
    values["up"].add_(1.0)
    assert not torch.equal(ms.to_dict()["down"], ms.to_dict()["up"].t())


def test_standalone_untie_not_tied_and_unknown() -> None:
    """Untie in a dict-backed state: ValueError for a plain key, KeyError for an unknown one."""
    ms = standalone()
    with pytest.raises(ValueError, match="not a tie destination"):
        ms.untie("a")
    with pytest.raises(KeyError, match="nope"):
        ms.untie("nope")


def test_standalone_freezing_follows_source() -> None:
    """In a dict-backed state a destination is never listed; untie keeps the source's flag."""
    ms = standalone().tie("b", "a").freeze("a")
    assert list(ms.frozen_parameters()) == ["a"]
    ms.untie("b")
    assert list(ms.frozen_parameters()) == ["a", "b"]


def test_standalone_update_through_destination() -> None:
    """Update through a dict-backed identity destination writes the source."""
    ms = standalone().tie("b", "a")
    ms.update({"b": torch.ones(3, 3)})
    assert torch.equal(ms.to_dict()["a"], torch.ones(3, 3))


def test_standalone_update_conflict_is_value_error() -> None:
    """Conflicting values for a dict-backed tie are a ValueError and nothing is written."""
    ms = standalone().tie("b", "a")
    before = {k: v.clone() for k, v in ms.to_dict().items()}
    with pytest.raises(ValueError, match="different values"):
        ms.update({"up": torch.zeros(3, 5), "a": torch.zeros(3, 3), "b": torch.ones(3, 3)})
    assert all(torch.equal(v, before[k]) for k, v in ms.to_dict().items())


def test_standalone_update_transform_destination_is_value_error() -> None:
    """A value for a dict-backed transform destination is a ValueError."""
    ms = standalone().tie("down", "up", "transpose")
    with pytest.raises(ValueError, match="transform tie"):
        ms.update({"down": torch.zeros(5, 3)})


def test_standalone_merge_applies_once() -> None:
    """Merge into a dict-backed tied state touches each tied tensor once."""
    ms = standalone().tie("b", "a").tie("down", "up", "transpose")
    before = {k: v.clone() for k, v in ms.to_dict().items()}
    ms.merge(before, merges.add(1.0))
    after = ms.to_dict()
    torch.testing.assert_close(after["a"], 2.0 * before["a"])
    torch.testing.assert_close(after["up"], 2.0 * before["up"])
    torch.testing.assert_close(after["down"], 2.0 * before["up"].t())
    assert after["b"] is after["a"]


def test_update_accepts_a_state_dict_of_a_transform_tied_model() -> None:
    """`ms.update(model.state_dict())` works: the computed value agrees and is skipped."""
    model, ms = tied_autoencoder()
    other, _ = tied_autoencoder()
    with torch.no_grad():
        other.enc.weight.add_(1.0)
    ms.update(other.state_dict())
    assert torch.equal(model.enc.weight, other.enc.weight)
    assert torch.equal(model.dec.weight, other.enc.weight.t())
    ms.update(ms.to_dict())


def test_transform_that_fails_on_the_source_is_value_error() -> None:
    """A transform that cannot apply to the source (transpose of a 3-d weight) is refused."""
    model = nn.ModuleDict({"a": nn.Conv1d(2, 3, 1), "b": nn.Conv1d(3, 2, 1)})
    assert_refused(
        model, ModelState.new(model), ValueError, "transform", "b.weight", "a.weight", "transpose"
    )


def test_update_with_nan_in_an_identity_tied_tensor() -> None:
    """NaN under both keys of one tied tensor is the same value, not a conflict."""
    model = nn.ModuleDict({"e": nn.Embedding(3, 2), "h": nn.Linear(2, 3, bias=False)})
    model.h.weight = model.e.weight
    with torch.no_grad():
        model.e.weight[0, 0] = float("nan")
    ModelState.new(model).update({k: v.clone() for k, v in model.state_dict().items()})
    assert torch.isnan(model.e.weight[0, 0])
