"""ms.pack() in use: what a user relies on holds for a packed model too.

Each test compares a packed model against an unpacked twin (or plain torch). The first
section holds the findings of a review of packing (each failed before its fix; the three
that packing cannot change, since packed tensors are views of one buffer, are strict xfails
documented in the README); the second, uses that were right already.
"""

from __future__ import annotations

import copy
import gc
import io
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import torch_modelstate as tms
from torch_modelstate import ModelState, _pack, merges


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


class _BufferFirst(nn.Module):
    """A model whose first stored tensor is a buffer (a plain Tensor, not a Parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(3))
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * self.scale)


def _tensors(ms: ModelState) -> list[torch.Tensor]:
    return [leaf.tensor for leaf in ms._idx().leaves]


def _snapshot(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in d.items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# =========================================================================== findings of the review


@pytest.mark.parametrize("how", ["update", "merge"])
def test_fast_path_matches_groups_by_size_not_by_members(how: str) -> None:
    """Two packings are one layout only member for member, not by group sizes and shapes.

    lhs: a f32, b f64, c f32, d f64  -> groups f32:[a, c], f64:[b, d]
    rhs: a f32, b f32, c f64, d f64  -> groups f32:[a, b], f64:[c, d]
    The unpacked result (b == 2, c == 3); before the fix the f32 buffers were copied onto
    each other (lhs.c got rhs.b, lhs.b got rhs.c), silently.
    """
    f32, f64 = torch.float32, torch.float64
    lhs = ModelState.new(
        {k: torch.zeros(2, dtype=dt) for k, dt in zip("abcd", (f32, f64, f32, f64), strict=True)}
    ).pack()
    rhs = ModelState.new(
        {
            k: torch.full((2,), float(i + 1), dtype=dt)
            for i, (k, dt) in enumerate(zip("abcd", (f32, f32, f64, f64), strict=True))
        }
    ).pack()
    if how == "update":
        lhs.update(rhs)
    else:
        lhs.merge(rhs, merges.lerp(1.0))
    got = {k: v.tolist() for k, v in lhs.to_dict().items()}
    assert got == {"a": [1.0, 1.0], "b": [2.0, 2.0], "c": [3.0, 3.0], "d": [4.0, 4.0]}


@pytest.mark.parametrize("convert", ["half", "double"])
def test_moving_a_packed_model_with_buffers_frees_its_old_buffer(convert: str) -> None:
    """README: "a packed model moved by .half() or .to() frees its old memory", with
    buffers too. `.half()` replaces the buffer objects; the old ones are referenced by the
    index kept with the model until the next view drops it (README, How it works), and
    nothing else holds them. (Before: the layout held them too, and they viewed the whole
    model-sized buffer, for as long as the model lived.)
    """
    model = _model()
    ModelState.new(model).pack()
    old = StorageWeakRef(model[0].weight.untyped_storage())
    getattr(model, convert)()
    ModelState.new(model).to_dict()  # the next view: the index kept with the model renews
    gc.collect()
    assert old.expired()


def test_deleting_a_packed_clone_frees_it_without_waiting_for_gc() -> None:
    """`del ema` frees a packed clone's memory at once, as an unpacked one's (refcounting;
    on a GPU users rely on it before `torch.cuda.empty_cache()`). Before: the layout on the
    first tensor held every tensor, a cycle that waited for the cyclic collector.
    """
    results = []
    gc.collect()
    gc.disable()
    try:
        for packed in (False, True):
            ms = ModelState.new(_model())
            if packed:
                ms.pack()
            ema = ms.clone()
            ref = StorageWeakRef(ema["0.weight"].untyped_storage())
            del ema
            results.append(ref.expired())
    finally:
        gc.enable()
        gc.collect()
    assert results == [True, True]


def test_deepcopy_of_a_packed_clone() -> None:
    """`copy.deepcopy(ema)` / `copy.deepcopy(ema.to_dict())` of a clone of a packed state
    deep-copies. Before: TypeError (cannot pickle TensorGuards): the layout sat in the first
    tensor's __dict__."""
    ema = ModelState.new(_model()).pack().clone()
    copied = copy.deepcopy(ema.to_dict())
    _assert_same(copied, ema.to_dict())
    state = copy.deepcopy(ema)
    _assert_same(state.to_dict(), ema.to_dict())


def test_torch_save_of_a_packed_clone_round_trips_with_weights_only() -> None:
    """`torch.save(ema.to_dict(), f)` then `torch.load(f, weights_only=True)` gives the
    values back: the tensors carry nothing of the library. Before: TypeError at save."""
    ema = ModelState.new(_model()).pack().clone()
    buf = io.BytesIO()
    torch.save(ema.to_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    _assert_same(loaded, ema.to_dict())


@pytest.mark.parametrize(
    "save",
    [
        pytest.param(lambda m: torch.save(m, io.BytesIO()), id="torch.save(model)"),
        pytest.param(lambda m: pickle.dumps(m), id="pickle.dumps(model)"),
        pytest.param(lambda m: torch.save(list(m.parameters()), io.BytesIO()), id="params"),
        pytest.param(
            lambda m: torch.save(m.state_dict(keep_vars=True), io.BytesIO()), id="keep_vars"
        ),
    ],
)
def test_pickling_a_packed_model(save: Callable[[nn.Module], object]) -> None:
    """Pickling a packed model (torch.save(model), mp.spawn arguments), its parameters, or
    `state_dict(keep_vars=True)` works, as unpacked. Before: TypeError (the first
    parameter's __dict__ held the layout)."""
    model = _model()
    ModelState.new(model).pack()
    save(model)


def test_deepcopy_of_a_packed_model_whose_first_tensor_is_a_buffer() -> None:
    """`copy.deepcopy(model)` of a packed model whose first state entry is a buffer works.
    Before: TypeError (a plain tensor's deepcopy copies its __dict__, which held the layout).
    """
    model = _BufferFirst()
    ModelState.new(model).pack()
    twin = copy.deepcopy(model)
    _assert_same(twin.state_dict(), model.state_dict())


@pytest.mark.xfail(
    strict=True,
    reason="LIMITATION (documented in the README, Packing): packed tensors are views of one buffer",
)
def test_torch_save_of_one_layer_of_a_packed_model_saves_only_that_layer() -> None:
    """`torch.save(model.head.state_dict(), f)`: saving one layer (a head, an adapter).

    Unpacked: about the size of that layer (~6 KB here). Packed: ~269 KB, since every value
    views the group's buffer and torch.save writes whole storages. A cost of packing
    (README, "Packing"): save with tms.save or save_file, which write each tensor's bytes.
    """
    sizes = []
    for packed in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 4))
        if packed:
            ModelState.new(model).pack()
        buf = io.BytesIO()
        torch.save(model[1].state_dict(), buf)
        sizes.append(len(buf.getvalue()))
    assert sizes[1] < 2 * sizes[0], sizes


@pytest.mark.xfail(
    strict=True,
    reason="LIMITATION (documented in the README, Packing): packed tensors are views of one buffer",
)
def test_safetensors_save_model_of_a_packed_model() -> None:
    """`safetensors.torch.save_model(model, path)` refuses a packed model ("None is covering
    the entire storage": it sees every packed tensor as sharing one storage). A cost of
    packing (README, "Packing"): tms.save(model, path) and save_file(model.state_dict())
    work (`test_saving_a_packed_model_round_trips`).
    """
    pytest.importorskip("safetensors")
    from safetensors.torch import load_model, save_model

    model = _model()
    ModelState.new(model).pack()
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "m.safetensors"
    save_model(model, str(path))
    twin = _model()
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    load_model(twin, str(path))
    _assert_same(twin.state_dict(), model.state_dict())


def test_pack_under_inference_mode_leaves_a_trainable_model() -> None:
    """`ms.pack()` inside `torch.inference_mode()` leaves normal tensors: the model still
    trains. Before: every parameter silently became an inference tensor."""
    model = _model()
    with torch.inference_mode():
        ModelState.new(model).pack()
    assert not model[0].weight.is_inference()
    model(torch.randn(5, 3)).sum().backward()


def test_pack_keeps_channels_last() -> None:
    """A model put in channels_last keeps its strides when packed (a dense tensor's slice
    has the tensor's own strides). Before: every slice was contiguous (NCHW)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)).to(
        memory_format=torch.channels_last
    )
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    strides = [p.stride() for p in model.parameters()]
    ModelState.new(model).pack()
    assert [p.stride() for p in model.parameters()] == strides


@pytest.mark.xfail(
    strict=True,
    reason="LIMITATION (documented in the README, Packing): packed tensors are views of one buffer",
)
def test_resize_of_a_packed_buffer_does_not_overwrite_its_neighbour() -> None:
    """A buffer grown in place (`buf.resize_(n)`, as history/queue buffers are).

    Unpacked, it gets memory of its own. Packed, it is a view into the flat buffer with room
    after it, so resize_ grows it in place over the next tensor, as for any view. A cost of
    packing (README, "Packing"): resize before pack, or assign a new tensor.
    """
    model = _BufferFirst()
    model.register_buffer("shift", torch.zeros(3))  # packed after `scale`, in its group
    ModelState.new(model).pack()
    model.scale.resize_(6)
    model.scale.fill_(7.0)
    assert torch.equal(model.shift, torch.zeros(3))


def test_a_channels_last_packed_merge_runs_flat_with_the_unpacked_values() -> None:
    """The slices keep channels_last, the clone repeats them, and an EMA step between the
    packed model and its packed clone runs on the flat buffers with the unpacked result."""
    results = []
    for packed in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).to(
            memory_format=torch.channels_last
        )
        ms = ModelState.new(model)
        if packed:
            ms.pack()
        ema = ms.clone()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        for _ in range(3):
            ema.merge(ms, merges.ema(0.5))
        if packed:
            lhs, rhs = _tensors(ema), _tensors(ms)
            assert _pack.flat_pairs(lhs, rhs) is not None
            assert ema["0.weight"].stride() == model[0].weight.stride()
        results.append(_snapshot(ema.to_dict()))
    _assert_same(results[0], results[1])


def test_pack_refuses_inference_tensors_and_changes_nothing() -> None:
    """A model made under inference mode holds inference tensors: packing would make them
    normal ones, so pack refuses, naming the key, and leaves every tensor as it was."""
    with torch.inference_mode():
        model = nn.Linear(3, 2)
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"(?s)`weight`.*inference tensor"):
        ModelState.new(model).pack()
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(p.is_inference() for p in model.parameters())


def test_the_layouts_of_dead_packed_states_are_dropped_at_the_next_pack() -> None:
    """The table of layouts holds no tensor; an entry whose buffer died goes at the next
    pack, so cloning packed states over and over keeps no memory."""
    ms = ModelState.new(_model()).pack()
    for _ in range(5):
        ema = ms.clone()
        del ema
    ModelState.new(_model()).pack()
    live = [key for key, (ref, _) in _pack._LAYOUTS.items() if not ref.expired()]
    assert len(_pack._LAYOUTS) == len(live)
    assert _pack.layout_of(_tensors(ms)) is not None


def test_pack_error_names_the_tensor_that_cannot_be_packed() -> None:
    """pack() of a model with a sparse buffer: a ValueError naming the key (`s`) and why.
    Before: "got: a Tensor"."""
    model = nn.Linear(3, 4)
    model.register_buffer("s", torch.zeros(3).to_sparse())
    with pytest.raises(ValueError) as err:
        ModelState.new(model).pack()
    assert "`s`" in str(err.value) or "sparse" in str(err.value), str(err.value)


def test_pack_of_a_quantized_buffer_is_a_clear_value_error() -> None:
    """pack() of a model with a quantized (qint8) buffer: ValueError, nothing changed.
    Before: torch's RuntimeError "INTERNAL ASSERT FAILED ... UnknownQuantizer"."""
    model = nn.Linear(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated in torch
        q = torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8)
    model.register_buffer("q", q)
    ptr = model.weight.data_ptr()
    with pytest.raises(ValueError):
        ModelState.new(model).pack()
    assert model.weight.data_ptr() == ptr


# =========================================================================== right already


@pytest.mark.parametrize(
    ("opt_name", "options"),
    [
        ("SGD", {"lr": 0.1, "momentum": 0.9, "foreach": True}),
        ("SGD", {"lr": 0.1, "momentum": 0.9, "foreach": False}),
        ("AdamW", {"lr": 0.01, "foreach": True}),
        ("AdamW", {"lr": 0.01, "foreach": False, "fused": False}),
    ],
)
def test_training_with_ema_equals_unpacked(opt_name: str, options: dict) -> None:
    """Optimizer steps + zero_grad + an EMA merge each step: identical to an unpacked twin."""
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    results = []
    for packed in (True, False):
        model = _model()
        ms = ModelState.new(model)
        if packed:
            ms.pack()
        ema = ms.clone()
        opt = getattr(torch.optim, opt_name)(model.parameters(), **options)
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            assert all(p.grad.shape == p.shape for p in model.parameters())
            opt.step()
            ema.merge(ms, merges.ema(0.9))
        results.append((_snapshot(model.state_dict()), _snapshot(ema.to_dict())))
    _assert_same(results[0][0], results[1][0])
    _assert_same(results[0][1], results[1][1])


def test_compile_eager_forward_backward_equals_unpacked() -> None:
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    results = []
    for packed in (True, False):
        model = _model()
        if packed:
            ModelState.new(model).pack()
        out = torch.compile(model, backend="eager")(x)
        out.sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_deepcopy_of_a_packed_model_is_independent() -> None:
    """deepcopy (first entry a Parameter): the copy shares no memory with the original, and
    merges in either direction give the plain-torch values."""
    model = _model()
    ms = ModelState.new(model).pack()
    twin = copy.deepcopy(model)
    ptrs = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert ptrs.isdisjoint(t.untyped_storage().data_ptr() for t in twin.state_dict().values())
    original = _snapshot(model.state_dict())
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(10.0)
    _assert_same(model.state_dict(), original)
    ema = ms.clone()
    ema.merge(twin, merges.ema(0.5))
    expected = {
        k: v.lerp(twin.state_dict()[k], 0.5) if v.is_floating_point() else twin.state_dict()[k]
        for k, v in original.items()
    }
    _assert_same(_snapshot(ema.to_dict()), expected)
    ms.merge(twin, merges.lerp(1.0))
    _assert_same(_snapshot(model.state_dict()), _snapshot(twin.state_dict()))


@pytest.mark.parametrize(
    "change", ["double", "half", "assign", "data_clone", "set_", "register_buffer"]
)
def test_replacing_tensors_after_pack_gives_unpacked_results(change: str) -> None:
    """After facts are kept (two merges), replacing tensors then merging/updating again gives
    exactly what the unpacked twin gives."""
    results = []
    for packed in (True, False):
        model = _model()
        ms = ModelState.new(model)
        if packed:
            ms.pack()
        ema = ms.clone()
        ema.merge(ms, merges.ema(0.5))
        ema.merge(ms, merges.ema(0.5))
        with torch.no_grad():
            if change == "double":
                model.double()
            elif change == "half":
                model.half()
            elif change == "assign":
                sd = {k: v + 1 if v.is_floating_point() else v + 2
                      for k, v in model.state_dict().items()}  # fmt: skip
                model.load_state_dict(sd, assign=True)
            elif change == "data_clone":
                model[0].weight.data = model[0].weight.data.clone() * 3
            elif change == "set_":
                model[0].bias.set_(torch.full((4,), 8.0))
            else:
                model[0].register_buffer("extra", torch.ones(2))
            for p in model.parameters():
                p.add_(0.5)
        fresh = ModelState.new(model)
        ema.merge(fresh, merges.ema(0.5))
        ema.merge(fresh, merges.ema(0.5))
        if change != "register_buffer":  # ema has no `0.extra`: update would be a KeyError
            ema.update(fresh)
        ema.merge(fresh, merges.lerp(0.3))
        results.append((_snapshot(ema.to_dict()), _snapshot(model.state_dict())))
    _assert_same(results[0][0], results[1][0])
    _assert_same(results[0][1], results[1][1])


def test_tied_lm_and_tie_untie_after_pack_equal_unpacked() -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.ln = nn.LayerNorm(4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    results = []
    for packed in (True, False):
        torch.manual_seed(0)
        lm = LM()
        ms = ModelState.new(lm)
        if packed:
            ms.pack()
        ema = ms.clone()
        assert ema.ties() == {"head.weight": "emb.weight"}
        with torch.no_grad():
            lm.emb.weight.mul_(2)
        ema.merge(ms, merges.ema(0.5))
        ms.untie("head.weight")
        with torch.no_grad():
            lm.head.weight.add_(1)
        ema.merge(ms, merges.ema(0.5))
        results.append((_snapshot(ema.to_dict()), _snapshot(lm.state_dict())))
    _assert_same(results[0][0], results[1][0])
    _assert_same(results[0][1], results[1][1])


def test_frozen_training_equals_unpacked() -> None:
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    results = []
    for packed in (True, False):
        model = _model()
        ms = ModelState.new(model)
        if packed:
            ms.pack()
        ms.freeze("1.**")
        ema = ms.clone()
        opt = torch.optim.SGD(ms.trainable_parameters().values(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
            ema.merge(ms, merges.ema(0.9))
        results.append((_snapshot(ema.to_dict()), _snapshot(model.state_dict())))
    _assert_same(results[0][0], results[1][0])
    _assert_same(results[0][1], results[1][1])


def test_merge_between_packed_and_unpacked_and_pack_twice() -> None:
    target = _model()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    expected = _snapshot(target.state_dict())
    model = _model()
    ms = ModelState.new(model).pack()
    ema = ms.clone()
    ms.pack()  # twice: a new layout of the same signature
    ms.merge(target, merges.lerp(1.0))
    _assert_same(_snapshot(model.state_dict()), expected)
    ema.merge(ms, merges.lerp(1.0))
    _assert_same(_snapshot(ema.to_dict()), expected)
    plain = ModelState.new(_model())
    plain.merge(ms, merges.lerp(1.0))
    _assert_same(_snapshot(plain.to_dict()), expected)


def test_saving_a_packed_model_round_trips() -> None:
    """tms.save/load, safetensors save_file(state_dict) and torch.save(state_dict) with
    weights_only=True: same values, and no larger on disk than unpacked."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    model = _model()
    ms = ModelState.new(model).pack()
    d = Path(tempfile.mkdtemp())
    tms.save(ms, d / "a.safetensors")
    _assert_same(_snapshot(tms.load(d / "a.safetensors").to_dict()), _snapshot(model.state_dict()))
    twin = _model()
    ModelState.new(twin).pack()
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    tms.load(d / "a.safetensors", into=twin)
    _assert_same(twin.state_dict(), model.state_dict())
    save_file(model.state_dict(), str(d / "b.safetensors"))
    loaded = load_file(str(d / "b.safetensors"))  # in sorted key order
    _assert_same({k: loaded[k] for k in model.state_dict()}, model.state_dict())
    packed_buf, plain_buf = io.BytesIO(), io.BytesIO()
    torch.save(model.state_dict(), packed_buf)
    torch.save(_model().state_dict(), plain_buf)
    assert len(packed_buf.getvalue()) <= len(plain_buf.getvalue())
    packed_buf.seek(0)
    _assert_same(torch.load(packed_buf, weights_only=True), model.state_dict())


def test_pack_refuses_a_partly_meta_model_and_changes_nothing() -> None:
    model = _model()
    with torch.device("meta"):
        model.add_module("3", nn.Linear(2, 2))
    ptrs = [p.data_ptr() for p in model[:3].parameters()]
    with pytest.raises(ValueError, match="pack"):
        ModelState.new(model).pack()
    assert [p.data_ptr() for p in model[:3].parameters()] == ptrs
    assert _pack.layout_of(_tensors(ModelState.new(model))) is None
