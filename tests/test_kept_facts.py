"""Kept facts (`_facts`, `_known`): a warm update or merge writes and refuses as a cold one.

Every scenario warms the cache (three calls between the same views, after which the facts
and the pair or the last update are kept), changes something, and calls again. The result
is checked against plain torch ops on independent copies (`expected`), a refusal against
the rule the full checks enforce (`refusal`), with every byte of the state as it was.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import torch_modelstate._guard as guard_module
import torch_modelstate._update as update_module
from torch_modelstate import ModelState, merges
from torch_modelstate._facts import Facts


def make(seed: int = 0) -> nn.Sequential:
    """Two square Linear layers around a BatchNorm1d with non-trivial running stats."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3))
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(7)
    return model


SHAPES = {k: (v.shape, v.dtype) for k, v in make().state_dict().items()}
DIRECTIONS = ["ema_from_model", "model_from_ema", "update"]


def random_values(seed: int, drop: str = "1.running_var") -> dict[str, Any]:
    """A random value of each key's original shape and dtype (`drop` left out)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(shape, generator=gen)
        if dtype.is_floating_point
        else torch.randint(0, 99, shape, generator=gen, dtype=dtype)
        for key, (shape, dtype) in SHAPES.items()
        if key != drop
    }


def fresh(v: Tensor) -> Tensor:
    return torch.randn(v.shape, dtype=v.dtype) if v.is_floating_point() else v + 1


def snapshot(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def assert_identical(got: dict[str, Tensor], before: dict[str, Tensor]) -> None:
    assert list(got) == list(before)
    for key, value in got.items():
        want = before[key]
        assert value.dtype == want.dtype and value.shape == want.shape, key
        torch.testing.assert_close(value.detach(), want, rtol=0, atol=0, equal_nan=True)


def assert_state(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want)
    for key, value in got.items():
        torch.testing.assert_close(
            value.detach(), want[key], equal_nan=True, msg=lambda m, key=key: f"{key}: {m}"
        )


def expected(
    lhs: dict[str, Tensor], rhs: dict[str, Any], combine: Callable[..., Tensor], nonfloat="rhs"
) -> dict[str, Tensor]:
    """lhs after a write of `rhs` computed by plain torch ops: float pairs combined (rhs cast
    to lhs's dtype), other pairs per `nonfloat`."""
    out = snapshot(lhs)
    for key, value in rhs.items():
        dst = out[key]
        src = value.detach().to(dst.dtype, copy=True)
        if dst.is_floating_point() or dst.is_complex():
            out[key] = combine(dst, src)
        elif nonfloat == "rhs":
            out[key] = src
    return out


def refusal(verb: str, lhs: dict[str, Tensor], rhs: dict[str, Any]) -> tuple[type, str] | None:
    """The refusal the full checks make (type, message fragment), in their order, or None."""
    if not all(isinstance(v, Tensor) for v in rhs.values()):
        return TypeError, "not a tensor"
    pairs = [(v, lhs[k]) for k, v in rhs.items()]
    dst_rules = [
        (lambda d: d.is_conj() or d.is_neg(), ValueError, "lazy"),
        (lambda d: torch._debug_has_internal_overlap(d) == 1, ValueError, "share one memory"),
        (lambda d: d.is_inference() and not torch.is_inference_mode_enabled(), ValueError, "infer"),
    ]
    value_rules = [
        (lambda v, d: v.shape != d.shape, ValueError, "shape mismatch"),
        (lambda v, d: v.layout != torch.strided, TypeError, "only dense"),
        (lambda v, d: v.is_meta, TypeError, "meta device"),
        (lambda v, d: v.is_complex() and not d.is_complex(), TypeError, "complex"),
    ]
    dests = [(r, e, m) for r, e, m in dst_rules if any(r(d) for _, d in pairs)]
    values = [(r, e, m) for r, e, m in value_rules if any(r(v, d) for v, d in pairs)]
    found = values + dests if verb == "update" else dests + values
    return (found[0][1], found[0][2]) if found else None


def check(lhs_state, rhs, verb, combine, call) -> None:
    """Run `call` and check lhs against the reference (values or refusal, nothing written)."""
    lhs = lhs_state.to_dict()
    refused = refusal(verb, lhs, rhs)
    if refused is not None:
        before = snapshot(lhs)
        with pytest.raises(refused[0], match=refused[1]):
            call()
        assert_identical(lhs_state.to_dict(), before)
        return
    want = expected(lhs, rhs, combine)
    call()
    assert_state(lhs_state.to_dict(), want)


def op(direction: str, ms: ModelState, ema: ModelState, values: dict | None = None):
    """(lhs state, rhs values, verb, combine, call) of one step in `direction`."""
    if direction == "update":
        vals = random_values(0) if values is None else values
        return ms, vals, "update", lambda a, b: b, lambda: ms.update(vals)
    lhs, rhs, t = (ema, ms, 0.5) if direction == "ema_from_model" else (ms, ema, 0.25)
    fun = merges.lerp(t)
    call = lambda: lhs.merge(rhs, fun)  # noqa: E731
    return lhs, rhs.to_dict(), "merge", lambda a, b: torch.lerp(a, b, t), call


def setup(layout: str = "plain") -> tuple[nn.Sequential, ModelState, ModelState]:
    model = make()
    ms = ModelState.new(model)
    if layout == "packed":
        ms.pack()
    ema = ms.clone()
    with torch.no_grad():
        for t in ema.to_dict().values():
            if t.is_floating_point():
                t.normal_()
    return model, ms, ema


def warm(direction: str, ms: ModelState, ema: ModelState, times: int = 3) -> None:
    for seed in range(times):
        check(*op(direction, ms, ema, random_values(seed)))


def facts_of(state: ModelState) -> Facts:
    found = state._idx()._facts
    assert isinstance(found, Facts)
    return found


def assert_warm(direction: str, ms: ModelState, ema: ModelState) -> None:
    """The fast path is armed: facts kept, with a pair (merge) or the last update."""
    if direction == "update":
        assert facts_of(ms).update is not None
    else:
        assert facts_of(ema if direction == "ema_from_model" else ms).pair is not None


def use_guard(guard: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if guard == "plain":
        monkeypatch.setattr(guard_module, "_TensorGuards", None)


def count_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    original = update_module.check_destinations

    def counting(verb, *args, **kwargs):
        calls.append(verb)
        return original(verb, *args, **kwargs)

    monkeypatch.setattr(update_module, "check_destinations", counting)
    return calls


# --------------------------------------------------------------------------- mutations


def _resize(w: Tensor, shape: tuple[int, ...]) -> None:
    flag = w.requires_grad
    w.requires_grad_(False)
    w.resize_(shape)
    w.requires_grad_(flag)


def _t_(m: nn.Module) -> None:
    with torch.no_grad():
        m[0].weight.t_()


def _shrink(m: nn.Module) -> None:
    if m[0].weight.shape == (3, 3):
        _resize(m[0].weight, (2, 3))


def _grow(m: nn.Module) -> None:
    if m[0].weight.shape == (2, 3):
        _resize(m[0].weight, (3, 3))
        with torch.no_grad():
            m[0].weight.normal_()  # the grown tail may be new, uninitialised memory


def _view_dtype(m: nn.Module) -> None:
    buf = m[1].running_mean
    other = {torch.float32: torch.int32, torch.int32: torch.float32}.get(buf.dtype)
    if other is not None:
        buf.data = buf.data.view(other)


def _expand(m: nn.Module) -> None:
    m[0].bias.data = m[0].bias.data[:1].expand(3)


def _set(obj: object, name: str, value: object) -> None:
    setattr(obj, name, value)


MUTATIONS: dict[str, Callable[[nn.Module], object]] = {
    "new_data": lambda m: _set(m[0].weight, "data", torch.randn(3, 3, dtype=m[0].weight.dtype)),
    "replace_param": lambda m: _set(m[0], "weight", nn.Parameter(torch.randn(3, 3))),
    "replace_module": lambda m: m._modules.__setitem__("2", nn.Linear(3, 3)),
    "transpose_data": lambda m: _set(m[0].weight, "data", m[0].weight.data.t()),
    "t_": _t_,
    "view_dtype": _view_dtype,
    "shrink": _shrink,
    "shrink_grow": lambda m: (_shrink(m), _grow(m)),
    "expand": _expand,
    "half": lambda m: m.half(),
    "double": lambda m: m.double(),
    "requires_grad": lambda m: m.requires_grad_(not m[0].weight.requires_grad),
    # only in random sequences: undo the above
    "grow": _grow,
    "unexpand": lambda m: _set(m[0].bias, "data", m[0].bias.data.clone()),
    "float": lambda m: m.float(),
}
CONTEXTS: dict[str, Callable[[], Any]] = {
    "inference_mode": torch.inference_mode,
    "autocast": lambda: torch.autocast("cpu"),
}
SINGLE = [name for name in MUTATIONS if name not in ("grow", "unexpand", "float")] + list(CONTEXTS)


def mutate(name: str, model: nn.Module) -> Any:
    """Apply mutation `name`; returns the context the next call runs in."""
    if name in CONTEXTS:
        return CONTEXTS[name]()
    MUTATIONS[name](model)
    return nullcontext()


@pytest.mark.parametrize("layout", ["plain", "fallback", "packed", "packed_cold"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mutation", SINGLE)
def test_a_change_after_warm_up_writes_or_refuses_as_the_full_checks(
    mutation, direction, layout, monkeypatch
):
    """A change to the model after warm-up: values as plain torch computes them, or the
    full checks' refusal with nothing written (packed_cold: the same without warm-up)."""
    use_guard("plain" if layout == "fallback" else "tensor_guards", monkeypatch)
    model, ms, ema = setup("packed" if layout.startswith("packed") else "plain")
    if layout != "packed_cold":
        warm(direction, ms, ema)
        assert_warm(direction, ms, ema)
        if layout == "fallback":
            assert facts_of(ms)._guard._guard is None
    with mutate(mutation, model):
        check(*op(direction, ms, ema, random_values(7)))


@pytest.mark.parametrize("direction", ["model_from_ema", "update"])
@pytest.mark.parametrize("mutation", ["new_data", "replace_param", "replace_module"])
def test_writes_after_a_replacement_go_to_the_new_tensors(mutation, direction):
    """Replaced tensors (or their storage) after warm-up: the old ones are left alone."""
    model, ms, ema = setup()
    warm(direction, ms, ema)
    old = [t.detach() for t in ms.to_dict().values()]
    copies = [t.clone() for t in old]
    mutate(mutation, model)
    check(*op(direction, ms, ema, random_values(7)))
    live = {t.untyped_storage().data_ptr() for t in ms.to_dict().values()}
    gone = [
        (o, c)
        for o, c in zip(old, copies, strict=True)
        if o.untyped_storage().data_ptr() not in live
    ]
    assert gone
    assert all(torch.equal(o, c) for o, c in gone)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_warm_path_skips_the_checks_until_something_moves(direction, monkeypatch):
    """The checks stop after warm-up while nothing moves; after t_() they run once, then
    the rebuilt facts serve."""
    calls = count_checks(monkeypatch)
    model, ms, ema = setup()
    warm(direction, ms, ema, times=4)
    checked = len(calls)
    assert checked <= 3  # facts kept from the second or third call on
    warm(direction, ms, ema, times=3)
    assert len(calls) == checked
    _t_(model)
    check(*op(direction, ms, ema, random_values(8)))
    assert len(calls) == checked + 1
    warm(direction, ms, ema, times=3)
    assert len(calls) == checked + 1


# --------------------------------------------------------------------------- many steps


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(8, 3, dtype=model[0].weight.dtype)
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


FUNS = {
    "ema": (lambda nf: merges.ema(0.9, nonfloat=nf), lambda a, b: torch.lerp(a, b, 1.0 - 0.9)),
    "lerp": (lambda nf: merges.lerp(0.3, nonfloat=nf), lambda a, b: torch.lerp(a, b, 0.3)),
    "add": (lambda nf: merges.add(0.5, nonfloat=nf), lambda a, b: a + 0.5 * b),
    "replace": (lambda nf: merges.replace(), lambda a, b: b.clone()),
}
CASES = [(f, nf) for f in FUNS for nf in ("rhs", "lhs") if (f, nf) != ("replace", "lhs")]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize(("name", "nonfloat"), CASES)
def test_warm_merges_follow_torch_over_many_training_steps(name, nonfloat, autocast, monkeypatch):
    """An EMA loop over a training model (int64 counters included), optionally under
    autocast: every step equals plain torch math, and after warm-up the checks no longer run."""
    calls = count_checks(monkeypatch)
    factory, combine = FUNS[name]
    fun = factory(nonfloat)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ms = ModelState.new(model)
    ema = ms.clone()
    reference = snapshot(ema.to_dict())
    with torch.autocast("cpu") if autocast else nullcontext():
        for step in range(8):
            train_step(model, opt)
            ema.merge(ms, fun)
            reference = expected(reference, ms.to_dict(), combine, fun.nonfloat)
            assert_state(ema.to_dict(), reference)
            if step == 2:
                checked = len(calls)
    assert facts_of(ema).pair is not None
    assert checked <= 3
    assert len(calls) == checked
    counter = ema["1.num_batches_tracked"].item()
    assert counter == (15 if fun.nonfloat == "rhs" else 7)


def test_packed_ema_follows_torch_and_survives_broken_packing():
    """Packed states take the flat path warm; after model.to(float64) and a replaced
    ``p.data`` (packing broken) every step still equals plain torch math."""
    model = make()
    ms = ModelState.new(model).pack()
    ema = ms.clone()
    reference = snapshot(ema.to_dict())
    for step in range(9):
        if step == 4:
            assert facts_of(ema).pair.packed
            model.to(torch.float64)
        if step == 6:
            model[2].weight.data = torch.randn(3, 3, dtype=torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, opt)
        ema.merge(ms, merges.ema(0.9))
        reference = expected(reference, ms.to_dict(), lambda a, b: torch.lerp(a, b, 1.0 - 0.9))
        assert_state(ema.to_dict(), reference)


# --------------------------------------------------------------------------- updates


CHANGES: dict[str, Callable[[nn.Module, dict], dict]] = {
    "new_values": lambda m, d: {k: fresh(v) for k, v in d.items()},
    "mutated": lambda m, d: (d.__setitem__("0.weight", torch.randn(3, 3)), d)[1],
    "shape": lambda m, d: {**d, "0.weight": torch.zeros(2, 3)},
    "sparse": lambda m, d: {**d, "0.bias": torch.zeros(3).to_sparse()},
    "meta": lambda m, d: {**d, "2.bias": torch.zeros(3, device="meta")},
    "non_tensor": lambda m, d: {**d, "2.bias": 1.0},
    "float64": lambda m, d: {
        k: fresh(v.double()) if v.is_floating_point() else v for k, v in d.items()
    },
    "noncontiguous": lambda m, d: {**d, "0.weight": torch.randn(3, 3).t()},
    "swap": lambda m, d: {**d, "0.weight": m[2].weight.detach(), "2.weight": m[0].weight.detach()},
    "self_transposed": lambda m, d: {**d, "0.weight": m[0].weight.detach().t()},
    "itself": lambda m, d: {**d, "0.weight": m[0].weight.detach()},
    "removed": lambda m, d: {k: fresh(v) for k, v in d.items() if k != "1.bias"},
    "added": lambda m, d: {**{k: fresh(v) for k, v in d.items()}, "1.running_var": torch.rand(3)},
    "reordered": lambda m, d: {k: fresh(d[k]) for k in reversed(d)},
    "inference_value": lambda m, d: {**d, "0.weight": torch.inference_mode()(torch.randn)(3, 3)},
    "grad_value": lambda m, d: {**d, "0.weight": torch.randn(3, 3, requires_grad=True)},
}


@pytest.mark.parametrize("guard", ["tensor_guards", "plain"])
@pytest.mark.parametrize("change", CHANGES)
def test_update_after_warm_up_with_a_changed_dict(change, guard, monkeypatch):
    """A dict changed after warm-up (values, keys, order, aliasing, bad values): written as
    plain torch copies, or refused as the full checks refuse, with nothing written."""
    use_guard(guard, monkeypatch)
    model = make()
    ms = ModelState.new(model)
    values = random_values(0)
    for _ in range(3):
        ms.update(values)
    assert facts_of(ms).update is not None
    new = CHANGES[change](model, values)
    check(ms, new, "update", lambda a, b: b, lambda: ms.update(new))


def test_swapping_two_destinations_stays_correct_every_time():
    """``update({"a": b, "b": a})`` from the model's own tensors swaps them, call after call."""
    model = make()
    ms = ModelState.new(model)
    for _ in range(5):
        a, b = model[0].weight.detach().clone(), model[2].weight.detach().clone()
        ms.update({"0.weight": model[2].weight.detach(), "2.weight": model[0].weight.detach()})
        assert torch.equal(model[0].weight, b) and torch.equal(model[2].weight, a)


# --------------------------------------------------------------------------- inference, lazy views


def test_a_model_built_under_inference_mode_is_refused_outside_it_even_warm():
    """Inference tensors are written inside inference mode (warm there too) and refused
    outside it before and after warm-up, with nothing written."""
    with torch.inference_mode():
        model = make()
    ms = ModelState.new(model)
    ema = ModelState.new({k: fresh(v.clone()) for k, v in ms.to_dict().items()})
    for direction in ("model_from_ema", "update"):
        for _ in range(3):
            check(*op(direction, ms, ema))  # refused: inference tensors outside the mode
        with torch.inference_mode():
            for seed in range(4):
                check(*op(direction, ms, ema, random_values(seed)))
            assert_warm(direction, ms, ema)
        lhs, rhs, verb, _, call = op(direction, ms, ema)
        assert refusal(verb, lhs.to_dict(), rhs) == (ValueError, "infer")
        check(lhs, rhs, verb, lambda a, b: b, call)


@pytest.mark.parametrize("guard", ["tensor_guards", "plain"])
@pytest.mark.parametrize("lazy", ["conj", "neg"])
def test_a_lazy_view_destination_after_warm_up_is_refused(lazy, guard, monkeypatch):
    """A complex destination turned into a lazy conjugate / negative view after warm-up:
    the ValueError of the full checks, nothing written."""
    use_guard(guard, monkeypatch)
    w = torch.randn(2, 2, dtype=torch.complex64)
    state = ModelState.new({"w": w})
    other = ModelState.new({"w": torch.ones(2, 2, dtype=torch.complex64)})
    for _ in range(3):
        state.merge(other, merges.lerp(0.5))
    assert facts_of(state).pair is not None
    w.data = w.data.conj() if lazy == "conj" else w.data._neg_view()
    before = w.clone()
    with pytest.raises(ValueError, match="lazy"):
        state.merge(other, merges.lerp(0.5))
    assert torch.equal(w, before)


# --------------------------------------------------------------------------- what is kept alive


def test_kept_merge_facts_keep_no_rhs_tensor_alive():
    """Three merges from a temporary model: once it is deleted, nothing keeps it alive, and
    a merge from another model is correct."""
    ema = ModelState.new(make()).clone()

    def merge_from_temporary() -> list[weakref.ref]:
        tmp = make(1)
        state = ModelState.new(tmp)
        for _ in range(3):
            ema.merge(state, merges.ema(0.9))
        assert facts_of(ema).pair is not None
        return [weakref.ref(tmp), weakref.ref(tmp[0].weight), weakref.ref(tmp[1].running_mean)]

    refs = merge_from_temporary()
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    other = ModelState.new(make(2))
    want = expected(ema.to_dict(), other.to_dict(), lambda a, b: torch.lerp(a, b, 1.0 - 0.9))
    ema.merge(other, merges.ema(0.9))
    assert_state(ema.to_dict(), want)


def test_kept_update_keeps_no_value_alive():
    """The kept update holds no tensor of the last dict once the caller drops it."""
    ms = ModelState.new(make())

    def update_three_times() -> list[weakref.ref]:
        dicts = [random_values(seed) for seed in range(3)]
        for values in dicts:
            ms.update(values)
        assert facts_of(ms).update is not None
        return [weakref.ref(v) for v in dicts[-1].values()]

    refs = update_three_times()
    gc.collect()
    assert all(r() is None for r in refs)


# --------------------------------------------------------------------------- random sequences

STEPS = st.lists(
    st.tuples(
        st.sampled_from(["none", *MUTATIONS, *CONTEXTS]),
        st.sampled_from(DIRECTIONS),
        st.sampled_from(list(CHANGES)),
        st.integers(0, 2**16),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=30, deadline=None)
@given(steps=STEPS)
def test_random_changes_between_warm_steps_match_plain_torch(steps):
    """After warm-up in every direction, random changes between random steps (and random
    update dicts): each step's state equals plain torch ops on independent copies."""
    model, ms, ema = setup()
    for direction in DIRECTIONS:
        warm(direction, ms, ema)
        assert_warm(direction, ms, ema)
    for mutation, direction, change, seed in steps:
        torch.manual_seed(seed)
        context = nullcontext() if mutation == "none" else mutate(mutation, model)
        with context:
            values = CHANGES[change](model, random_values(seed)) if direction == "update" else None
            other = ms if direction == "ema_from_model" else ema
            for _ in range(2):  # right after the change, then from the rebuilt facts
                before = snapshot(other.to_dict())  # the other side is read, never written
                check(*op(direction, ms, ema, values))
                assert_identical(other.to_dict(), before)


def test_a_packing_stays_intact_after_a_freeze():
    """Freezing a packed model changes requires_grad only: the flat path still serves."""
    from torch_modelstate import _pack

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    ms = ModelState.new(model)
    ms.pack()
    ms.freeze("0.**")
    tensors = [leaf.tensor for leaf in ms._idx().leaves]
    assert _pack.layout_of(tensors) is not None
    tensors[0].t_()
    assert _pack.layout_of(tensors) is None


def test_warm_merges_group_mixed_float_dtypes():
    """A model of fp32, fp64 and bf16 tensors: warm steps run one kernel per dtype group and
    match plain torch."""
    from torch_modelstate._facts import Facts as KeptFacts

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3).double(), nn.Linear(3, 3).bfloat16())
    ms = ModelState.new(model)
    ema = ms.clone()
    expected = {k: v.clone() for k, v in ema.to_dict().items()}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5).add_(0.5)
        ema.merge(ms, merges.ema(0.5))
        for key, value in ms.to_dict().items():
            expected[key] = torch.lerp(expected[key], value, 0.5)
    facts = ema._idx()._facts
    assert isinstance(facts, KeptFacts) and facts.pair is not None
    assert len(facts.pair.prepared(facts, ms._idx()._facts).split.float_groups) == 3
    for key, value in ema.to_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_pair_is_never_built_from_facts_that_no_longer_hold():
    """A tensor cast and cast back between calls: the warm merge still follows torch (it
    once ran a kernel with the old dtypes and raised after writing part of the state)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    model.bias.data = model.bias.data.double()
    ms = ModelState.new(model)
    ema = ms.clone(dtype=torch.float32)
    values = {k: torch.randn_like(v) for k, v in ms.to_dict().items()}
    ms.update(values)
    ms.update(values)
    step = merges.ema(0.5)
    ema.merge(ms, step)
    ema.merge(ms, step)
    orig = model.bias.data
    model.bias.data = orig.float()
    ema.merge(ms, step)
    model.bias.data = orig
    expected = {k: torch.lerp(v, ms[k].float(), 0.5) for k, v in ema.to_dict().items()}
    ema.merge(ms, step)
    for key, value in ema.to_dict().items():
        assert torch.equal(value, expected[key]), key


def test_memory_unmapped_after_warm_up_is_refused_not_written(tmp_path):
    """A destination in memory torch did not allocate is re-checked every call: after its
    mmap is closed, a warm update is refused (it once crashed the process)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import mmap, torch
        from torch_modelstate import ModelState
        m = mmap.mmap(-1, 1 << 20, access=mmap.ACCESS_WRITE)
        ms = ModelState.new({"w": torch.frombuffer(m, dtype=torch.float32, count=4)})
        for _ in range(4):
            ms.update({"w": torch.ones(4)})
        m.close()
        try:
            ms.update({"w": torch.full((4,), 2.0)})
        except ValueError as e:
            print("refused:", str(e).splitlines()[0])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "read-only memory" in done.stdout


def _warm_count(monkeypatch, run, calls: int = 6) -> list[int]:
    """How many full destination checks each of `calls` runs of `run` made."""
    counts: list[int] = []
    real = update_module.check_destinations

    def counting(*args, **kwargs):
        counts[-1] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(update_module, "check_destinations", counting)
    for _ in range(calls):
        counts.append(0)
        run()
    return counts


class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.norm = nn.LayerNorm(3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


@pytest.mark.parametrize(
    "case",
    [
        "tied",
        "fp32_of_bf16",
        "zero_size",
        "ordered_dict_update",
        "zero_size_update",
        "other_ms_update",
    ],
)
def test_common_repeated_steps_reach_the_warm_path(case, monkeypatch):
    """Tied embeddings, an fp32 EMA of a bf16 model, a zero-size buffer, an update from
    `state_dict()` (an OrderedDict): from the third call on, no full checks, and the values
    follow torch."""
    torch.manual_seed(0)
    # (An update from the state dict of a tied model names one tensor twice; it is checked
    # every call, so the update cases use an untied model.)
    untied = case.endswith("update")
    model: nn.Module = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)) if untied else _TiedLM()
    if case == "fp32_of_bf16":
        model = model.bfloat16()
    if case.startswith("zero_size"):
        model.register_buffer("empty", torch.zeros(0))
    ms = ModelState.new(model)
    if untied:
        source = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        if case == "zero_size_update":
            source.register_buffer("empty", torch.zeros(0))
        src_ms = ModelState.new(source)

        def run() -> None:
            if case in ("ordered_dict_update", "zero_size_update"):
                ms.update(source.state_dict())
            else:
                ms.update(src_ms)

        expected = {k: v.clone() for k, v in src_ms.to_dict().items()}
    else:
        ema = ms.clone(dtype=torch.float32)
        expected = {k: v.clone() for k, v in ema.to_dict().items()}

        def run() -> None:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.5)
            ema.merge(ms, merges.ema(0.5))
            for key, value in ms.to_dict().items():
                if value.is_floating_point():
                    expected[key] = torch.lerp(expected[key], value.float(), 0.5)

    counts = _warm_count(monkeypatch, run)
    if case == "other_ms_update":
        assert all(counts), counts  # a ModelState argument is checked every call
    else:
        assert counts[2:] == [0] * (len(counts) - 2), counts
    target = ms if case.endswith("update") else ema
    for key, value in target.to_dict().items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("warm", [False, True])
def test_a_lerp_into_complex32_on_the_cpu_is_refused_before_any_write(warm):
    """torch has no CPU lerp kernel for complex32: refused up front, nothing written (it
    wrote the other tensors and then raised NotImplementedError)."""
    state = ModelState.new({"a": torch.zeros(3), "z": torch.zeros(3, dtype=torch.complex32)})
    other = {"a": torch.ones(3), "z": torch.ones(3, dtype=torch.complex32)}
    if warm:
        for _ in range(3):
            state.merge(other, merges.add(0.5))  # add has a kernel: fine
    before = {k: v.clone() for k, v in state.to_dict().items()}
    with pytest.raises(TypeError, match="complex32 on the CPU"):
        state.merge(other, merges.lerp(0.5))
    for key, value in state.to_dict().items():  # bits: torch.equal has no complex32 kernel
        assert torch.equal(value.view(torch.int32), before[key].view(torch.int32)), key


@pytest.mark.parametrize("implied", [True, False])
def test_the_guard_checks_sizes_with_or_without_them_given(implied, monkeypatch):
    """Whether the C++ guard takes sizes from the tensors or is given them, it sees a
    transpose, a resize and a view of another shape."""
    monkeypatch.setattr(guard_module, "_SIZES_IMPLIED", [implied])
    w, v = torch.zeros(3, 3), torch.zeros(4)
    guard = guard_module.Guard([w, v])
    assert guard.check([w, v])
    assert not guard.check([w.t(), v])
    assert not guard.check([w, torch.zeros(5)])
    assert not guard.check([torch.zeros(1, 3).expand(3, 3), v])


def test_facts_that_break_every_step_are_rebuilt_rarely_and_come_back(monkeypatch):
    """`requires_grad` toggled between every pair of steps: the facts, which never get to
    serve, are rebuilt with a growing back-off (not every step); once the toggling stops
    they are rebuilt and serve again. Values follow torch throughout."""
    import torch_modelstate._index as index_module

    built = [0]
    real = index_module.Facts

    def counting(tensors):
        built[0] += 1
        return real(tensors)

    monkeypatch.setattr(index_module, "Facts", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ms = ModelState.new(model)
    ema = ms.clone()
    expected = {k: v.clone() for k, v in ema.to_dict().items()}
    weight = model[0].weight

    def step(toggle: bool) -> None:
        if toggle:
            weight.requires_grad_(not weight.requires_grad)
        with torch.no_grad():
            weight.add_(0.5)
        ema.merge(ms, merges.ema(0.5))
        for key, value in ms.to_dict().items():
            if value.is_floating_point():
                expected[key] = torch.lerp(expected[key], value, 0.5)
            else:
                expected[key] = value.clone()

    for _ in range(60):
        step(toggle=True)
    assert built[0] <= 12, built[0]  # back-off 1, 2, 4 ... 32, not 60 rebuilds
    counts = _warm_count(monkeypatch, lambda: step(toggle=False), calls=40)
    assert counts[-5:] == [0] * 5, counts
    for key, value in ema.to_dict().items():
        assert torch.equal(value, expected[key]), key
