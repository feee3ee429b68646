"""Strict masks in freeze/unfreeze: typos are KeyErrors, tie destinations act on their source,
and unfreeze adds the thawed parameters to an optimizer."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import torch_modelstate as tms
from torch_modelstate import ModelState


def frozen(ms: ModelState) -> set[str]:
    return set(ms.frozen_parameters()) | set(ms.frozen_state())


class TiedLM(nn.Module):
    """A Hugging Face-style model whose head weight is its embedding (an identity tie)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.dense_1 = nn.Linear(3, 3)
        self.lm_head = nn.Linear(3, 5, bias=False)
        self.lm_head.weight = self.embed.weight


def test_unfreeze_of_a_tied_head_key_thaws_the_embedding():
    """`unfreeze("lm_head.weight")` on a tied head makes the one shared tensor trainable."""
    model = TiedLM()
    ms = ModelState.new(model).freeze()
    ms.unfreeze("lm_head.weight")
    assert model.embed.weight.requires_grad
    assert list(ms.trainable_parameters()) == ["embed.weight"]


def test_a_glob_over_a_tie_destination_acts_on_its_source():
    """`unfreeze("lm_head.**")` selects the head's tied weight, i.e. the embedding."""
    model = TiedLM()
    ms = ModelState.new(model).freeze().unfreeze("lm_head.**")
    assert set(ms.trainable_parameters()) == {"embed.weight"}
    ms.freeze(["lm_head.*"])
    assert not model.embed.weight.requires_grad


def test_a_transform_destination_key_acts_on_its_source():
    """Freezing a transform-tied destination's key freezes its source."""
    model = nn.ModuleDict({"enc": nn.Linear(4, 2), "dec": nn.Linear(2, 4)})
    ms = ModelState.new(model).tie("dec.weight", "enc.weight", transform="transpose")
    ms.freeze("dec.weight")
    assert frozen(ms) == {"enc.weight"}


def test_a_callable_sees_leaves_only_not_tie_destinations():
    """A callable mask is called once per leaf; tie destinations are not passed to it."""
    seen: list[list[str]] = []
    ModelState.new(TiedLM()).freeze(lambda path: seen.append(path) or False)
    assert ["lm_head", "weight"] not in seen
    assert len(seen) == len(ModelState.new(TiedLM()).parameters())


def test_a_typo_in_freeze_is_a_key_error_with_did_you_mean():
    """`freeze("dense_1.wieght")` names the string and the closest key, and freezes nothing."""
    model = TiedLM()
    ms = ModelState.new(model)
    with pytest.raises(KeyError, match=r"'dense_1.wieght' matches no key") as info:
        ms.freeze("dense_1.wieght")
    assert "did you mean: dense_1.weight" in str(info.value)
    assert "strict=False" in str(info.value)
    assert frozen(ms) == set()


@pytest.mark.parametrize(
    "mask",
    [
        ["dense_1.*", "dense_2.**"],
        ("embed.weight", "dense_2.**"),
        tms.any_of("dense_1.*", "dense_2.**"),
        tms.all_of("**.weight", "dense_2.**"),
        tms.not_("dense_2.**"),
        tms.any_of("dense_1.*", re.compile(".*")) | "dense_2.**",
    ],
    ids=["list", "tuple", "any_of", "all_of", "not_", "operators"],
)
def test_a_dead_string_anywhere_in_a_mask_is_refused_and_nothing_changes(mask):
    """A string matching nothing is a KeyError wherever it sits in the mask, before any change."""
    model = TiedLM()
    ms = ModelState.new(model).freeze("dense_1.bias")
    with pytest.raises(KeyError, match=r"'dense_2\.\*\*' matches no key"):
        ms.unfreeze(mask)
    with pytest.raises(KeyError, match=r"'dense_2\.\*\*' matches no key"):
        ms.freeze(mask)
    assert frozen(ms) == {"dense_1.bias"}


def test_callables_and_regexes_may_select_nothing():
    """Only strings are strict: a callable or a compiled regex that selects nothing is fine."""
    ms = ModelState.new(TiedLM())
    ms.freeze(lambda path: False).freeze(re.compile(r"nothing\..*")).freeze([])
    assert frozen(ms) == set()


def test_strict_false_allows_strings_that_match_nothing():
    """`strict=False` lets a string select nothing and still applies the rest of the mask."""
    ms = ModelState.new(TiedLM())
    ms.freeze(["dense_1.*", "dense_2.**"], strict=False)
    assert frozen(ms) == {"dense_1.weight", "dense_1.bias"}
    ms.unfreeze("nothing", strict=False)
    assert frozen(ms) == {"dense_1.weight", "dense_1.bias"}


def test_a_dict_backed_state_is_strict_too():
    """A standalone state refuses a dead string just like a module view."""
    ms = ModelState.new({"a": {"w": torch.zeros(1)}})
    with pytest.raises(KeyError, match=r"did you mean: a\.w"):
        ms.freeze("a.v")
    assert frozen(ms) == set()


# --------------------------------------------------------------------------- unfreeze + optimizer


def test_unfreeze_adds_the_thawed_parameters_to_the_optimizer_once():
    """Gradual unfreezing: the thawed parameters join the optimizer as one group, once."""
    model = TiedLM()
    ms = ModelState.new(model).freeze("dense_1.**")
    opt = torch.optim.SGD(ms.trainable_parameters().values(), lr=0.1)
    ms.unfreeze("dense_1.**", optimizer=opt, lr=0.01)
    ms.unfreeze("dense_1.**", optimizer=opt, lr=0.01)
    assert len(opt.param_groups) == 2
    added = opt.param_groups[1]["params"]
    assert [id(p) for p in added] == [id(model.dense_1.weight), id(model.dense_1.bias)]
    assert opt.param_groups[1]["lr"] == 0.01


def test_unfreeze_with_a_typo_and_an_optimizer_changes_neither():
    """A dead string is found before the thaw and before the optimizer is touched."""
    model = TiedLM()
    ms = ModelState.new(model).freeze()
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(KeyError, match="did you mean"):
        ms.unfreeze("dense_1.wieght", optimizer=opt, lr=0.01)
    assert ms.trainable_parameters() == {}
    assert len(opt.param_groups) == 1


def test_unfreeze_with_a_bad_optimizer_thaws_nothing():
    """The optimizer argument is checked before anything is thawed."""
    ms = ModelState.new(TiedLM()).freeze()
    with pytest.raises(TypeError):
        ms.unfreeze("dense_1.**", optimizer=object())
    assert ms.trainable_parameters() == {}


def test_group_options_without_an_optimizer_are_refused():
    """Param-group options need an optimizer; the state is left as it was."""
    ms = ModelState.new(TiedLM()).freeze()
    with pytest.raises(TypeError, match="without an optimizer"):
        ms.unfreeze("dense_1.**", lr=0.01)
    assert ms.trainable_parameters() == {}


def test_the_strict_flag_is_keyword_only():
    """`strict` cannot be passed by position (it would read as a second mask)."""
    ms = ModelState.new(TiedLM())
    with pytest.raises(TypeError):
        ms.freeze("dense_1.*", False)  # type: ignore[misc]
