"""Kept facts in use: a warm call (third or later between the same views) writes and
refuses exactly as a fresh, fully checked call does.

The findings of a review come first, each with what is expected and what happened before
its fix (one, a module dict replaced wholesale, is a documented limit: a strict xfail).
The tests after them are angles that were right already, each checked against a
brand-new ModelState over a deep copy (the cold reference) and, for merges, plain torch
arithmetic.

"Re-homing" below means giving a tensor a new storage object over the *same* memory:
``p.data = torch.from_dlpack(p.data)`` (zero-copy DLPack interop, as with CuPy or JAX) or
``p.set_(p.untyped_storage()[a:b], 0, shape, stride)``. Data pointer, dtype, shape, strides
and dispatch keys all stay, so the kept signature holds; the storage object, its start
pointer and its size change.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from typing import Any

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from torch import Tensor, nn

from torch_modelstate import ModelState, merges
from torch_modelstate import _update as update_module
from torch_modelstate._facts import Facts


def facts_of(state: ModelState) -> Facts:
    found = state._idx()._facts
    assert isinstance(found, Facts)
    return found


def rehome(t: Tensor) -> None:
    """A new storage object over the same memory (same data_ptr, shape, strides)."""
    ptr, stride = t.data_ptr(), t.stride()
    with torch.no_grad():
        t.data = torch.from_dlpack(t.data)
    assert t.data_ptr() == ptr and t.stride() == stride


def snapshot(state: ModelState) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.to_dict().items()}


def assert_equal_state(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want)
    for key, value in got.items():
        assert value.dtype == want[key].dtype and value.shape == want[key].shape, key
        assert torch.equal(value.detach(), want[key]), key


def three_linear() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))


# =========================================================================== findings


def test_warm_packed_merge_after_the_first_tensor_is_rehomed_is_not_a_runtime_error():
    """Packed EMA, warm; its first tensor re-homed by DLPack (same memory, same metadata).
    Expected: the merge writes lerp(ema, model) as a cold merge does (a fresh state over
    the same tensors computes it correctly, on the per-tensor path).
    Before the fix: ``RuntimeError: Trying to resize storage that is not resizable`` — the kept
    pair still takes the flat path and rebuilds the flat buffer from the first tensor's
    (now tensor-sized, non-resizable) storage: `Facts.layout` is never re-checked for
    intactness (`Layout._owns_group`)."""
    model = three_linear()
    ms = ModelState.new(model).pack()
    ema = ms.clone()
    for _ in range(3):
        ema.merge(ms, merges.ema(0.5))
    assert facts_of(ema).pair is not None and facts_of(ema).pair.packed
    rehome(ema["0.weight"])
    want = {k: torch.lerp(v, ms[k], 0.5) for k, v in snapshot(ema).items()}
    ema.merge(ms, merges.ema(0.5))
    assert_equal_state(snapshot(ema), want)


def test_warm_update_swapping_two_rehomed_packed_tensors_reads_before_it_writes():
    """Packed model, update warm on keys 1.weight/2.weight; both re-homed by DLPack; then
    ``update({"1.weight": w2, "2.weight": w1})`` from the model's own tensors.
    Expected (as cold, which sees the shared storage and copies first): a swap.
    Before the fix: 2.weight keeps its own value (it is written from 1.weight after 1.weight was
    overwritten): the warm aliasing test compares the values' storages with the
    destinations' storage pointers cached in `Facts.storages`, which went stale."""
    model = three_linear()
    ms = ModelState.new(model).pack()
    for _ in range(3):
        ms.update({"1.weight": torch.randn(3, 3), "2.weight": torch.randn(3, 3)})
    assert facts_of(ms).update is not None
    rehome(model[1].weight)
    rehome(model[2].weight)
    a, b = model[1].weight.detach().clone(), model[2].weight.detach().clone()
    ms.update({"1.weight": model[2].weight.detach(), "2.weight": model[1].weight.detach()})
    assert torch.equal(model[1].weight, b)
    assert torch.equal(model[2].weight, a)


def test_warm_merge_from_a_state_aliasing_rehomed_tensors_reads_before_it_writes():
    """A packed model merged warm from one state (its storages cached in `Facts`), then two
    of its tensors re-homed, then merged (replace) three times from a state whose 1.weight
    is the model's 2.weight and vice versa (the rest: copies).
    Expected (as cold, which copies rhs values sharing storage with lhs first): a swap,
    every call. Before the fix: on the third call the new pair is proven "disjoint" from the stale
    cached lhs storages and the kernels skip the copy: 2.weight reads the already
    overwritten 1.weight."""
    model = three_linear()
    ms = ModelState.new(model).pack()
    first = ms.clone()
    for _ in range(3):
        ms.merge(first, merges.lerp(0.5))
    rehome(model[1].weight)
    rehome(model[2].weight)
    values = {k: v.detach().clone() for k, v in ms.to_dict().items()}
    values["1.weight"] = model[2].weight.detach()
    values["2.weight"] = model[1].weight.detach()
    rhs = ModelState.new(values)
    for call in range(3):
        a, b = model[1].weight.detach().clone(), model[2].weight.detach().clone()
        ms.merge(rhs, merges.replace())
        assert torch.equal(model[1].weight, b), call
        assert torch.equal(model[2].weight, a), call


def test_packed_pairs_with_one_group_signature_but_other_members_are_merged_by_key():
    """Not warm-specific (`_pack.flat_pairs`, cold too): two packed states whose groups have
    the same (device, dtype, numel) and whose tensors have the same shapes, but whose
    tensors fall into the groups differently (lhs a,c float32 / b float64; rhs a,b float32
    / c float64). Expected: each key takes its own rhs value (a=1, b=2, c=3), as unpacked.
    Before the fix: the flat buffers were paired group by group, so b got 3 and c 2."""
    lhs = ModelState.new(
        {"a": torch.zeros(3), "b": torch.zeros(3, dtype=torch.float64), "c": torch.zeros(3)}
    ).pack()
    rhs = ModelState.new(
        {
            "a": torch.full((3,), 1.0),
            "b": torch.full((3,), 2.0),
            "c": torch.full((3,), 3.0, dtype=torch.float64),
        }
    ).pack()
    lhs.merge(rhs, merges.replace())
    got = {k: v.tolist() for k, v in lhs.to_dict().items()}
    assert got == {"a": [1.0] * 3, "b": [2.0] * 3, "c": [3.0] * 3}


def test_update_from_dlpack_aliases_of_packed_tensors_reads_before_it_writes():
    """Not warm-specific (cold): a packed model updated with DLPack aliases of its own
    tensors, swapped. Expected: a swap (values read before any write, as the contract
    says of ``update({"a": b, "b": a})``). Before the fix: 2.weight keeps its value: aliases are
    found by storage start pointer, and an alias of a tensor at an offset in the flat
    buffer starts at the tensor, not at the buffer."""
    model = three_linear()
    ms = ModelState.new(model).pack()
    a, b = model[1].weight.detach().clone(), model[2].weight.detach().clone()
    ms.update(
        {
            "1.weight": torch.from_dlpack(model[2].weight.detach()),
            "2.weight": torch.from_dlpack(model[1].weight.detach()),
        }
    )
    assert torch.equal(model[1].weight, b)
    assert torch.equal(model[2].weight, a)


@pytest.mark.parametrize("what", ["destination", "view_destination", "value"])
def test_freed_storage_after_warm_up_is_refused_not_a_segfault(what):
    """After warm-up, a destination's storage (or the storage of a destination that is a
    view, or a value's) is freed with ``untyped_storage().resize_(0)`` (what FSDP does to
    unsharded parameters between steps). Expected: refused before any write with a
    ValueError/TypeError naming the key (the contract: every input is checked, never a
    bare torch error). Before the fix: the process dies with SIGSEGV — on the cold path too (no
    check compares a tensor's extent with its storage's size)."""
    script = textwrap.dedent(
        f"""
        import torch
        from torch import nn
        from torch_modelstate import ModelState
        what = {what!r}
        model = nn.Linear(3, 3)
        if what == "view_destination":
            big = torch.zeros(20)
            model.weight = nn.Parameter(big[2:11].view(3, 3))
        ms = ModelState.new(model)
        for _ in range(3):
            ms.update({{"weight": torch.randn(3, 3), "bias": torch.randn(3)}})
        values = {{"weight": torch.randn(3, 3), "bias": torch.randn(3)}}
        if what == "value":
            values["weight"].untyped_storage().resize_(0)
        else:
            model.weight.untyped_storage().resize_(0)
        try:
            ms.update(values)
        except (ValueError, TypeError) as err:
            print("refused:", type(err).__name__)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, f"rc={done.returncode} {done.stderr[-500:]}"
    assert "refused:" in done.stdout


@pytest.mark.xfail(
    strict=True,
    reason="LIMITATION (documented in the README, How it works): a module's _parameters, "
    "_buffers or _modules dict object replaced wholesale is not noticed",
)
def test_a_parameters_dict_replaced_wholesale_is_followed():
    """(Documented as "not noticed" in `_index` / `_guard.DictGuard`; reported because the
    contract says a view never writes into a tensor the model no longer holds.)
    ``module._parameters = {...}`` with a new weight after warm-up. Expected (a fresh
    state over a deep copy): the model's new weight is written. What happens: the old weight,
    which the model no longer holds, is written; the new one keeps its value."""
    model = nn.Linear(3, 3)
    ms = ModelState.new(model)
    for _ in range(3):
        ms.update({"weight": torch.randn(3, 3), "bias": torch.randn(3)})
    old = model.weight
    new = nn.Parameter(torch.zeros(3, 3))
    model._parameters = {"weight": new, "bias": model.bias}
    ms.update({"weight": torch.ones(3, 3), "bias": torch.ones(3)})
    assert model.weight is new
    assert torch.equal(model.weight.detach(), torch.ones(3, 3))
    assert not torch.equal(old.detach(), torch.ones(3, 3))


def test_forward_with_a_frozen_buffer_keeps_the_warm_path():
    """A first version of `DictGuard` (dict versions) lost the warm path here: a frozen
    buffer's forward hooks swap it out and back (`_frozen`), which moves the ``_buffers``
    dict's version, so every step rebuilds the index and the kept facts never serve.
    Expected (as for a model without frozen buffers, and as with the identity checks of
    before): no full destination checks from the third EMA step on. Before the fix: one full
    check every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train()
    ms = ModelState.new(model).freeze("1.running_*")
    ema = ms.clone()
    x = torch.randn(4, 3)
    counts: list[int] = []
    real = update_module.check_destinations

    def counting(*args: Any, **kwargs: Any) -> Any:
        counts[-1] += 1
        return real(*args, **kwargs)

    update_module.check_destinations = counting
    try:
        for _ in range(6):
            model(x)
            counts.append(0)
            ema.merge(ms, merges.ema(0.9))
    finally:
        update_module.check_destinations = real
    assert counts[2:] == [0, 0, 0, 0], counts


@pytest.mark.parametrize("how", ["swap_tensors", "to_with_swap_on_conversion"])
def test_swap_tensors_on_a_packed_model(how):
    """``torch.utils.swap_tensors`` on a packed model's first tensor, or ``model.to(float64)``
    under ``torch.__future__.set_swap_module_params_on_conversion(True)``, works and later
    merges follow torch. (A first version of layouts kept apart from the tensors keyed them
    by a weak reference to the first tensor, and swap_tensors refuses a tensor with one:
    ``RuntimeError: Cannot swap t1 because it has weakref associated with it``.)"""
    model = three_linear()
    ms = ModelState.new(model).pack()
    ema = ms.clone()
    for _ in range(3):
        ema.merge(ms, merges.ema(0.5))
    if how == "swap_tensors":
        torch.utils.swap_tensors(model[0].weight, nn.Parameter(torch.randn(3, 3)))
    else:
        previous = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            model.to(torch.float64)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(previous)
    want = lerp_reference(snapshot(ema), model.state_dict(), 0.5)
    ema.merge(ms, merges.ema(0.5))
    assert_equal_state(snapshot(ema), want)


# =========================================================================== fine


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].num_batches_tracked.fill_(5)
    return model


def outcome(call) -> tuple[str, Any]:
    try:
        return "ok", snapshot(call())
    except (KeyError, ValueError, TypeError) as err:
        return "refused", type(err)


def lerp_reference(lhs: dict[str, Tensor], rhs: dict[str, Tensor], t: float) -> dict[str, Tensor]:
    out = {}
    for key, value in lhs.items():
        other = rhs.get(key)
        if other is None:
            out[key] = value
        elif value.is_floating_point():
            out[key] = torch.lerp(value, other.detach().to(value.dtype), t)
        else:
            out[key] = other.detach().to(value.dtype).clone()
    return out


def merge_step(model: nn.Module, ms: ModelState, ema: ModelState, direction: str, t=0.25):
    """One merge, checked against a fresh state over a deep copy and plain torch lerp."""
    if direction == "ema_from_model":
        ref_lhs = ModelState.new(snapshot(ema))
        ref_rhs: Any = copy.deepcopy(model)
        lhs, rhs = ema, ms
    else:
        ref_lhs = ModelState.new(copy.deepcopy(model))
        ref_rhs = ModelState.new(snapshot(ema))
        lhs, rhs = ms, ema
    lhs_before, rhs_before = snapshot(lhs), snapshot(rhs)
    want = outcome(lambda: ref_lhs.merge(ref_rhs, merges.lerp(t)))
    got = outcome(lambda: lhs.merge(rhs, merges.lerp(t)))
    assert got[0] == want[0], (got, want)
    if got[0] == "refused":
        assert got[1] is want[1]
        assert_equal_state(snapshot(lhs), lhs_before)
        return
    assert_equal_state(got[1], want[1])
    # Plain torch, per stored key (a tie destination follows its source, merged once).
    stored = set(lhs.state_dict())
    plain = lerp_reference(lhs_before, rhs_before, t)
    assert_equal_state(
        {k: v for k, v in got[1].items() if k in stored},
        {k: v for k, v in plain.items() if k in stored},
    )
    assert_equal_state(snapshot(rhs), rhs_before)


def update_step(model: nn.Module, ms: ModelState, values: dict[str, Tensor]):
    """One update, checked against a fresh state over a deep copy and the values cast."""
    ref = ModelState.new(copy.deepcopy(model))
    before = snapshot(ms)
    given = {k: v.detach().clone() for k, v in values.items()}  # values may view the model
    want = outcome(lambda: ref.update(values))
    got = outcome(lambda: ms.update(values))
    assert got[0] == want[0], (got, want)
    if got[0] == "refused":
        assert got[1] is want[1]
        assert_equal_state(snapshot(ms), before)
        return
    assert_equal_state(got[1], want[1])
    for key, value in given.items():
        target = got[1][key]
        assert torch.equal(target, value.to(target.dtype)), key


def random_values(model: nn.Module) -> dict[str, Tensor]:
    return {
        k: torch.randn(v.shape) if v.is_floating_point() else torch.randint(0, 9, v.shape)
        for k, v in model.state_dict().items()
    }


def _swap_new(m):
    torch.utils.swap_tensors(m[0].weight, nn.Parameter(torch.randn(3, 3)))


def _swap_two(m):
    torch.utils.swap_tensors(m[0].weight, m[2].weight)


def _set_other_storage(m):
    with torch.no_grad():
        m[0].weight.set_(torch.randn(20).untyped_storage(), 2, (3, 3), (3, 1))


def _set_storage_slice(m):
    # A non-resizable storage over new memory, same shape and strides.
    with torch.no_grad():
        m[0].weight.set_(torch.randn(20).untyped_storage()[8:], 0, (3, 3), (3, 1))


def _as_strided(m):
    with torch.no_grad():
        m[0].weight.as_strided_((3, 3), (1, 3))


def _parametrize(m):
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    parametrize.register_parametrization(m[0], "weight", Double())


def _dict_write(m):
    m[0]._parameters["weight"] = nn.Parameter(torch.randn(3, 3))


def _del_readd_same(m):
    weight = m[0].weight
    del m[0].weight
    m[0].weight = weight  # now after bias in module order


def _del_readd_new(m):
    del m[0].weight
    m[0].weight = nn.Parameter(torch.randn(3, 3))


def _half_float(m):
    m.half()
    m.float()


def _storage_resize_back(m):
    storage = m[1].running_mean.untyped_storage()
    size = storage.nbytes()
    storage.resize_(0)
    storage.resize_(size)
    with torch.no_grad():
        m[1].running_mean.normal_()


MUTATIONS = {
    "swap_tensors_new": _swap_new,
    "swap_tensors_two_params": _swap_two,
    "set_other_storage": _set_other_storage,
    "set_storage_slice": _set_storage_slice,
    "as_strided_transposed": _as_strided,
    "register_parametrization": _parametrize,
    "parameters_dict_write": _dict_write,
    "del_readd_same": _del_readd_same,
    "del_readd_new": _del_readd_new,
    "half_then_float": _half_float,
    "storage_freed_and_regrown": _storage_resize_back,
}


@pytest.mark.parametrize("layout", ["plain", "packed"])
@pytest.mark.parametrize("direction", ["ema_from_model", "model_from_ema", "update"])
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_fine_model_changes_after_warm_up(mutation, direction, layout):
    model = bn_model()
    ms = ModelState.new(model)
    if layout == "packed":
        ms.pack()
    ema = ms.clone()
    with torch.no_grad():
        for t in ema.to_dict().values():
            if t.is_floating_point():
                t.normal_()
    for _ in range(3):
        if direction == "update":
            update_step(model, ms, random_values(model))
        else:
            merge_step(model, ms, ema, direction)
    MUTATIONS[mutation](model)
    for _ in range(3):
        if direction == "update":
            update_step(model, ms, random_values(model))
        else:
            merge_step(model, ms, ema, direction)
    if mutation == "del_readd_same":
        assert list(ms.to_dict()) == list(model.state_dict())


@pytest.mark.parametrize("direction", ["ema_from_model", "model_from_ema", "update"])
@pytest.mark.parametrize("tie", ["identity", "transpose"])
def test_fine_a_tie_added_between_warm_calls(tie, direction):
    model = bn_model()
    ms = ModelState.new(model)
    ema = ms.clone()
    other = ModelState.new(model)  # a second view that did not make the tie

    def step(state: ModelState) -> None:
        if direction == "update":
            values = random_values(model)
            if "2.weight" in state.ties():
                del values["2.weight"]
            update_step(model, state, values)
        else:
            merge_step(model, state, ema, direction)

    for _ in range(3):
        step(ms)
        step(other)
    ms.tie("2.weight", "0.weight", None if tie == "identity" else "transpose")
    for _ in range(3):
        step(ms)
        step(other)


@pytest.mark.parametrize("direction", ["ema_from_model", "model_from_ema", "update"])
def test_fine_channels_last_after_warm_up(direction):
    model = conv_model()
    ms = ModelState.new(model)
    ema = ms.clone()
    for step in range(6):
        if step == 3:
            model.to(memory_format=torch.channels_last)
            assert not model[0].weight.is_contiguous()
        if direction == "update":
            values = random_values(model)
            if step == 5:  # channels_last values too
                values = {
                    k: v.to(memory_format=torch.channels_last) if v.dim() == 4 else v
                    for k, v in values.items()
                }
            update_step(model, ms, values)
        else:
            merge_step(model, ms, ema, direction)


@pytest.mark.parametrize("direction", ["ema_from_model", "model_from_ema", "update"])
def test_fine_requires_grad_toggles_with_inference_and_no_grad(direction):
    model = bn_model()
    ms = ModelState.new(model)
    ema = ms.clone()
    contexts = [nullcontext, torch.inference_mode, torch.no_grad]
    for step in range(15):
        if step % 3 == 0:
            model[0].weight.requires_grad_(not model[0].weight.requires_grad)
        with contexts[step % 3]():
            if direction == "update":
                update_step(model, ms, random_values(model))
            else:
                merge_step(model, ms, ema, direction)


def test_fine_a_model_made_in_inference_mode_with_requires_grad_toggled():
    """Inference tensors: written only inside inference mode, warm there too; refused
    outside with nothing written; a requires_grad toggle inside does not change that."""
    with torch.inference_mode():
        model = bn_model()
    ms = ModelState.new(model)
    with torch.inference_mode():
        ema = ms.clone()
        for _ in range(3):
            merge_step(model, ms, ema, "model_from_ema")
        model.requires_grad_(False)
        for _ in range(3):
            merge_step(model, ms, ema, "model_from_ema")
            update_step(model, ms, random_values(model))
    for _ in range(2):  # outside: refused, as cold, with nothing written
        before = snapshot(ms)
        with pytest.raises(ValueError, match="inference tensor"):
            ms.merge(ema, merges.lerp(0.5))
        with pytest.raises(ValueError, match="inference tensor"):
            ms.update(random_values(model))
        assert_equal_state(snapshot(ms), before)


def test_fine_values_made_in_inference_mode():
    model = bn_model()
    ms = ModelState.new(model)
    for step in range(6):
        context = torch.inference_mode() if step % 2 else nullcontext()
        with context:
            values = random_values(model)
        update_step(model, ms, values)


def test_fine_rhs_state_dies_and_a_new_one_takes_its_place():
    """A rhs dict state merged three times, dropped, and a new one (maybe at the same
    address) built: every merge follows plain torch."""
    import gc

    ema = ModelState.new(nn.Linear(3, 3)).clone()
    for _ in range(5):
        values = {"weight": torch.randn(3, 3), "bias": torch.randn(3)}
        rhs = ModelState.new(values)
        for _ in range(3):
            want = lerp_reference(snapshot(ema), values, 0.5)
            ema.merge(rhs, merges.ema(0.5))
            assert_equal_state(snapshot(ema), want)
        del rhs, values
        gc.collect()


def test_fine_standalone_state_whose_source_dict_is_mutated():
    source = {"w": torch.randn(3), "v": torch.randn(2)}
    state = ModelState.new(source)
    for _ in range(3):
        state.update({"w": torch.randn(3), "v": torch.randn(2)})
    source["w"] = torch.zeros(5)
    source["extra"] = torch.ones(1)
    del source["v"]
    assert list(state.to_dict()) == ["w", "v"]
    for _ in range(3):
        values = {"w": torch.randn(3), "v": torch.randn(2)}
        state.update(values)
        assert_equal_state(snapshot(state), values)
    assert torch.equal(source["w"], torch.zeros(5))


def test_fine_update_values_that_are_views_of_each_other_and_of_the_destination():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    ms = ModelState.new(model)
    for _ in range(3):
        update_step(model, ms, {"weight": torch.randn(4, 4), "bias": torch.randn(4)})
    for _ in range(3):
        shared = torch.randn(4, 4)
        update_step(model, ms, {"weight": shared, "bias": shared[1]})
    for _ in range(3):
        w = model.weight.detach()
        update_step(model, ms, {"weight": w.t(), "bias": w[:, 0]})
    for _ in range(3):
        w = model.weight.detach()
        update_step(model, ms, {"weight": w.view(2, 8).view(4, 4), "bias": model.bias.flip(0)})


def test_fine_the_same_dict_mutated_in_place_between_calls():
    model = bn_model()
    ms = ModelState.new(model)
    values = random_values(model)
    for _ in range(3):
        update_step(model, ms, values)
    changes = [
        lambda: values.__setitem__("0.weight", torch.randn(3, 3, dtype=torch.float64)),
        lambda: values.__setitem__("0.weight", torch.randn(2, 3)),  # refused
        lambda: values.__setitem__("0.weight", torch.randn(3, 3, device="meta")),  # refused
        lambda: values.__setitem__("0.weight", torch.randn(3, 3).t()),
        lambda: values.__setitem__("0.weight", torch.randn(3, 3, dtype=torch.bfloat16)),
        lambda: values.__setitem__("1.num_batches_tracked", torch.tensor(3.7)),
    ]
    for change in changes:
        change()
        for _ in range(2):
            update_step(model, ms, values)


@pytest.mark.parametrize(
    "fun",
    [
        merges.lerp(0.3),
        merges.ema(0.9),
        merges.add(0.5),
        merges.sub(),
        merges.replace(),
        merges.add(1.0, nonfloat="lhs"),
    ],
    ids=repr,
)
def test_fine_named_merges_over_training_steps(fun):
    model = bn_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ms = ModelState.new(model)
    ema = ms.clone()
    for step in range(6):
        loss = model(torch.randn(4, 3)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 3:
            model.half()
        lhs, rhs = snapshot(ema), snapshot(ms)
        want = {k: fun(k.split("."), v, rhs[k]) for k, v in lhs.items()}
        ema.merge(ms, fun)
        assert_equal_state(snapshot(ema), want)
        if step == 3:
            model.float()


def test_fine_a_custom_merge_function():
    model = bn_model()
    ms = ModelState.new(model)
    ema = ms.clone()

    def average(path, lhs, rhs):
        return (lhs + rhs.to(lhs.dtype)) / 2 if lhs.is_floating_point() else rhs.clone()

    for step in range(6):
        if step == 3:
            model.double()
        want = {k: average(None, v, ms[k]) for k, v in snapshot(ema).items()}
        ema.merge(ms, average)
        assert_equal_state(snapshot(ema), want)


def test_fine_a_compiled_model():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train()
    compiled = torch.compile(model, backend="eager")
    ema = ModelState.new(compiled).clone()
    x = torch.randn(4, 3)
    for step in range(6):
        if step == 3:
            model[0] = nn.Linear(3, 3)
        compiled(x)
        want = lerp_reference(snapshot(ema), model.state_dict(), 0.5)
        ema.merge(compiled, merges.ema(0.5))
        assert_equal_state(snapshot(ema), want)
        values = {"0.weight": torch.randn(3, 3)}
        ModelState.new(compiled).update(values)
        assert torch.equal(model[0].weight.detach(), values["0.weight"])
