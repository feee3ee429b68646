"""Atomicity of update and merge: every bad input is found before the first write.

Each case once wrote the tensors before the bad one and then raised a bare RuntimeError or
NotImplementedError from torch. Now a builtin type (KeyError, ValueError, TypeError) names the
key, and the model is byte for byte what it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from torch_modelstate import ModelState, merges
from torch_modelstate._writable import check_destinations

ERRORS = (KeyError, ValueError, TypeError)


def raw(model: nn.Module) -> dict[str, bytes]:
    """Every tensor's bytes (NaN-safe: bit patterns, not values), by state_dict key."""
    out = {}
    for key, t in model.state_dict().items():
        t = t.detach().to_dense() if t.layout != torch.strided else t.detach()
        if t.is_quantized:
            t = t.int_repr()
        t = t.resolve_conj().resolve_neg()
        out[key] = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return out


def quantized(t: Tensor) -> Tensor:
    """`t` quantized to qint8 (torch warns that quantized tensors are deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(t.float(), 0.1, 0, torch.qint8)


class Pair(nn.Module):
    """Two linears and a BatchNorm: several float keys that a write reaches before the bad one."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3)
        self.last = nn.Linear(3, 3)


def with_expanded_buffer() -> nn.Module:
    """A model whose last buffer is an expanded (stride-0) view."""
    model = Pair()
    model.last.register_buffer("table", torch.zeros(1).expand(3))
    return model


def good(model: nn.Module, fill: float = 1.0) -> dict[str, Tensor]:
    return {k: torch.full_like(v, fill) for k, v in model.state_dict().items()}


def rhs_with(model: nn.Module, key: str, bad: Tensor) -> dict[str, Tensor]:
    return {**good(model), key: bad}


META = torch.empty(3, 3, device="meta")
SPARSE = torch.eye(3).to_sparse()


# --------------------------------------------------------------------------- update


def test_update_into_an_expanded_buffer_is_refused_before_writing():
    """An expanded destination is a ValueError naming it; nothing is written."""
    model = with_expanded_buffer()
    before = raw(model)
    with pytest.raises(ValueError, match=r"(?s)`last.table`.*share one memory location"):
        ModelState.new(model).update(good(model))
    assert raw(model) == before


def test_update_with_a_sparse_value_is_refused_before_writing():
    """A sparse value is a TypeError saying to densify it; nothing is written."""
    model = Pair()
    before = raw(model)
    with pytest.raises(TypeError, match=r"(?s)`last.weight` is a torch.sparse_coo.*to_dense"):
        ModelState.new(model).update(rhs_with(model, "last.weight", SPARSE))
    assert raw(model) == before


def test_update_with_a_meta_value_is_a_type_error():
    """A value on the meta device holds no data: a TypeError; nothing is written."""
    model = Pair()
    before = raw(model)
    with pytest.raises(TypeError, match=r"`last.weight` is on the meta device"):
        ModelState.new(model).update(rhs_with(model, "last.weight", META))
    assert raw(model) == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["same", "cast"])
def test_update_of_an_inference_mode_model_is_refused_before_writing(dtype):
    """A module built under inference_mode can't be written outside it: a ValueError first."""
    with torch.inference_mode():
        model = Pair()
    before = raw(model)
    values = {k: v.to(dtype) if v.is_floating_point() else v for k, v in good(model).items()}
    with pytest.raises(ValueError, match=r"(?s)inference tensor.*torch.inference_mode"):
        ModelState.new(model).update(values)
    assert raw(model) == before
    with torch.inference_mode():
        ModelState.new(model).update(values)
    assert bool((model.first.weight == 1).all())


def test_update_with_a_quantized_value_is_refused_before_writing():
    """A quantized value for a float tensor is a TypeError saying to dequantize it."""
    model = Pair()
    before = raw(model)
    bad = quantized(torch.ones(3, 3))
    with pytest.raises(TypeError, match=r"(?s)`last.weight`.*dequantize"):
        ModelState.new(model).update(rhs_with(model, "last.weight", bad))
    assert raw(model) == before


def test_update_of_a_quantized_buffer_needs_a_float32_value():
    """torch copies into a quantized tensor only from float32: anything else is refused first."""
    model = Pair()
    q = quantized(torch.zeros(3))
    model.last.register_buffer("q", q)
    before = raw(model)
    values = {**good(model), "last.q": torch.ones(3, dtype=torch.float64)}
    with pytest.raises(TypeError, match=r"(?s)`last.q`.*torch.float32"):
        ModelState.new(model).update(values)
    assert raw(model) == before
    ModelState.new(model).update({**values, "last.q": torch.ones(3)})
    assert model.last.q.dequantize().tolist() == [1.0, 1.0, 1.0]


def test_update_into_a_sparse_buffer_is_refused_before_writing():
    """A sparse destination is a ValueError (a layout that is not written in place)."""
    model = Pair()
    values = good(model) | {"last.s": torch.ones(3, 3)}
    model.last.register_buffer("s", torch.eye(3).to_sparse())
    before = raw(model)
    with pytest.raises(ValueError, match=r"`last.s` is a torch.sparse_coo tensor"):
        ModelState.new(model).update(values)
    assert raw(model) == before


def test_update_into_non_contiguous_views_still_works():
    """A transposed or strided (non-overlapping) destination is written, not refused."""
    model = Pair()
    base = torch.zeros(3, 6)
    model.last.register_buffer("strided", base[:, ::2])
    model.last.register_buffer("transposed", torch.zeros(3, 3).t())
    values = good(model)
    ModelState.new(model).update(values)
    assert bool((model.last.strided == 1).all()) and bool((model.last.transposed == 1).all())
    assert base[:, 1::2].sum() == 0


def test_update_into_a_conjugate_view_is_refused_before_writing():
    """A lazy conjugate view as a buffer is a ValueError (torch's foreach copy refuses it)."""
    model = Pair()
    values = good(model) | {"last.c": torch.ones(3, dtype=torch.complex64)}
    model.last.register_buffer("c", torch.zeros(3, dtype=torch.complex64).conj())
    before = raw(model)
    with pytest.raises(ValueError, match=r"(?s)`last.c` is a lazy conjugate view.*resolve_conj"):
        ModelState.new(model).update(values)
    assert raw(model) == before


def test_update_with_a_nested_value_is_a_type_error():
    """A nested tensor as a value is a TypeError naming the key, not torch's RuntimeError."""
    model = Pair()
    before = raw(model)
    nested = torch.nested.nested_tensor([torch.ones(3)] * 3, layout=torch.jagged)
    with pytest.raises(TypeError, match=r"`last.weight` is a nested tensor"):
        ModelState.new(model).update(rhs_with(model, "last.weight", nested))
    assert raw(model) == before


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize(
    "result",
    [
        lambda lhs: torch.empty_like(lhs, device="meta"),
        lambda lhs: torch.ones_like(lhs).to_sparse(),
        lambda lhs: torch.ones_like(lhs, dtype=torch.complex64),
        lambda lhs: torch.ones(7),
        lambda lhs: torch.nested.nested_tensor(list(torch.ones_like(lhs)), layout=torch.jagged),
    ],
    ids=["meta", "sparse", "complex", "shape", "nested"],
)
def test_merge_function_returning_a_bad_value_writes_nothing(result):
    """`fun`'s results are all checked before the first write (ValueError/TypeError)."""
    model = Pair()
    before = raw(model)

    def fun(path: list[str], lhs: Tensor, rhs: Tensor) -> Tensor:
        return result(lhs) if path == ["last", "weight"] else rhs.clone()

    with pytest.raises((ValueError, TypeError), match=r"`last.weight`"):
        ModelState.new(model).merge(good(model), fun)
    assert raw(model) == before


@pytest.mark.parametrize("merge", [merges.replace(), merges.lerp(0.5), merges.add()], ids=repr)
@pytest.mark.parametrize("bad", [META, SPARSE], ids=["meta", "sparse"])
def test_named_merge_with_a_meta_or_sparse_rhs_writes_nothing(merge, bad):
    """A meta or sparse right-hand side is a TypeError before any kernel runs."""
    model = Pair()
    before = raw(model)
    with pytest.raises(TypeError, match=r"`last.weight`"):
        ModelState.new(model).merge(rhs_with(model, "last.weight", bad), merge)
    assert raw(model) == before


@pytest.mark.parametrize("merge", [merges.replace(), merges.lerp(0.5)], ids=repr)
def test_named_merge_with_a_complex_rhs_into_a_real_model_is_refused(merge):
    """A complex rhs would lose its imaginary part in silence: a TypeError."""
    model = Pair()
    before = raw(model)
    bad = torch.ones(3, 3, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"complex"):
        ModelState.new(model).merge(rhs_with(model, "last.weight", bad), merge)
    assert raw(model) == before


def test_lerp_into_an_expanded_buffer_writes_nothing():
    """lerp into an expanded destination is a ValueError before the first write."""
    model = with_expanded_buffer()
    before = raw(model)
    with pytest.raises(ValueError, match=r"`last.table`"):
        ModelState.new(model).merge(good(model), merges.lerp(0.5))
    assert raw(model) == before


def test_merge_into_an_inference_mode_model_is_refused_before_writing():
    """Merging into inference tensors outside inference mode is a ValueError first."""
    with torch.inference_mode():
        model = Pair()
    before = raw(model)
    for fun in (merges.lerp(0.5), lambda p, a, b: b.clone()):
        with pytest.raises(ValueError, match="inference"):
            ModelState.new(model).merge(good(model), fun)
    assert raw(model) == before


def test_arithmetic_merge_into_float8_is_refused_before_writing():
    """torch has no lerp/add kernel for float8: a TypeError naming the key, nothing written."""
    model = Pair()
    model.last.register_buffer("f8", torch.zeros(3, dtype=torch.float8_e4m3fn))
    before = raw(model)
    with pytest.raises(TypeError, match=r"(?s)float8.*`last.f8`"):
        ModelState.new(model).merge(good(model), merges.lerp(0.5))
    assert raw(model) == before


# --------------------------------------------------------------------------- the law


BAD_VALUES: dict[str, Callable[[Tensor], Any]] = {
    "shape": lambda t: torch.ones(*t.shape, 2),
    "meta": lambda t: torch.empty_like(t, device="meta"),
    "sparse": lambda t: torch.ones_like(t, dtype=torch.float32).to_sparse(),
    "complex": lambda t: torch.ones_like(t, dtype=torch.complex64),
    "quantized": lambda t: quantized(torch.ones_like(t, dtype=torch.float32)),
}
NOT_TENSORS: dict[str, Callable[[Tensor], Any]] = {
    "list": lambda t: t.tolist(),
    "none": lambda t: None,
}


def law_model(kind: str) -> nn.Module:
    """A model of mixed dtypes (float, double, long, bool), plain or with a bad destination."""
    if kind == "inference":
        with torch.inference_mode():
            return law_model("plain")
    model = Pair()
    model.first.register_buffer("f64", torch.zeros(2, dtype=torch.float64))
    model.first.register_buffer("flags", torch.zeros(2, dtype=torch.bool))
    if kind == "expanded":
        model.last.register_buffer("table", torch.zeros(1).expand(2))
    return model


def good_value(t: Tensor, seed: int, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(t.shape, generator=g, dtype=torch.float64)
    if t.dtype == torch.bool:
        return value > 0
    if seed % 7 == 0:  # NaNs among good values: the byte comparison must be NaN-safe
        value[...] = float("nan")
    return value.to(dtype) if t.is_floating_point() else value.round().to(t.dtype)


@st.composite
def inputs(draw: st.DrawFn, *, allow_not_tensors: bool) -> tuple[str, dict[str, Any], bool]:
    """A model kind, values for a random subset of its keys (some bad) and whether any is bad."""
    kind = draw(st.sampled_from(["plain", "plain", "expanded", "inference"]))
    model = law_model(kind)
    sd = model.state_dict()
    keys = draw(st.lists(st.sampled_from(list(sd)), min_size=1, unique=True))
    if kind != "plain" and draw(st.booleans()):
        keys.append("last.table" if kind == "expanded" else "first.weight")
    bad_kinds = list(BAD_VALUES) + (list(NOT_TENSORS) if allow_not_tensors else [])
    values: dict[str, Any] = {}
    any_bad = (kind == "expanded" and "last.table" in keys) or kind == "inference"
    for key in dict.fromkeys(keys):
        t = sd[key]
        choice = draw(st.sampled_from(["good", "good", *bad_kinds]))
        if choice == "good" or (choice == "complex" and t.is_complex()):
            dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
            values[key] = good_value(t, draw(st.integers(0, 2**16)), dtype)
            continue
        if choice == "quantized" and t.dtype not in (torch.float32, torch.float64):
            values[key] = good_value(t, 1, torch.float32)  # quantizing an int: not a bad value
            continue
        make = BAD_VALUES.get(choice) or NOT_TENSORS[choice]
        values[key] = make(t)
        any_bad = True
    if allow_not_tensors and draw(st.integers(0, 5)) == 0:
        values["first.wieght"] = torch.zeros(3, 3)  # an unknown key
        any_bad = True
    return kind, values, any_bad


def check_atomic(kind: str, run: Callable[[ModelState], object], any_bad: bool) -> None:
    model = law_model(kind)
    ms = ModelState.new(model)
    before = raw(model)
    if not any_bad:
        run(ms)
        return
    with pytest.raises(ERRORS):
        run(ms)
    assert raw(model) == before


@settings(max_examples=60, deadline=None)
@given(case=inputs(allow_not_tensors=True))
def test_update_with_bad_values_among_good_ones_changes_no_byte(case):
    """Random bad values (and bad destinations) among good ones: a builtin error, no byte
    of the model changed; without a bad one the update succeeds."""
    kind, values, any_bad = case
    check_atomic(kind, lambda ms: ms.update(values), any_bad)


@settings(max_examples=60, deadline=None)
@given(
    case=inputs(allow_not_tensors=False),
    merge=st.sampled_from([merges.replace(), merges.lerp(0.3), merges.ema(0.9), merges.add(0.5)]),
)
def test_named_merges_with_bad_values_among_good_ones_change_no_byte(case, merge):
    """Named merges with a random bad rhs (or destination) leave every byte as it was."""
    kind, values, any_bad = case
    check_atomic(kind, lambda ms: ms.merge(values, merge), any_bad)


@settings(max_examples=60, deadline=None)
@given(case=inputs(allow_not_tensors=True), data=st.data())
def test_merge_functions_returning_bad_values_change_no_byte(case, data):
    """A merge function whose results are random bad values among good ones writes nothing."""
    kind, results, any_bad = case
    model = law_model(kind)
    results.pop("first.wieght", None)
    # Every key is merged here (rhs holds them all), so a bad destination always counts.
    any_bad = kind != "plain" or any(_is_bad(v, model, k) for k, v in results.items())
    rhs = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    raises = data.draw(st.booleans()) and bool(results)

    def fun(path: list[str], lhs: Tensor, rhs_t: Tensor) -> Any:
        key = ".".join(path)
        if raises and key == next(iter(results)):
            raise ValueError("fun failed")
        return results.get(key, rhs_t)

    check_atomic(kind, lambda ms: ms.merge(rhs, fun), any_bad or raises)


def _is_bad(value: Any, model: nn.Module, key: str) -> bool:
    target = model.state_dict()[key]
    if not isinstance(value, Tensor):
        return True
    return (
        value.shape != target.shape
        or value.layout != torch.strided
        or value.is_meta
        or value.is_quantized
        or (value.is_complex() and not target.is_complex())
    )


# --------------------------------------------------------------------------- the shared rule


def test_check_destinations_lets_byte_reads_into_inference_tensors():
    """`kernel=False` marks a destination filled as raw bytes (as load does): allowed for an
    inference tensor; one written by a kernel is refused, naming its key."""
    with torch.inference_mode():
        a, b = torch.zeros(2), torch.zeros(2)
    check_destinations("load", ["a", "b"], [a, b], kernel=[False, False])
    with pytest.raises(ValueError, match=r"`b` is an inference tensor"):
        check_destinations("load", ["a", "b"], [a, b], kernel=[False, True])
