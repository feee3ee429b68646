"""Laws over random module trees and random masks (hypothesis).

Trees mix ModuleList / Sequential / ModuleDict over Linear, BatchNorm1d and custom modules with
persistent, non-persistent and integer buffers; masks mix every accepted form. Each law is
checked against a model written here (a reference glob matcher, a reference frozen set).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import (
    assert_unchanged,
    build_mask,
    build_model,
    globs,
    leaf_keys,
    mask_specs,
    model_specs,
    reference_glob,
    reference_select,
    snapshot,
)

import torch_modelstate as tms
from torch_modelstate import ModelState, merges


def frozen_keys(ms: ModelState) -> set[str]:
    return set(ms.frozen_parameters()) | set(ms.frozen_state())


def random_values(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A random value of the right shape and dtype for every key."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in model.state_dict().items():
        if t.dtype.is_floating_point:
            out[key] = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        else:
            out[key] = torch.randint(0, 100, t.shape, generator=gen, dtype=t.dtype)
    return out


# --------------------------------------------------------------------------- masks


def test_reference_glob_agrees_with_the_documented_examples():
    """The reference matcher itself follows DESIGN.md's examples (a check of the checker)."""
    assert reference_glob("norm.**", "norm.weight")
    assert reference_glob("**.bias", "a.b.bias")
    assert reference_glob("**.bias", "bias")
    assert reference_glob("blocks.*.attn.**", "blocks.3.attn.q.weight")
    assert not reference_glob("blocks.*.attn.**", "blocks.3.mlp.weight")
    assert reference_glob("dense_?", "dense_1")
    assert not reference_glob("dense_?", "dense_10")
    assert not reference_glob("*", "a.b")


@given(spec=model_specs(), data=st.data())
def test_freeze_selects_what_the_reference_selects(spec, data):
    """`freeze(mask)` freezes exactly the leaves the reference evaluation of the mask picks."""
    model = build_model(spec)
    keys = leaf_keys(model)
    mask = data.draw(mask_specs(keys), label="mask")
    ms = ModelState.new(model).freeze(build_mask(mask), strict=False)
    assert frozen_keys(ms) == {k for k in keys if reference_select(mask, k)}


def spec_strings(spec: Any) -> list[str]:
    """Every glob string written anywhere in a mask spec (regexes and callables left out)."""
    kind = spec[0]
    if kind == "glob":
        return [spec[1]]
    if kind in ("list", "tuple", "any", "all"):
        return [s for part in spec[1] for s in spec_strings(part)]
    if kind in ("not", "invert"):
        return spec_strings(spec[1])
    if kind in ("or", "and"):
        return spec_strings(spec[1]) + spec_strings(spec[2])
    return []


@given(spec=model_specs(), data=st.data())
def test_strict_freeze_refuses_exactly_the_strings_that_match_nothing(spec, data):
    """Strict freeze raises a KeyError iff some glob in the mask matches no key, and then
    changes nothing; otherwise it selects what strict=False selects."""
    model = build_model(spec)
    keys = leaf_keys(model)
    mask = data.draw(mask_specs(keys), label="mask")
    dead = [g for g in spec_strings(mask) if not any(reference_glob(g, k) for k in keys)]
    ms = ModelState.new(model)
    if dead:
        with pytest.raises(KeyError, match="matches no key"):
            ms.freeze(build_mask(mask))
        assert frozen_keys(ms) == set()
    else:
        ms.freeze(build_mask(mask))
        assert frozen_keys(ms) == {k for k in keys if reference_select(mask, k)}


@given(spec=model_specs(), data=st.data())
def test_compiled_mask_called_per_path_agrees_with_the_reference(spec, data):
    """A compiled Mask called on one path decides as the reference does."""
    keys = leaf_keys(build_model(spec))
    mask = data.draw(mask_specs(keys), label="mask")
    compiled = tms.any_of(build_mask(mask))
    for key in keys:
        assert compiled(key.split(".")) == reference_select(mask, key), key


@given(
    keys=st.lists(st.from_regex(r"[a-z0-9_]{1,3}(\.[a-z0-9_]{1,3}){0,3}", fullmatch=True)),
    data=st.data(),
)
def test_globs_agree_with_the_reference_on_arbitrary_keys(keys, data):
    """Random globs decide random keys as the reference matcher does."""
    glob = data.draw(globs(keys), label="glob")
    compiled = tms.any_of(glob)
    for key in keys:
        assert compiled(key) == reference_glob(glob, key), key


# --------------------------------------------------------------------------- partitions


@given(spec=model_specs(), data=st.data())
def test_parameters_partition_into_trainable_and_frozen(spec, data):
    """For any mask, trainable | frozen = parameters and trainable & frozen is empty."""
    model = build_model(spec)
    mask = build_mask(data.draw(mask_specs(leaf_keys(model))))
    ms = ModelState.new(model).freeze(mask, strict=False)
    trainable, frozen = set(ms.trainable_parameters()), set(ms.frozen_parameters())
    assert trainable | frozen == set(ms.parameters())
    assert not trainable & frozen


@given(spec=model_specs(), data=st.data())
def test_state_partitions_into_trainable_and_frozen(spec, data):
    """For any mask, trainable | frozen = state and trainable & frozen is empty."""
    model = build_model(spec)
    mask = build_mask(data.draw(mask_specs(leaf_keys(model))))
    ms = ModelState.new(model).freeze(mask, strict=False)
    trainable, frozen = set(ms.trainable_state()), set(ms.frozen_state())
    assert trainable | frozen == set(ms.state())
    assert not trainable & frozen


@given(spec=model_specs())
def test_parameters_and_state_partition_the_state_dict(spec):
    """Parameters and state are disjoint, in module order, and together are state_dict()."""
    model = build_model(spec)
    ms = ModelState.new(model)
    keys = leaf_keys(model)
    assert list(ms.to_dict()) == keys
    params, state = list(ms.parameters()), list(ms.state())
    assert params == [k for k in keys if k in set(params)]
    assert state == [k for k in keys if k in set(state)]
    assert set(params) == {name for name, _ in model.named_parameters()}
    assert set(params) | set(state) == set(keys)
    assert not set(params) & set(state)


# --------------------------------------------------------------------------- freeze algebra


@given(spec=model_specs(), data=st.data(), dict_backed=st.booleans())
def test_freeze_unfreeze_follow_a_reference_set(spec, data, dict_backed):
    """freeze adds the selected keys, unfreeze removes them, in any sequence."""
    model = build_model(spec)
    keys = leaf_keys(model)
    ms = ModelState.new(model.state_dict() if dict_backed else model)
    ops = data.draw(
        st.lists(st.tuples(st.sampled_from(["freeze", "unfreeze"]), mask_specs(keys)), max_size=4),
        label="ops",
    )
    expected: set[str] = set()
    for op, mask in ops:
        chosen = {k for k in keys if reference_select(mask, k)}
        getattr(ms, op)(build_mask(mask), strict=False)
        expected = expected | chosen if op == "freeze" else expected - chosen
        assert frozen_keys(ms) == expected
    if not dict_backed:
        for name, param in model.named_parameters():
            assert param.requires_grad == (name not in expected), name


# --------------------------------------------------------------------------- paths


@given(spec=model_specs())
def test_every_key_round_trips_through_a_path(spec):
    """`to_key(to_path(k)) == k` and `to_path(to_key(p)) == p` for every key of any tree."""
    for key in leaf_keys(build_model(spec)):
        path = tms.to_path(key)
        assert tms.to_key(path) == key
        assert tms.to_path(tms.to_key(path)) == path
        assert all(isinstance(s, str) and s for s in path)


@given(spec=model_specs())
def test_state_dicts_round_trip_through_nested_form(spec):
    """`to_flat(to_nested(sd))` is sd (keys, order, tensors) and to_nested is stable."""
    sd = build_model(spec).state_dict()
    nested = tms.to_nested(sd)
    flat = tms.to_flat(nested)
    assert list(flat) == list(sd)
    assert all(flat[k] is sd[k] for k in sd)
    assert tms.to_nested(flat) == nested


# --------------------------------------------------------------------------- update


@given(spec=model_specs(), seed=st.integers(0, 2**16))
def test_update_writes_every_value_in_place(spec, seed):
    """After `update(values)`, every tensor holds its value and is the same object."""
    model = build_model(spec)
    values = random_values(model, seed)
    before = model.state_dict(keep_vars=True)
    ModelState.new(model).update(values)
    after = model.state_dict(keep_vars=True)
    for key, value in values.items():
        assert after[key] is before[key]
        assert torch.equal(after[key], value), key


@given(spec=model_specs(), data=st.data())
def test_update_is_atomic_with_a_bad_entry(spec, data):
    """A random bad entry among good ones raises, and no tensor has changed."""
    model = build_model(spec)
    keys = leaf_keys(model)
    assume(keys)
    sd = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    state_keys = [k for k in keys if k not in params]
    good = random_values(model, data.draw(st.integers(0, 2**16), label="seed"))
    first = {k: good[k] for k in data.draw(st.lists(st.sampled_from(keys), unique=True))}
    second = (
        {k: good[k] for k in data.draw(st.lists(st.sampled_from(state_keys), unique=True))}
        if state_keys
        else {}
    )
    kind = data.draw(st.sampled_from(["unknown", "shape", "type", "param in state"]), label="kind")
    key = data.draw(st.sampled_from(keys), label="key")
    if kind == "unknown":
        unknown = key + data.draw(st.sampled_from(["x", "0", ".w", "_"]))
        assume(unknown not in keys)
        bad, error = (unknown, torch.zeros(1)), KeyError
    elif kind == "shape":
        bad, error = (key, torch.zeros((*sd[key].shape, 2))), ValueError
    elif kind == "type":
        bad, error = (key, data.draw(st.sampled_from([1.0, [0.0], "w", None]))), TypeError
    else:
        assume(params)
        name = data.draw(st.sampled_from(sorted(params)))
        bad, error = (name, torch.zeros_like(sd[name])), KeyError
    into_state = kind == "param in state" or (
        key in state_keys and data.draw(st.booleans(), label="into state")
    )
    target = second if into_state else first
    target.pop(bad[0], None)
    items = list(target.items())
    items.insert(data.draw(st.integers(0, len(items)), label="position"), bad)
    target.clear()
    target.update(items)
    ms = ModelState.new(model)
    snap = snapshot(model)
    with pytest.raises(error, match=re.escape(bad[0])):
        ms.update(first, second)
    assert_unchanged(model, snap)


# --------------------------------------------------------------------------- merge


@given(spec=model_specs(), seed=st.integers(0, 2**16), t=st.floats(-1.0, 2.0))
def test_lerp_merge_matches_hand_computation(spec, seed, t):
    """lerp(t) gives lhs + t (rhs - lhs) for floats and the rhs value for integers."""
    model = build_model(spec)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rhs = random_values(model, seed)
    ModelState.new(model).merge(rhs, merges.lerp(t))
    for key, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            expected = before[key] + t * (rhs[key] - before[key])
            assert torch.allclose(value, expected, atol=1e-5), key
        else:
            assert torch.equal(value, rhs[key]), key
