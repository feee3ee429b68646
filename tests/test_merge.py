"""merge: named merge functions against hand computation, key handling, errors, atomicity."""

from __future__ import annotations

import pytest
import torch
from strategies import assert_unchanged, snapshot
from torch import nn

from torch_modelstate import ModelState, merges


def pair() -> tuple[nn.Sequential, nn.Sequential]:
    """Two models of one architecture with different values and BN counters (2 and 5)."""
    torch.manual_seed(0)

    def make() -> nn.Sequential:
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

    lhs, rhs = make(), make()
    for model, steps in ((lhs, 2), (rhs, 5)):
        for _ in range(steps):
            model(torch.randn(8, 3))
    return lhs, rhs


def clones(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def floats(model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.dtype.is_floating_point]


@pytest.mark.parametrize(
    ("fun", "expected"),
    [
        (merges.lerp(0.25), lambda a, b: a + 0.25 * (b - a)),
        (merges.lerp(1.5), lambda a, b: a + 1.5 * (b - a)),
        (merges.ema(0.9), lambda a, b: 0.9 * a + 0.1 * b),
        (merges.add(), lambda a, b: a + b),
        (merges.add(0.5), lambda a, b: a + 0.5 * b),
        (merges.sub(), lambda a, b: a - b),
        (merges.sub(2.0), lambda a, b: a - 2.0 * b),
        (merges.replace(), lambda a, b: b),
    ],
    ids=["lerp", "extrapolate", "ema", "add", "add-scaled", "sub", "sub-scaled", "replace"],
)
def test_named_merges_match_hand_computation(fun, expected):
    """Every named merge gives, for each float tensor, its formula computed by hand."""
    lhs, rhs = pair()
    a, b = clones(lhs), clones(rhs)
    ModelState.new(lhs).merge(rhs, fun)
    for key in floats(lhs):
        assert torch.allclose(lhs.state_dict()[key], expected(a[key], b[key]), atol=1e-6), key


def test_merge_writes_in_place(mlp):
    """Merged values land in the existing tensors: identity and addresses are kept."""
    before = {k: (t, t.data_ptr()) for k, t in mlp.state_dict(keep_vars=True).items()}
    rhs = {k: torch.ones_like(v) for k, v in mlp.state_dict().items()}
    ModelState.new(mlp).merge(rhs, merges.lerp(0.5))
    for key, t in mlp.state_dict(keep_vars=True).items():
        assert t is before[key][0]
        assert t.data_ptr() == before[key][1]
    assert mlp[0].weight.requires_grad


def test_merge_returns_the_same_state(mlp):
    """`merge` returns the ModelState itself."""
    ms = ModelState.new(mlp)
    assert ms.merge({}, merges.lerp(0.5)) is ms


def test_integer_state_takes_the_rhs_value():
    """`num_batches_tracked` is copied from rhs, never interpolated."""
    lhs, rhs = pair()
    ModelState.new(lhs).merge(rhs, merges.lerp(0.5))
    assert lhs[1].num_batches_tracked.item() == 5
    assert lhs[1].num_batches_tracked.dtype == torch.long


def test_integer_state_with_nonfloat_lhs_keeps_its_value():
    """With `nonfloat="lhs"` integer tensors keep the lhs value."""
    lhs, rhs = pair()
    ModelState.new(lhs).merge(rhs, merges.lerp(0.5, nonfloat="lhs"))
    assert lhs[1].num_batches_tracked.item() == 2


def test_integer_state_is_not_added():
    """`add` copies integer tensors from rhs rather than summing counters."""
    lhs, rhs = pair()
    ModelState.new(lhs).merge(rhs, merges.add())
    assert lhs[1].num_batches_tracked.item() == 5


def test_named_merges_called_directly_work_per_tensor():
    """A named merge is also a plain `fun(path, lhs, rhs)` returning a new tensor."""
    a, b = torch.zeros(2), torch.ones(2)
    assert torch.equal(merges.lerp(0.25)(["w"], a, b), torch.full((2,), 0.25))
    assert torch.equal(merges.ema(0.75)(["w"], a, b), torch.full((2,), 0.25))
    assert torch.equal(merges.lerp(0.5)(["n"], torch.tensor(2), torch.tensor(5)), torch.tensor(5))
    assert torch.equal(a, torch.zeros(2))


def test_keys_only_in_lhs_are_kept():
    """Keys that rhs lacks keep their lhs values."""
    lhs, _ = pair()
    before = clones(lhs)
    ModelState.new(lhs).merge({"2.bias": torch.ones(2)}, merges.replace())
    assert torch.equal(lhs[2].bias, torch.ones(2))
    for key, value in before.items():
        if key != "2.bias":
            assert torch.equal(lhs.state_dict()[key], value), key


def test_keys_only_in_rhs_are_ignored():
    """Extra keys in rhs are no error and change nothing."""
    ms = ModelState.new({"w": torch.zeros(2)})
    ms.merge(
        {"w": torch.ones(2), "extra": torch.ones(3), "deep.er": torch.ones(1)}, merges.replace()
    )
    assert list(ms.to_dict()) == ["w"]
    assert torch.equal(ms.to_dict()["w"], torch.ones(2))


def test_merge_does_not_change_rhs():
    """rhs is read, not written."""
    lhs, rhs = pair()
    snap = snapshot(rhs)
    ModelState.new(lhs).merge(rhs, merges.lerp(0.5))
    assert_unchanged(rhs, snap)


@pytest.mark.parametrize("form", ["module", "modelstate", "flat dict", "nested dict"])
def test_rhs_forms_agree(form):
    """rhs may be a module, a ModelState, a flat dict or a nested dict, with one result."""
    lhs, rhs = pair()
    expected = {
        k: torch.lerp(v, rhs.state_dict()[k], 0.5)
        for k, v in clones(lhs).items()
        if k in floats(lhs)
    }
    given = {
        "module": rhs,
        "modelstate": ModelState.new(rhs),
        "flat dict": rhs.state_dict(),
        "nested dict": {"0": {"weight": rhs[0].weight.detach(), "bias": rhs[0].bias.detach()}},
    }[form]
    ModelState.new(lhs).merge(given, merges.lerp(0.5))
    keys = ["0.weight", "0.bias"] if form == "nested dict" else list(expected)
    for key in keys:
        assert torch.allclose(lhs.state_dict()[key], expected[key]), key


def test_dict_backed_lhs():
    """A dict-backed ModelState merges into its own tensors."""
    w = torch.zeros(3)
    ModelState.new({"w": w}).merge(ModelState.new({"w": torch.full((3,), 4.0)}), merges.lerp(0.25))
    assert torch.equal(w, torch.ones(3))


def test_class_call_form():
    """`ModelState.merge(lhs, rhs, fun)` is the same as `lhs.merge(rhs, fun)`."""
    lhs = ModelState.new({"w": torch.zeros(2)})
    out = ModelState.merge(lhs, {"w": torch.ones(2)}, merges.lerp(0.5))
    assert out is lhs
    assert torch.equal(lhs.to_dict()["w"], torch.full((2,), 0.5))


@pytest.mark.parametrize(
    ("lhs_dtype", "rhs_dtype"),
    [
        (torch.float32, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float16),
        (torch.float32, torch.int64),
    ],
    ids=str,
)
def test_mixed_dtypes_lerp_in_the_lhs_dtype(lhs_dtype, rhs_dtype):
    """rhs of another dtype is cast to the lhs dtype; lhs keeps its dtype."""
    a = torch.arange(4.0).to(lhs_dtype)
    b = torch.full((4,), 8).to(rhs_dtype)
    expected = torch.lerp(a.double(), b.double(), 0.25)
    lhs = ModelState.new({"w": a, "v": torch.zeros(1)})
    lhs.merge({"w": b, "v": torch.ones(1)}, merges.lerp(0.25))
    assert a.dtype == lhs_dtype
    assert torch.allclose(a.double(), expected, atol=0.05)


def test_mixed_dtypes_in_one_model():
    """A model holding several dtypes merges each tensor in its own dtype."""
    lhs = ModelState.new(
        {
            "a": torch.zeros(2, dtype=torch.bfloat16),
            "b": torch.zeros(2, dtype=torch.float64),
            "n": torch.tensor(1),
        }
    )
    rhs = {"a": torch.ones(2), "b": torch.ones(2, dtype=torch.float16), "n": torch.tensor(9)}
    lhs.merge(rhs, merges.lerp(0.5))
    out = lhs.to_dict()
    assert out["a"].dtype == torch.bfloat16 and torch.equal(out["a"].float(), torch.full((2,), 0.5))
    assert out["b"].dtype == torch.float64 and torch.equal(
        out["b"], torch.full((2,), 0.5, dtype=torch.float64)
    )
    assert out["n"].item() == 9


def test_each_tied_tensor_is_merged_once():
    """A tensor under two keys (an identity tie) is interpolated once, not twice."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    model[1].weight = model[0].weight
    with torch.no_grad():
        model[0].weight.zero_()
    rhs = {"0.weight": torch.ones(2, 2), "1.weight": torch.ones(2, 2)}
    ModelState.new(model).merge(rhs, merges.lerp(0.5))
    assert torch.equal(model[0].weight, torch.full((2, 2), 0.5))


def test_merge_with_rhs_aliasing_other_lhs_tensors():
    """A rhs whose tensors are other lhs tensors merges the values as they were at the call."""
    a, b = torch.zeros(2), torch.ones(2)
    ModelState.new({"a": a, "b": b}).merge({"a": b, "b": a}, merges.lerp(0.5))
    assert torch.equal(a, torch.full((2,), 0.5))
    assert torch.equal(b, torch.full((2,), 0.5))


# --------------------------------------------------------------------------- custom functions


def test_custom_function_receives_list_paths_and_both_tensors():
    """`fun` gets the path as a list of strings, the lhs tensor and the rhs tensor."""
    a, b = torch.zeros(2), torch.ones(2)
    seen = []

    def fun(path, lhs, rhs):
        seen.append((path, lhs, rhs))
        return lhs + rhs

    ModelState.new({"enc": {"0": {"w": a}}}).merge({"enc.0.w": b}, fun)
    ((path, lhs, rhs),) = seen
    assert path == ["enc", "0", "w"]
    assert type(path) is list
    assert lhs is a
    assert rhs is b


def test_custom_function_result_is_written_in_place():
    """The value `fun` returns is copied into the existing lhs tensor."""
    w = torch.zeros(2)
    ModelState.new({"w": w}).merge({"w": torch.ones(2)}, lambda p, a, b: torch.maximum(a, b) * 3)
    assert torch.equal(w, torch.full((2,), 3.0))


def test_custom_function_returning_rhs_that_aliases_lhs():
    """`fun` returning its rhs argument (an lhs tensor of another key) swaps correctly."""
    a, b = torch.zeros(2), torch.ones(2)
    ModelState.new({"a": a, "b": b}).merge({"a": b, "b": a}, lambda p, x, y: y)
    assert torch.equal(a, torch.ones(2))
    assert torch.equal(b, torch.zeros(2))


def test_custom_function_called_once_per_shared_key():
    """`fun` runs once for each key in both, and not for keys in only one side."""
    calls = []
    lhs = ModelState.new({"a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(1)})
    lhs.merge(
        {"c": torch.ones(1), "a": torch.ones(1), "z": torch.ones(1)},
        lambda p, x, y: calls.append(p) or y,
    )
    assert calls == [["a"], ["c"]]


def test_custom_function_raising_half_way_leaves_lhs_unchanged():
    """If `fun` raises on a later key, no earlier result has been written."""
    lhs, rhs = pair()
    snap = snapshot(lhs)

    def fun(path, a, b):
        if path == ["2", "weight"]:
            raise RuntimeError("boom")
        return b

    with pytest.raises(RuntimeError, match="boom"):
        ModelState.new(lhs).merge(rhs, fun)
    assert_unchanged(lhs, snap)


def test_custom_function_returning_a_wrong_shape_is_a_value_error():
    """A result of another shape is a ValueError, and nothing is written."""
    lhs, rhs = pair()
    snap = snapshot(lhs)
    with pytest.raises(ValueError, match=r"`2.bias`\n  expected: \(2,\)\n  got: \(3,\)"):
        ModelState.new(lhs).merge(rhs, lambda p, a, b: torch.zeros(3) if p == ["2", "bias"] else b)
    assert_unchanged(lhs, snap)


def test_custom_function_returning_a_non_tensor_is_a_type_error():
    """A result that is not a tensor is a TypeError, and nothing is written."""
    lhs, rhs = pair()
    snap = snapshot(lhs)
    with pytest.raises(TypeError, match="must return a tensor"):
        ModelState.new(lhs).merge(rhs, lambda p, a, b: 1.0 if p == ["2", "bias"] else b)
    assert_unchanged(lhs, snap)


def test_fun_that_is_not_callable_is_a_type_error(mlp):
    """`fun` must be callable."""
    with pytest.raises(TypeError, match="must be callable"):
        ModelState.new(mlp).merge(mlp, "lerp")


def test_rhs_of_a_bad_type_is_a_type_error(mlp):
    """rhs must be a module, a dict or a ModelState."""
    with pytest.raises(TypeError, match=r"takes an nn.Module, a dict of tensors or a ModelState"):
        ModelState.new(mlp).merge([1, 2], merges.lerp(0.5))


# --------------------------------------------------------------------------- shapes first


@pytest.mark.parametrize("fun", [merges.lerp(0.5), merges.replace()], ids=repr)
def test_shape_mismatch_is_a_value_error_and_writes_nothing(fun):
    """A shape mismatch in the last key is found before any tensor is written."""
    lhs, rhs = pair()
    snap = snapshot(lhs)
    bad = {**rhs.state_dict(), "2.bias": torch.zeros(7)}
    with pytest.raises(ValueError, match=r"shape mismatch for `2.bias`"):
        ModelState.new(lhs).merge(bad, fun)
    assert_unchanged(lhs, snap)


def test_shapes_are_checked_before_fun_runs():
    """With a custom `fun`, a shape mismatch is reported before `fun` is called at all."""
    lhs, rhs = pair()
    calls = []
    bad = {**rhs.state_dict(), "2.bias": torch.zeros(7)}
    with pytest.raises(ValueError, match="expected \\(lhs\\): \\(2,\\)\n  got \\(rhs\\): \\(7,\\)"):
        ModelState.new(lhs).merge(bad, lambda p, a, b: calls.append(p) or b)
    assert calls == []


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: merges.ema(1.5), ValueError, "must lie in"),
        (lambda: merges.lerp(float("nan")), ValueError, "must be finite"),
        (lambda: merges.lerp("0.5"), TypeError, "real number"),
        (lambda: merges.add(True), TypeError, "real number"),
        (lambda: merges.lerp(0.5, nonfloat="mean"), ValueError, "nonfloat"),
    ],
    ids=["ema decay", "nan", "str", "bool", "nonfloat"],
)
def test_bad_merge_arguments(make, error, match):
    """Named merges check their arguments when made."""
    with pytest.raises(error, match=match):
        make()
