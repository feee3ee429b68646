"""Param groups by mask, the recipes, and adding parameters to a live optimizer."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_modelstate as tms
from torch_modelstate import ModelState, optim
from torch_modelstate._masks import compile_mask

OPTIMIZERS = [torch.optim.AdamW, torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop,
              torch.optim.Adagrad]  # fmt: skip


class MyRMSNorm(nn.Module):
    """A norm of another library: known by its class name only."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "embed": nn.Embedding(10, 4),
            "blocks": nn.ModuleList(
                nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(3)
            ),
            "norm": MyRMSNorm(4),
            "head": nn.Linear(4, 10),
        }
    )


def names(groups: list[dict]) -> list[list[str]]:
    return [g["param_names"] for g in groups]


def forward(model: nn.Module) -> torch.Tensor:
    x = model["embed"](torch.arange(6).reshape(2, 3))
    for block in model["blocks"]:
        x = block(x)
    return model["head"](model["norm"](x)).square().mean()


# ----------------------------------------------------------------------------- param_groups


def test_first_matching_rule_decides_and_the_rest_take_the_defaults() -> None:
    """A parameter goes to the first rule that selects it; the others share a last group."""
    ms = ModelState.new(net())
    groups = ms.param_groups(
        {"**.bias": {"weight_decay": 0.0}, "blocks.0.**": {"lr": 0.1}}, lr=1.0, weight_decay=0.5
    )
    assert sorted(groups[0]) == ["lr", "param_names", "params", "weight_decay"]
    bias, block0, rest = groups
    assert bias["param_names"] == [k for k in ms.parameters() if k.endswith("bias")]
    assert block0["param_names"] == ["blocks.0.0.weight", "blocks.0.1.weight"]
    assert (bias["lr"], bias["weight_decay"]) == (1.0, 0.0)
    assert (block0["lr"], block0["weight_decay"]) == (0.1, 0.5)
    assert (rest["lr"], rest["weight_decay"]) == (1.0, 0.5)
    flat = [k for g in groups for k in g["param_names"]]
    assert sorted(flat) == sorted(ms.parameters())
    for g in groups:
        assert [id(p) for p in g["params"]] == [id(ms.parameters()[k]) for k in g["param_names"]]


def test_rules_as_a_list_of_pairs_keep_their_order_and_accept_any_mask() -> None:
    """Pairs allow unhashable masks (lists) and callables; groups follow rule order."""
    ms = ModelState.new(net())
    rules = [
        (lambda path: path[0] == "head", {"lr": 0.3}),
        (["embed.weight", re.compile(r"norm\..*")], {"lr": 0.2}),
    ]
    head, other, rest = ms.param_groups(rules)
    assert head["param_names"] == ["head.weight", "head.bias"]
    assert other["param_names"] == ["embed.weight", "norm.scale"]
    assert "lr" not in rest


def test_empty_groups_are_left_out() -> None:
    """A rule that selects nothing (or only what an earlier rule took) makes no group."""
    ms = ModelState.new(net())
    groups = ms.param_groups([("**", {"lr": 0.1}), ("head.**", {"lr": 0.2})])
    assert len(groups) == 1 and groups[0]["lr"] == 0.1
    assert (
        ms.param_groups(re.compile("nothing") and [(re.compile("x^"), {"lr": 1.0})])[0].get("lr")
        is None
    )


def test_only_trainable_parameters_are_grouped() -> None:
    """Frozen parameters are in no group; a rule over only frozen ones makes no group."""
    ms = ModelState.new(net()).freeze("blocks.**")
    groups = ms.param_groups({"blocks.**": {"lr": 0.1}})
    assert len(groups) == 1
    assert not any(k.startswith("blocks") for k in groups[0]["param_names"])
    assert sorted(groups[0]["param_names"]) == sorted(ms.trainable_parameters())


def test_a_tied_tensor_is_grouped_once_and_a_rule_on_its_destination_moves_it() -> None:
    """Hugging Face style tied embeddings: one tensor, one group, by either key."""
    model = net()
    model["head"].weight = model["embed"].weight
    ms = ModelState.new(model)
    assert ms.ties() == {"head.weight": "embed.weight"}
    (rest,) = ms.param_groups()
    assert rest["param_names"].count("embed.weight") == 1
    assert "head.weight" not in rest["param_names"]
    head, rest = ms.param_groups({"head.**": {"lr": 0.1}})
    assert head["param_names"] == ["embed.weight", "head.bias"]
    assert len({id(p) for g in (head, rest) for p in g["params"]}) == len(ms.parameters())


def test_a_mask_string_that_matches_no_key_is_a_key_error_unless_not_strict() -> None:
    """A typo in a rule is caught with a did-you-mean; strict=False allows it."""
    ms = ModelState.new(net())
    with pytest.raises(KeyError, match=r"'head\.wieght'.*\n.*did you mean: head\.weight"):
        ms.param_groups({"head.wieght": {"lr": 0.1}})
    with pytest.raises(KeyError, match=r"blocks\.9"):
        ms.param_groups([(["head.weight", "blocks.9.**"], {"lr": 0.1})])
    groups = ms.param_groups({"head.wieght": {"lr": 0.1}}, strict=False)
    assert len(groups) == 1 and "lr" not in groups[0]
    assert len(ms.param_groups({re.compile("nothing"): {"lr": 0.1}})) == 1


def test_malformed_rules_are_refused_with_the_fix() -> None:
    """Options must be dicts without params/param_names; rules must be pairs."""
    ms = ModelState.new(net())
    with pytest.raises(TypeError, match="must be a dict of optimizer options"):
        ms.param_groups({"head.**": 0.1})
    with pytest.raises(ValueError, match="`params` is set from the mask"):
        ms.param_groups({"head.**": {"params": []}})
    with pytest.raises(ValueError, match="`param_names` is set from the mask"):
        ms.param_groups(param_names=["x"])
    with pytest.raises(TypeError, match=r"rule 0 of `rules` must be a \(mask, options\) pair"):
        ms.param_groups(["head.**"])
    with pytest.raises(TypeError, match="`rules` must map masks"):
        ms.param_groups("head.**")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="A mask must be"):
        ms.param_groups([(3, {"lr": 0.1})])


@pytest.mark.parametrize("kind", OPTIMIZERS, ids=lambda k: k.__name__)
def test_every_torch_optimizer_takes_the_groups_and_steps(kind: type) -> None:
    """The groups (with param_names) build and step each torch.optim optimizer."""
    model = net()
    ms = ModelState.new(model)
    groups = ms.param_groups({optim.no_decay(model): {"weight_decay": 0.0}}, weight_decay=0.01)
    opt = kind(groups, lr=0.01)
    before = {k: t.detach().clone() for k, t in ms.parameters().items()}
    forward(model).backward()
    opt.step()
    moved = [k for k, t in ms.parameters().items() if not torch.equal(t, before[k])]
    assert sorted(moved) == sorted(ms.parameters())
    saved = opt.state_dict()["param_groups"]
    assert [g["param_names"] for g in saved] == names(groups)
    assert [g["weight_decay"] for g in saved] == [0.0, 0.01]


# ----------------------------------------------------------------------------- recipes


def test_no_decay_finds_biases_and_norms_by_module_type() -> None:
    """LayerNorm weights, a custom *Norm class and every bias; not Linear/Embedding weights."""
    model = net()
    mask = optim.no_decay(model)
    keys = [k for k in ModelState.new(model).parameters() if mask(k)]
    assert keys == [
        "blocks.0.0.bias", "blocks.0.1.weight", "blocks.0.1.bias",
        "blocks.1.0.bias", "blocks.1.1.weight", "blocks.1.1.bias",
        "blocks.2.0.bias", "blocks.2.1.weight", "blocks.2.1.bias",
        "norm.scale", "head.bias",
    ]  # fmt: skip
    only_norms = optim.no_decay(model, biases=False)
    assert not only_norms("head.bias") and only_norms("norm.scale")
    bn = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    assert [k for k in ModelState.new(bn).parameters() if optim.no_decay(bn)(k)] == [
        "0.bias",
        "1.weight",
        "1.bias",
    ]


def test_no_decay_on_a_dict_state_needs_norms_off() -> None:
    """A dict has no module types: biases only, said clearly otherwise."""
    ms = ModelState.new({"a": {"weight": torch.ones(2), "bias": torch.ones(2)}})
    with pytest.raises(ValueError, match="norms=False"):
        optim.no_decay(ms)
    assert optim.no_decay(ms, norms=False)("a.bias")


def test_layerwise_lr_decays_from_the_top_layer_down() -> None:
    """Layer i of n gets lr * decay ** (n - 1 - i); others keep the defaults."""
    model = net()
    ms = ModelState.new(model)
    rules = optim.layerwise_lr(model, "blocks.*", lr=1.0, decay=0.5, options={"eps": 1e-6})
    groups = ms.param_groups(rules, lr=2.0)
    assert [(g["param_names"][0], g["lr"]) for g in groups] == [
        ("blocks.0.0.weight", 0.25),
        ("blocks.1.0.weight", 0.5),
        ("blocks.2.0.weight", 1.0),
        ("embed.weight", 2.0),
    ]
    assert groups[0]["eps"] == 1e-6 and "eps" not in groups[-1]
    torch.optim.AdamW(groups).step()
    with pytest.raises(KeyError, match="matches no module"):
        optim.layerwise_lr(model, "layers.*", lr=1.0, decay=0.5)


# ----------------------------------------------------------------------------- live optimizers


def test_add_param_group_adds_by_identity_once() -> None:
    """What the optimizer holds is skipped; a second call adds nothing, no empty group."""
    model = net()
    ms = ModelState.new(model)
    params = ms.parameters()
    opt = torch.optim.SGD([params["head.weight"]], lr=0.1, momentum=0.9)
    same_values = {"head.weight": params["head.weight"].detach().clone()}
    group = optim.add_param_group(opt, {**params, "copy": same_values["head.weight"]}, {})
    assert group is opt.param_groups[1]
    assert group["lr"] == 0.1 and group["momentum"] == 0.9  # the optimizer's defaults
    assert len(group["params"]) == len(params)  # the value-equal copy is a new tensor
    assert optim.add_param_group(opt, params, {"lr": 1.0}) is None
    assert len(opt.param_groups) == 2
    assert "param_names" not in group


def test_add_param_group_names_the_group_when_the_optimizer_names_its_groups() -> None:
    """An optimizer built from param_groups gets a named group; torch refuses a mix."""
    model = net()
    ms = ModelState.new(model).freeze("blocks.**")
    opt = torch.optim.AdamW(ms.param_groups(), lr=0.1)
    ms.unfreeze("blocks.**")
    blocks = {k: t for k, t in ms.parameters().items() if k.startswith("blocks")}
    group = optim.add_param_group(opt, blocks, {"lr": 0.01})
    assert group is not None and group["param_names"] == list(blocks)
    assert opt.state_dict()["param_groups"][1]["param_names"] == list(blocks)


def test_check_optimizer_refuses_typos_and_non_optimizers_before_anything_changes() -> None:
    """Unknown options get a did-you-mean; scheduler keys on existing groups are allowed."""
    model = net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    with pytest.raises(
        TypeError, match=r"`weight_decy` is not an option(.|\n)*did you mean: weight_decay"
    ):
        optim.check_optimizer(opt, {"weight_decy": 0.0})
    with pytest.raises(TypeError, match=r"must be a torch\.optim\.Optimizer"):
        optim.check_optimizer(model, {})
    with pytest.raises(ValueError, match="`params` is set from the mask"):
        optim.check_optimizer(opt, {"params": []})
    optim.check_optimizer(opt, {"lr": 0.01, "betas": (0.9, 0.95)})
    torch.optim.lr_scheduler.StepLR(opt, 1)
    optim.check_optimizer(opt, {"initial_lr": 0.01})
    assert len(opt.param_groups) == 1


def test_unfreeze_with_an_optimizer_adds_one_group_once() -> None:
    """Gradual unfreezing: one new group with the given options, nothing on a repeat."""
    model = net()
    ms = ModelState.new(model).freeze("blocks.**")
    opt = torch.optim.SGD(ms.trainable_parameters().values(), lr=0.1, momentum=0.9)
    ms.unfreeze("blocks.0.**", optimizer=opt, lr=0.01)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1]["lr"] == 0.01 and opt.param_groups[1]["momentum"] == 0.9
    held = list(opt.param_groups[1]["params"])
    assert held == [t for k, t in ms.parameters().items() if k.startswith("blocks.0.")]
    assert "param_names" not in opt.param_groups[1]  # the optimizer's groups have none
    ms.unfreeze("blocks.0.**", optimizer=opt, lr=0.5)
    ms.unfreeze("head.**", optimizer=opt)  # trainable and held already
    assert len(opt.param_groups) == 2
    ms.unfreeze("blocks.**", optimizer=opt)  # only blocks 1 and 2 are new
    assert len(opt.param_groups[2]["params"]) == 8 and opt.param_groups[2]["lr"] == 0.1
    forward(model).backward()
    opt.step()


def test_unfreeze_into_named_groups_keeps_param_names_and_adds_a_tied_tensor_once() -> None:
    """An optimizer from param_groups gets a named group; a tie named twice is added once."""
    model = net()
    model["head"].weight = model["embed"].weight
    ms = ModelState.new(model).freeze("embed.**")
    opt = torch.optim.AdamW(ms.param_groups(), lr=0.1)
    assert "embed.weight" not in opt.param_groups[0]["param_names"]
    ms.unfreeze(["embed.**", "head.weight"], optimizer=opt, weight_decay=0.0)
    new = opt.param_groups[1]
    assert new["param_names"] == ["embed.weight"] and new["weight_decay"] == 0.0
    assert opt.state_dict()["param_groups"][1]["param_names"] == ["embed.weight"]


def test_unfreeze_with_a_bad_option_changes_nothing() -> None:
    """A typo in the group options is refused before anything is thawed."""
    model = net()
    ms = ModelState.new(model).freeze("blocks.**")
    opt = torch.optim.AdamW(ms.trainable_parameters().values(), lr=0.1)
    frozen = set(ms.frozen_parameters())
    with pytest.raises(TypeError, match="`lrr` is not an option of AdamW"):
        ms.unfreeze("blocks.0.**", optimizer=opt, lrr=0.01)
    with pytest.raises(TypeError, match=r"must be a torch\.optim\.Optimizer"):
        ms.unfreeze("blocks.0.**", optimizer=model)  # type: ignore[arg-type]
    assert set(ms.frozen_parameters()) == frozen
    assert len(opt.param_groups) == 1


# ----------------------------------------------------------------------------- schedulers


def test_lambda_lr_breaks_after_add_param_group_in_torch_itself() -> None:
    """The documented limitation: LambdaLR keeps one lambda per group it was built with."""
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([a], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
    opt.step()
    sched.step()
    optim.add_param_group(opt, {"b": b}, {"lr": 0.1})
    opt.step()
    with pytest.raises(ValueError, match="zip"):
        sched.step()


def test_rebuilding_lambda_lr_after_unfreezing_continues_the_schedule() -> None:
    """The pattern in the README: give the new group `initial_lr`, rebuild at last_epoch - 1."""
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([a], lr=1.0)

    def fn(epoch: int) -> float:
        return 0.5**epoch

    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.125
    optim.add_param_group(opt, {"b": b}, {"lr": 0.1, "initial_lr": 0.1})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn, last_epoch=sched.last_epoch - 1)
    assert [g["lr"] for g in opt.param_groups] == [0.125, 0.1 * 0.125]
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0625, 0.1 * 0.0625]


def test_public_names() -> None:
    """The optimizer functions are on the package."""
    assert tms.save_optimizer is optim.save_optimizer
    assert tms.load_optimizer is optim.load_optimizer
    assert {"optim", "save_optimizer", "load_optimizer"} <= set(tms.__all__)


KEYS = list(ModelState.new(net()).parameters())
GLOBS = ["**.bias", "blocks.*.0.**", "blocks.1.**", "embed.**", "head.weight", "norm.**"]


@settings(max_examples=60, deadline=None)
@given(
    frozen=st.sets(st.sampled_from(KEYS)),
    rules=st.lists(st.sampled_from(GLOBS), max_size=4),
)
def test_groups_partition_the_trainable_parameters_by_first_match(
    frozen: set[str], rules: list[str]
) -> None:
    """Every trainable parameter is in exactly one group: that of the first rule naming it."""
    model = net()
    ms = ModelState.new(model)
    if frozen:
        ms.freeze(sorted(frozen))
    groups = ms.param_groups([(g, {"lr": float(i)}) for i, g in enumerate(rules)])
    flat = [k for g in groups for k in g["param_names"]]
    assert sorted(flat) == sorted(ms.trainable_parameters())
    assert len(flat) == len(set(flat)) and all(g["params"] for g in groups)
    for group in groups:
        for key in group["param_names"]:
            first = next((i for i, g in enumerate(rules) if compile_mask(g)(key)), None)
            assert group.get("lr") == (None if first is None else float(first)), key
