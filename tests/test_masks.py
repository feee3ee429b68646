"""Masks: every accepted form, errors for the rest, evaluation once per leaf and atomically."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import torch_modelstate as tms
from torch_modelstate import ModelState


def blocks_model() -> nn.ModuleDict:
    """Embeddings, two transformer-ish blocks, a final norm, numbered dense layers, a head."""
    torch.manual_seed(0)

    def block() -> nn.ModuleDict:
        attn = nn.ModuleDict({"q": nn.Linear(2, 2), "k": nn.Linear(2, 2, bias=False)})
        return nn.ModuleDict({"attn": attn, "mlp": nn.Linear(2, 2), "norm": nn.BatchNorm1d(2)})

    return nn.ModuleDict(
        {
            "embed": nn.Linear(2, 2, bias=False),
            "blocks": nn.ModuleList([block(), block()]),
            "norm": nn.BatchNorm1d(2),
            "dense_1": nn.Linear(2, 2),
            "dense_2": nn.Linear(2, 2),
            "dense_10": nn.Linear(2, 2),
            "head": nn.Linear(2, 1),
        }
    )


def selected(mask, model: nn.Module | None = None) -> list[str]:
    """The keys that `freeze(mask)` freezes on a fresh model, in state_dict order."""
    model = blocks_model() if model is None else model
    ms = ModelState.new(model).freeze(mask)
    frozen = set(ms.frozen_parameters()) | set(ms.frozen_state())
    return [key for key in model.state_dict() if key in frozen]


ALL_KEYS = list(blocks_model().state_dict())


def test_none_selects_every_leaf():
    """`None` selects every parameter and every buffer."""
    assert selected(None) == ALL_KEYS


def test_callable_with_match_over_list_paths():
    """A callable gets list paths, so Python's `match` reads like Axon's pattern matching."""

    def mask(path):
        match path:
            case [layer, "weight"] if layer.startswith("dense_"):
                return int(layer.removeprefix("dense_")) < 3
            case _:
                return False

    assert selected(mask) == ["dense_1.weight", "dense_2.weight"]


def test_callable_receives_a_list_of_strings():
    """The callable's argument is a fresh `list` of `str` per leaf."""
    seen = []

    def mask(path):
        seen.append(path)
        return False

    selected(mask)
    assert all(type(p) is list and all(type(s) is str for s in p) for p in seen)
    assert [".".join(p) for p in seen] == ALL_KEYS


def test_glob_star_matches_within_one_segment():
    """`*` matches any run of characters inside one segment."""
    assert selected("dense_*.weight") == ["dense_1.weight", "dense_2.weight", "dense_10.weight"]


def test_glob_star_does_not_cross_dots():
    """`*.weight` matches only two-segment keys."""
    assert "blocks.0.mlp.weight" not in selected("*.weight")
    assert selected("*.weight") == [
        "embed.weight",
        "norm.weight",
        "dense_1.weight",
        "dense_2.weight",
        "dense_10.weight",
        "head.weight",
    ]


def test_glob_star_matches_an_empty_run():
    """`*` may match nothing: `dense_1*` matches `dense_1` and `dense_10`."""
    assert selected("dense_1*.bias") == ["dense_1.bias", "dense_10.bias"]


def test_glob_question_mark_matches_one_character():
    """`?` matches exactly one character, so `dense_?` leaves `dense_10` out."""
    assert selected("dense_?.bias") == ["dense_1.bias", "dense_2.bias"]


def test_glob_double_star_after_a_prefix():
    """`norm.**` selects everything under the top-level `norm`, state included."""
    assert selected("norm.**") == [
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    ]


def test_glob_double_star_before_a_suffix():
    """`**.bias` selects every bias at any depth."""
    assert selected("**.bias") == [k for k in ALL_KEYS if k.endswith(".bias")]


def test_glob_double_star_matches_zero_segments():
    """`**.bias` also selects a top-level `bias`; `a.**.b` also matches `a.b`."""
    assert selected("**.bias", nn.Linear(2, 2)) == ["bias"]
    assert tms.any_of("blocks.**.weight")(["blocks", "weight"])


def test_glob_double_star_in_the_middle():
    """`blocks.*.attn.**` selects the attention leaves of every block."""
    assert selected("blocks.*.attn.**") == [
        "blocks.0.attn.q.weight",
        "blocks.0.attn.q.bias",
        "blocks.0.attn.k.weight",
        "blocks.1.attn.q.weight",
        "blocks.1.attn.q.bias",
        "blocks.1.attn.k.weight",
    ]


def test_glob_double_star_alone_selects_everything():
    """A glob of only `**` selects every leaf."""
    assert selected("**") == ALL_KEYS


def test_glob_exact_key():
    """A glob without wildcards selects exactly that key."""
    assert selected("blocks.1.norm.running_var") == ["blocks.1.norm.running_var"]


def test_glob_other_characters_are_literal():
    """Regex metacharacters in a glob are plain characters."""
    mask = tms.any_of("a+b.(x)")
    assert mask(["a+b", "(x)"])
    assert not mask(["aab", "x"])


def test_compiled_regex_uses_fullmatch():
    """A compiled regex must match the whole key, not a part of it."""
    assert selected(re.compile(r"dense_\d")) == []
    assert selected(re.compile(r"dense_\d\.weight")) == ["dense_1.weight", "dense_2.weight"]
    assert selected(re.compile(r"dense_\d+\.(weight|bias)")) == [
        k for k in ALL_KEYS if k.startswith("dense_")
    ]


def test_list_matches_if_any_element_matches():
    """A list of masks selects the union."""
    assert selected(["norm.**", "head.*"]) == [
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
        "head.weight",
        "head.bias",
    ]


def test_tuple_is_accepted_like_a_list():
    """A tuple means the same as a list."""
    assert selected(("norm.**", "head.*")) == selected(["norm.**", "head.*"])


def test_nested_lists_of_mixed_forms():
    """Lists nest and mix globs, regexes and callables."""
    mask = [["head.weight"], [re.compile(r"embed\..*"), [lambda p: p[-1] == "running_var"]]]
    assert selected(mask) == [
        "embed.weight",
        "blocks.0.norm.running_var",
        "blocks.1.norm.running_var",
        "norm.running_var",
        "head.weight",
    ]


def test_empty_list_selects_nothing():
    """An empty list has no element that matches."""
    assert selected([]) == []


def test_any_of_is_the_union():
    """`any_of(a, b)` selects what either selects."""
    assert selected(tms.any_of("head.*", re.compile(r"embed\..*"))) == [
        "embed.weight",
        "head.weight",
        "head.bias",
    ]


def test_all_of_is_the_intersection():
    """`all_of(a, b)` selects what both select."""
    assert selected(tms.all_of("blocks.**", "**.weight", lambda p: p[1] == "1")) == [
        "blocks.1.attn.q.weight",
        "blocks.1.attn.k.weight",
        "blocks.1.mlp.weight",
        "blocks.1.norm.weight",
    ]


def test_not_is_the_complement():
    """`not_(m)` selects every leaf that `m` does not."""
    assert selected(tms.not_("blocks.**")) == [k for k in ALL_KEYS if not k.startswith("blocks.")]


def test_operators_or_and_invert():
    """`|`, `&` and `~` on a Mask mean any_of, all_of and not_."""
    head = tms.any_of("head.*")
    assert selected(head | "embed.*") == selected(tms.any_of("head.*", "embed.*"))
    assert selected(head & "**.bias") == ["head.bias"]
    assert selected(~head) == [k for k in ALL_KEYS if not k.startswith("head.")]


def test_combinators_accept_every_form():
    """Combinators take globs, regexes, callables, lists and None."""
    mask = tms.all_of(None, ["**.weight", re.compile(r".*bias")], tms.not_(lambda p: "blocks" in p))
    assert selected(mask) == [
        k for k in ALL_KEYS if not k.startswith("blocks.") and k.endswith(("weight", "bias"))
    ]


def test_mask_is_callable_on_paths_and_keys():
    """A compiled Mask decides a list path or a dotted key."""
    mask = tms.any_of("blocks.*.attn.**")
    assert mask(["blocks", "0", "attn", "q", "weight"])
    assert mask("blocks.0.attn.q.weight")
    assert not mask(["blocks", "0", "mlp", "weight"])


def test_masks_have_readable_reprs():
    """A mask's repr shows the forms it was built from."""

    def dense(path):
        return False

    text = repr(tms.all_of(tms.any_of("head.*", re.compile("x")), tms.not_(dense)))
    assert "'head.*'" in text
    assert "'x'" in text
    assert "dense" in text
    assert "not_" in text


@pytest.mark.parametrize(
    "mask",
    [1, 0.5, True, False, b"head.*", {"head.weight": True}, {"head.*"}, nn.Linear, object()],
    ids=["int", "float", "True", "False", "bytes", "dict", "set", "class", "object"],
)
def test_other_forms_are_a_type_error(mask):
    """Anything but None, a glob, a regex, a callable, a list/tuple or a Mask is a TypeError."""
    ms = ModelState.new(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="A mask must be None"):
        ms.freeze(mask)
    assert ms.frozen_parameters() == {}


def test_a_bad_form_inside_a_list_is_a_type_error():
    """The elements of a list are checked too."""
    with pytest.raises(TypeError, match="got: int 3"):
        ModelState.new(nn.Linear(2, 2)).freeze(["weight", [3]])


def test_a_callable_object_is_a_mask():
    """Any callable instance (not only functions) is a callable mask."""

    class LastIs:
        def __call__(self, path):
            return path[-1] == "bias"

    assert selected(LastIs(), nn.Linear(2, 2)) == ["bias"]


def test_a_bytes_regex_is_a_type_error():
    """A regex compiled from bytes cannot match keys: a TypeError, nothing frozen."""
    ms = ModelState.new(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="bytes"):
        ms.freeze(re.compile(b"weight"))
    assert ms.frozen_parameters() == {}


def test_a_bytes_regex_in_a_list_is_a_type_error():
    """Next to a glob, a bytes regex is still a TypeError."""
    ms = ModelState.new(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="bytes"):
        ms.freeze(["bias", re.compile(b"weight")])
    assert ms.frozen_parameters() == {}


def test_bool_mask_error_suggests_none():
    """Passing True (a common slip for 'everything') says to pass None."""
    with pytest.raises(TypeError, match="pass None to select every leaf"):
        ModelState.new(nn.Linear(2, 2)).freeze(True)


@pytest.mark.parametrize("glob", ["", "a..b", "a.", ".a", "a**", "**b.c", "a.***"])
def test_bad_globs_are_a_value_error(glob):
    """Empty globs, empty segments and `**` inside a segment are ValueErrors."""
    ms = ModelState.new(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"(?i)glob"):
        ms.freeze(glob)
    assert ms.frozen_parameters() == {}


@pytest.mark.parametrize("result", [None, 1, 0, "yes", torch.tensor(True)], ids=repr)
def test_callable_returning_a_non_bool_is_a_type_error(result):
    """A callable mask must return True or False; anything else is a TypeError."""
    ms = ModelState.new(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected: True or False"):
        ms.freeze(lambda path: result)
    assert ms.frozen_parameters() == {}


def test_callable_is_called_once_per_leaf():
    """`freeze(fn)` calls `fn` exactly once for every leaf."""
    calls = []
    selected(lambda p: calls.append(".".join(p)) is None)
    assert calls == ALL_KEYS


def test_callable_in_a_list_is_called_at_most_once_per_leaf():
    """In a list, a callable is asked at most once per leaf (not for leaves already chosen)."""
    calls = []
    selected(["head.*", lambda p: calls.append(".".join(p)) is None, lambda p: False])
    assert len(calls) == len(set(calls))
    assert set(calls) == set(ALL_KEYS) - {"head.weight", "head.bias"}


def test_callables_in_combinators_are_called_at_most_once_per_leaf():
    """`not_` and `all_of` call each callable at most once per leaf."""
    calls = []

    def mask(path):
        calls.append(".".join(path))
        return "blocks" in path

    selected(tms.all_of(tms.not_(mask), "**"))
    assert sorted(calls) == sorted(ALL_KEYS)


def test_tie_destinations_are_not_asked():
    """The mask decides leaves only; an identity tie destination is not passed to it."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model[1].weight = model[0].weight
    calls = []
    ModelState.new(model).freeze(lambda p: calls.append(".".join(p)) is None)
    assert calls == ["0.weight"]


def test_a_mask_raising_half_way_freezes_nothing():
    """If the mask raises on a later leaf, no leaf has been frozen."""
    model = blocks_model()
    ms = ModelState.new(model)

    def mask(path):
        if path[0] == "head":
            raise RuntimeError("boom")
        return True

    with pytest.raises(RuntimeError, match="boom"):
        ms.freeze(mask)
    assert ms.frozen_parameters() == {}
    assert ms.frozen_state() == {}
    assert all(p.requires_grad for p in model.parameters())


def test_a_mask_raising_half_way_unfreezes_nothing():
    """If the mask raises during `unfreeze`, every leaf stays frozen."""
    ms = ModelState.new(blocks_model()).freeze()

    def mask(path):
        if path[0] == "dense_10":
            raise RuntimeError("boom")
        return True

    with pytest.raises(RuntimeError, match="boom"):
        ms.unfreeze(mask)
    assert ms.trainable_parameters() == {}
    assert ms.trainable_state() == {}


def test_a_non_bool_half_way_freezes_nothing():
    """A callable returning a non-bool for a later leaf leaves everything trainable."""
    ms = ModelState.new(blocks_model())
    with pytest.raises(TypeError, match="returned None"):
        ms.freeze(lambda p: True if p[0] != "head" else None)
    assert ms.frozen_parameters() == {}


def test_a_bad_glob_in_a_list_with_a_callable_freezes_nothing():
    """A bad glob is found before any callable runs or anything changes."""
    calls = []
    ms = ModelState.new(blocks_model())
    with pytest.raises(ValueError, match=r"Glob 'a..b' has an empty segment"):
        ms.freeze([lambda p: calls.append(p) is None, "a..b"])
    assert calls == []
    assert ms.frozen_parameters() == {}


def test_regex_flags_do_not_leak_into_globs():
    """`re.IGNORECASE` on one regex does not make a glob in the same list case-insensitive."""
    mask = tms.any_of("Head.*", re.compile(r"xyz", re.IGNORECASE))
    assert not mask(["head", "weight"])


def test_regex_flags_do_not_leak_into_other_regexes():
    """A case-sensitive regex stays case-sensitive next to a case-insensitive one."""
    mask = [re.compile(r"Head\..*"), re.compile(r"xyz", re.IGNORECASE)]
    assert selected(mask) == []


def test_regex_with_inline_flags_in_a_list():
    """A regex with inline global flags works next to a glob."""
    assert selected(["embed.*", re.compile(r"(?i)HEAD\..*")]) == [
        "embed.weight",
        "head.weight",
        "head.bias",
    ]


def test_regexes_with_the_same_group_name_in_a_list():
    """Two regexes may use the same named group."""
    mask = [re.compile(r"(?P<n>head)\.weight"), re.compile(r"(?P<n>embed)\.weight")]
    assert selected(mask) == ["embed.weight", "head.weight"]


def test_regexes_with_backreferences_in_a_list():
    """`\\1` in the second regex of a list refers to that regex's own group."""
    mask = tms.any_of(re.compile(r"(x)\1"), re.compile(r"(b)\1"))
    assert mask(["bb"])
