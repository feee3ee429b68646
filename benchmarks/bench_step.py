"""Per-step costs of issue 11, every row with its floor measured in the same run.

Run from the repository root (a script, not a test):

    python benchmarks/bench_step.py            # the full table (a few minutes on 2 cores)
    python benchmarks/bench_step.py --quick    # smoke run: tiny sizes, few repeats

Every time is the median of `--repeats` timed runs after a warm-up; the cases of one row
(ours and its floor) are interleaved run by run, so drift on a busy machine hits both alike
and the ratio is fair. Rows:

- EMA step of a many-small model (4000 x 64x64 fp32 + 100 BatchNorm1d: 4500 tensors),
  ``ema.merge(ms, merges.ema(d))``: with the view made once; with ``ModelState.new(model)``
  each step; the same after a buffer is assigned in an unrelated module every step; and
  between a packed model and its packed clone; with `requires_grad` toggled every step
  (kept facts rebuilt each time) against the same with nothing kept. Floors: a raw
  ``_foreach_lerp_`` over precomputed float lists plus ``_foreach_copy_`` of the integer
  buffers; one flat ``lerp_`` over the same bytes (for the packed row).
- ``ms.update(state_dict)`` of 4000 tiny 4x4 tensors against a raw ``_foreach_copy_``.
- fp32 EMA of a bf16 LM-shaped model against raw ``_foreach_mul_`` + ``_foreach_add_``
  (mixed dtypes in one call): time, and extra peak memory of one step. Memory is measured
  in a fresh process per method: ``/proc/self/clear_refs`` resets the high-water mark to
  the current RSS before the step, the figure is ``VmHWM`` after it minus ``VmRSS`` before.
- standalone ``tms.load(path)`` against ``load_file`` (both touching every page), and the
  CLI ``merge`` of 3 inputs against a hand script (time in this process; memory figures
  are in ``benchmarks/bench_merge.py``).
- peers: ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True)``
  and timm ``ModelEmaV3`` when importable.
- floors of a sound reused plan (`sound_checks`): the raw op plus the checks that no
  reuse of a plan between calls can skip, written with torch primitives only, so that
  "ours against that floor" shows what the library adds on top of them.
- scaling: µs per tensor of the EMA step and of update at 400 / 4000 / 40,000 tensors, and
  what each costs over its raw op per tensor (which must not grow with the count).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import operator
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch_modelstate as tms  # noqa: E402
from torch_modelstate import ModelState, merges  # noqa: E402

Fn = Callable[[], object]
DECAY = 0.999

# --------------------------------------------------------------------------- models


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 64))


class ManySmallBN(nn.Module):
    """`n` weights of 64x64 fp32 and `bn` BatchNorm1d(64) (5 tensors each)."""

    def __init__(self, n: int, bn: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Small() for _ in range(n))
        self.norms = nn.ModuleList(nn.BatchNorm1d(64) for _ in range(bn))


class Tiny(nn.Module):
    """`n` parameters of 4x4, in modules of 10."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ParameterList(nn.Parameter(torch.randn(4, 4)) for _ in range(min(10, n - i)))
            for i in range(0, n, 10)
        )


def lm(vocab: int, hidden: int, mlp: int, blocks: int) -> nn.Module:
    """An LM-shaped stack of bf16 linear weights (no compute), uniform values."""
    with torch.device("meta"):
        layers: list[nn.Module] = [nn.Embedding(vocab, hidden)]
        for _ in range(blocks):
            layers += [nn.Linear(hidden, hidden, bias=False) for _ in range(4)]
            layers += [nn.Linear(hidden, mlp, bias=False) for _ in range(2)]
            layers += [nn.Linear(mlp, hidden, bias=False), nn.LayerNorm(hidden)]
        layers.append(nn.Linear(hidden, vocab, bias=False))
        model = nn.Sequential(*layers)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05)
    return model


# --------------------------------------------------------------------------- timing


def measure(cases: dict[str, Fn], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each case, interleaved run by run (the order rotates)."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {n: statistics.median(t) for n, t in times.items()}


ROWS: list[tuple[str, str, str, str, str]] = []


def row(case: str, ours: str, floor: str, ratio: float | None, goal: float | None) -> None:
    """Record and print one row: ratio and goal as multiples of the floor."""
    met = "" if goal is None or ratio is None else ("met" if ratio <= goal else "NOT met")
    text_ratio = "" if ratio is None else f"{ratio:.2f}x"
    text_goal = "" if goal is None else f"<= {goal:g}x {met}"
    ROWS.append((case, ours, floor, text_ratio, text_goal))
    print(f"| {case} | {ours} | {floor} | {text_ratio} | {text_goal} |", flush=True)


def ms_(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def float_lists(
    a: nn.Module | ModelState, b: nn.Module | ModelState
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    sa, sb = ModelState.new(a).to_dict(), ModelState.new(b).to_dict()
    fa = [sa[k] for k in sa if sa[k].is_floating_point()]
    fb = [sb[k] for k in sa if sa[k].is_floating_point()]
    ia = [sa[k] for k in sa if not sa[k].is_floating_point()]
    ib = [sb[k] for k in sa if not sa[k].is_floating_point()]
    return fa, fb, ia, ib


def raw_ema(fa: list[torch.Tensor], fb: list[torch.Tensor], ia: list[torch.Tensor],
            ib: list[torch.Tensor]) -> Fn:  # fmt: skip
    def step() -> None:
        with torch.no_grad():
            torch._foreach_lerp_(fa, fb, 1 - DECAY)
            if ia:
                torch._foreach_copy_(ia, ib)

    return step


def tensor_guard(tensors: list[torch.Tensor]) -> Any:
    """torch.compile's C++ guard over the dtype, device, shape and strides of `tensors`."""
    from torch._C._dynamo.guards import TensorGuards

    return TensorGuards(
        *tensors,
        dynamic_dims_sizes=[list(t.shape) for t in tensors],
        dynamic_dims_strides=[list(t.stride()) for t in tensors],
    )


def sound_passes(model: nn.Module, sides: list[list[torch.Tensor]]) -> dict[str, Fn]:
    """The checks no sound reuse of a plan can skip, written with torch primitives only.

    Before a write into a live model, something must show that (1) the model still holds
    the tensors planned for (the version of every module's parameter, buffer and child dict
    that holds something, which any change moves, and a count of entries: anything added
    to an empty one; where this Python keeps no dict versions, one identity pass over every
    entry instead), and for each side (2) that no tensor moved (one pass over data
    pointers) and (3) that dtype, device, shape and strides are as checked (one C++ guard
    call: a packed tensor turned by ``t_()`` at the same address is no longer its slice).
    Each is one C-level pass.
    """

    dicts = [
        held
        for module in model.modules()
        for held in (module._parameters, module._buffers, module._modules)
    ]
    size = sum(map(len, dicts))
    full = [held for held in dicts if held]
    try:
        from torch._C._dynamo.guards import dict_version

        versions = list(map(dict_version, full))

        def entries() -> None:
            assert sum(map(len, dicts)) == size
            assert list(map(dict_version, full)) == versions

    except ImportError:
        entries = identity_pass(model)

    passes = {"module entries": entries}
    for i, side in enumerate(sides):
        kept, guard = list(map(torch.Tensor.data_ptr, side)), tensor_guard(side)
        passes[f"pointers {i + 1}"] = lambda s=side, k=kept: assert_(
            list(map(torch.Tensor.data_ptr, s)) == k
        )
        passes[f"guard {i + 1}"] = lambda s=side, g=guard: assert_(g.check(*s))
    return passes


def identity_pass(model: nn.Module) -> Fn:
    """The module-entries check where Python keeps no dict versions: every entry of every
    module dict looked up and compared by identity, and a count of entries."""
    from operator import is_

    dicts = [
        held
        for module in model.modules()
        for held in (module._parameters, module._buffers, module._modules)
    ]
    size = sum(map(len, dicts))
    holders = [held for held in dicts for _ in range(len(held))]
    names = [name for held in dicts for name in held]
    objects = [value for held in dicts for value in held.values()]

    def entries() -> None:
        assert sum(map(len, dicts)) == size
        assert all(map(is_, map(dict.get, holders, names), objects))

    return entries


def full_check_costs(model: nn.Module, repeats: int) -> None:
    """Print what the full checks of one side cost (as the first calls between two views,
    and the calls always checked in full, run them), and the extent pass's share."""
    from torch_modelstate._memory import check_extents
    from torch_modelstate._writable import check_destinations, check_values

    state = ModelState.new(model).to_dict()
    keys, tensors = list(state), list(state.values())
    values = [t.clone() for t in tensors]
    t = measure(
        {
            "destinations": lambda: check_destinations("merge", keys, tensors),
            "values": lambda: check_values("merge", keys, values, tensors, side="rhs"),
            "extents": lambda: check_extents("merge", keys, values, ""),
        },
        repeats,
    )
    print(
        f"the full checks of one side at {len(keys)} tensors: destinations "
        f"{t['destinations'] * 1e3:.2f} ms, values {t['values'] * 1e3:.2f} ms; of each, the pass "
        f"that every tensor lies inside its storage {t['extents'] * 1e3:.2f} ms\n",
        flush=True,
    )


def assert_(ok: bool) -> None:
    assert ok


def sound_checks(model: nn.Module, sides: list[list[torch.Tensor]]) -> Fn:
    """All of `sound_passes`, in order."""
    passes = list(sound_passes(model, sides).values())

    def check() -> None:
        for one in passes:
            one()

    return check


def pass_costs(model: nn.Module, sides: list[list[torch.Tensor]], repeats: int) -> None:
    """Print what each pass of `sound_passes` costs alone (warm in cache)."""
    passes = sound_passes(model, sides)
    passes["(module entries by identity, where no dict versions)"] = identity_pass(model)
    t = measure(passes, repeats)
    shown = ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in t.items())
    print(f"\nthe sound checks' passes, each alone (warm in cache): {shown}\n", flush=True)


def guard_tree(model: nn.Module) -> tuple[Any, tuple[dict[str, Any], ...]] | None:
    """torch.compile's own C++ guard tree over `model`: for every module dict its length,
    and for every entry its identity and, for a tensor, its metadata (dynamo has no guard
    on data pointers). What fusing the checks in torch's C++ would look like; None where
    this torch's private guard API differs."""
    try:
        from torch._C._dynamo.guards import RootGuardManager
        from torch._dynamo.guards import GuardManagerType

        kind = GuardManagerType.GUARD_MANAGER
        dicts = tuple(
            held
            for module in model.modules()
            for held in (module._parameters, module._buffers, module._modules)
        )
        root = RootGuardManager()
        root.add_length_check_guard(len(dicts), ["dicts"], None)
        for i, held in enumerate(dicts):
            one = root.tuple_getitem_manager(i, f"d{i}", held, kind)
            one.add_dict_length_check_guard(len(held), ["len"], None)
            for name, value in held.items():
                entry = one.dict_getitem_manager(name, f"d{i}.{name}", value, kind)
                entry.add_id_match_guard(id(value), ["id"], None)
                if isinstance(value, torch.Tensor):
                    keys = torch._C._dispatch_keys(value)
                    size, stride = list(value.size()), list(value.stride())
                    entry.add_tensor_match_guard(
                        value, size, stride, name, ["t"], None, type(value), keys
                    )
        if not root.check(dicts):
            return None
    except (ImportError, AttributeError, TypeError, RuntimeError):
        return None
    return root, dicts


def guard_tree_cost(model: nn.Module, side: list[torch.Tensor], repeats: int) -> None:
    """Print what torch's C++ guard tree costs against the passes it would replace."""
    built = guard_tree(model)
    if built is None:
        print("torch.compile's guard tree: skipped (this torch's private API differs)\n")
        return
    root, dicts = built
    passes = sound_passes(model, [side])
    t = measure(
        {
            "tree": lambda: assert_(root.check(dicts)),
            "passes": lambda: (passes["module entries"](), passes["guard 1"]()),
        },
        repeats,
    )
    print(
        "torch.compile's own C++ guard tree over the model's module entries and tensor "
        f"metadata (no data pointers): {t['tree'] * 1e3:.2f} ms, against "
        f"{t['passes'] * 1e3:.2f} ms for the passes it would fuse (warm in cache)\n",
        flush=True,
    )


def checked(check: Fn, op: Fn) -> Fn:
    def step() -> None:
        check()
        op()

    return step


# --------------------------------------------------------------------------- rows


def ema_rows(n: int, bn: int, repeats: int) -> None:
    model = ManySmallBN(n, bn)
    unrelated = nn.Module()
    ms = ModelState.new(model)
    ema = ms.clone()
    step = merges.ema(DECAY)
    floor = raw_ema(*float_lists(ema, ms))
    counter = [0]

    def fresh() -> None:
        ema.merge(ModelState.new(model), step)

    def after_buffer() -> None:
        counter[0] += 1
        unrelated.register_buffer("b", torch.zeros(1) + counter[0])
        ema.merge(ModelState.new(model), step)

    lhs, rhs = list(ema.to_dict().values()), list(ms.to_dict().values())
    sound = checked(sound_checks(model, [lhs, rhs]), floor)
    t = measure(
        {
            "once": lambda: ema.merge(ms, step),
            "fresh": fresh,
            "buffer": after_buffer,
            "raw": floor,
            "sound": sound,
        },
        repeats,
    )
    tensors = len(ms)
    label = f"EMA step, {tensors} tensors ({n} x 64x64 + {bn} BatchNorm1d)"
    raw = f"raw foreach {ms_(t['raw'])}"
    row(f"{label}, view made once", ms_(t["once"]), raw, t["once"] / t["raw"], 1.2)
    row("same, `ModelState.new(model)` each step", ms_(t["fresh"]), raw, t["fresh"] / t["raw"], 1.5)
    row(
        "same, after a buffer assignment in an unrelated module",
        ms_(t["buffer"]),
        raw,
        t["buffer"] / t["raw"],
        1.5,
    )
    row(
        "floor of a sound reused plan: raw foreach + the checks it cannot skip (`sound_checks`)",
        ms_(t["sound"]),
        raw,
        t["sound"] / t["raw"],
        None,
    )
    row("ours (view once) against that floor", ms_(t["once"]), ms_(t["sound"]),
        t["once"] / t["sound"], None)  # fmt: skip
    churn_rows(model, ms, ema, step, repeats)
    pass_costs(model, [lhs, rhs], repeats)
    guard_tree_cost(model, rhs, repeats)
    full_check_costs(model, repeats)
    packed_row(model, repeats)
    peer_rows(model, t, repeats)


def churn_rows(
    model: nn.Module, ms: ModelState, ema: ModelState, step: merges.Merge, repeats: int
) -> None:
    """Metadata that changes between every pair of steps (`requires_grad` toggled on one
    tensor): the kept facts fail and are rebuilt each step. Against the same step with
    nothing ever kept (the full checks only, as before kept facts)."""
    from torch_modelstate import _index

    weight = next(model.parameters())
    flag = [True]
    keep = _index.Index.keep_facts

    def toggled() -> None:
        flag[0] = not flag[0]
        weight.requires_grad_(flag[0])
        ema.merge(ms, step)

    def never_kept() -> None:
        _index.Index.keep_facts = lambda self: None  # type: ignore[method-assign]
        try:
            toggled()
        finally:
            _index.Index.keep_facts = keep  # type: ignore[method-assign]

    t = measure({"toggled": toggled, "never": never_kept}, repeats)
    over = (t["toggled"] - t["never"]) / len(ms) * 1e6
    row(
        f"same, `requires_grad` toggled every step: facts rebuilt ({over:.2f} µs/tensor more)",
        ms_(t["toggled"]),
        f"full checks, nothing kept {ms_(t['never'])}",
        t["toggled"] / t["never"],
        None,
    )
    weight.requires_grad_(True)


def packed_row(model: nn.Module, repeats: int) -> None:
    if not hasattr(ModelState, "pack"):
        row("same, packed model and packed clone", "skipped: no ModelState.pack", "", None, 1.3)
        return
    ms = ModelState.new(model)
    ms.pack()
    ema = ms.clone()
    step = merges.ema(DECAY)
    floats = [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
    numel = sum(p.numel() for p in floats)
    flat_a, flat_b = torch.randn(numel), torch.randn(numel)

    def flat() -> None:
        flat_a.lerp_(flat_b, 1 - DECAY)

    sides = [list(ema.to_dict().values()), list(ms.to_dict().values())]
    sound = checked(sound_checks(model, sides), flat)
    t = measure({"packed": lambda: ema.merge(ms, step), "flat": flat, "sound": sound}, repeats)
    row(
        "same, packed model and its packed clone",
        ms_(t["packed"]),
        f"one flat lerp_ {ms_(t['flat'])}",
        t["packed"] / t["flat"],
        1.3,
    )
    row(
        "floor of a sound packed step: one flat lerp_ + the same checks (`sound_checks`)",
        ms_(t["sound"]),
        f"one flat lerp_ {ms_(t['flat'])}",
        t["sound"] / t["flat"],
        None,
    )


def peer_rows(model: nn.Module, ours: dict[str, float], repeats: int) -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
    t = measure({"avg": lambda: avg.update_parameters(model)}, repeats)
    row(
        "peer: AveragedModel(get_ema_multi_avg_fn), same model",
        ms_(t["avg"]),
        f"ours (view once) {ms_(ours['once'])}",
        t["avg"] / ours["once"],
        None,
    )
    try:
        from timm.utils import ModelEmaV3  # type: ignore[import-not-found]
    except ImportError:
        row("peer: timm ModelEmaV3", "skipped: timm not importable", "", None, None)
        return
    ema3 = ModelEmaV3(model, decay=DECAY)
    t = measure({"timm": lambda: ema3.update(model)}, repeats)
    row("peer: timm ModelEmaV3", ms_(t["timm"]), f"ours {ms_(ours['once'])}", None, None)


def update_row(n: int, repeats: int) -> None:
    model = Tiny(n)
    ms = ModelState.new(model)
    src = {k: v.detach().clone() for k, v in model.state_dict().items()}
    current = ms.to_dict()
    dsts = [current[k] for k in src]
    srcs = list(src.values())

    def raw() -> None:
        with torch.no_grad():
            torch._foreach_copy_(dsts, srcs)

    dst_check = sound_checks(model, [dsts])
    value_guard = tensor_guard(srcs)
    dst_storages = {d.untyped_storage().data_ptr() for d in dsts}
    storage_of = torch.Tensor.untyped_storage
    resizable, start = torch.UntypedStorage.resizable, torch.UntypedStorage.data_ptr

    def values_check() -> None:
        # New values each call: their metadata (one guard call), and their memory against
        # the destinations' (storage start pointers, exact for memory torch allocated: one
        # pass to tell that it did, one over the pointers, none of which may be 0: a freed
        # storage) must be looked at every time.
        fresh = list(src.values())
        assert value_guard.check(*fresh)
        storages = list(map(storage_of, fresh))
        assert all(map(resizable, storages))
        starts = list(map(start, storages))
        assert 0 not in starts and dst_storages.isdisjoint(starts)

    sound = checked(dst_check, checked(values_check, raw))
    # What an exact check that every value lies inside its storage would add to the warm
    # path, which already lists the values' storages and their start pointers: the data
    # pointers and the storages' sizes, against each value's (fixed) byte span.
    storages = list(map(storage_of, srcs))
    starts = list(map(start, storages))
    spans = [v.nbytes for v in srcs]
    size_of = torch.UntypedStorage.nbytes

    def extents() -> None:
        ends = map(operator.add, map(operator.sub, map(torch.Tensor.data_ptr, srcs), starts), spans)
        assert not any(map(operator.gt, ends, map(size_of, storages)))

    t = measure(
        {"ours": lambda: ms.update(src), "raw": raw, "sound": sound, "extents": extents},
        repeats,
    )
    over = (t["ours"] - t["raw"]) / n * 1e6
    row(
        f"`update` of {n} tiny 4x4 tensors ({over:.2f} µs/tensor over raw)",
        ms_(t["ours"]),
        f"raw _foreach_copy_ {ms_(t['raw'])}",
        t["ours"] / t["raw"],
        1.5,
    )
    row(
        "floor of a sound update from a dict: raw copy + the checks of the destinations "
        "and of the new values",
        ms_(t["sound"]),
        f"raw _foreach_copy_ {ms_(t['raw'])}",
        t["sound"] / t["raw"],
        None,
    )
    print(
        "\nwhat an exact check that every new value lies inside its storage would add to the "
        f"warm update: {ms_(t['extents'])} ({t['extents'] / n * 1e6:.2f} µs a value, "
        f"{t['extents'] / t['ours']:.0%} of the update); left to the full checks, the warm "
        "path looks for freed storages only\n",
        flush=True,
    )


LM_FULL = (16000, 768, 2048, 12)  # 0.29 GB bf16
LM_QUICK = (1000, 64, 128, 2)


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def lm_child(method: str, shape: tuple[int, int, int, int], repeats: int) -> dict[str, float]:
    """One method in this (fresh) process: median time and extra peak memory of a step."""
    torch.manual_seed(0)
    model = lm(*shape)
    ms = ModelState.new(model)
    ema = ms.clone(dtype=torch.float32)
    step = merges.ema(DECAY)
    fa, fb, _, _ = float_lists(ema, ms)

    def raw() -> None:
        with torch.no_grad():
            torch._foreach_mul_(fa, DECAY)
            torch._foreach_add_(fa, fb, alpha=1 - DECAY)

    fn: Fn = raw if method == "raw" else (lambda: ema.merge(ms, step))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _vm("VmRSS")
    fn()
    extra = max(0, _vm("VmHWM") - before)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    nbytes = sum(t.numel() * t.element_size() for t in fb)
    return {"s": statistics.median(times), "extra": extra, "model_bytes": nbytes}


def lm_rows(quick: bool, repeats: int) -> None:
    results: dict[str, list[dict[str, float]]] = {"ours": [], "raw": []}
    for _ in range(1 if quick else 3):  # fresh processes, interleaved
        for method in results:
            cmd = [sys.executable, __file__, "--lm-child", method, "--repeats", str(repeats)]
            cmd += ["--quick"] if quick else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[method].append(json.loads(out.strip().splitlines()[-1]))
    s = {m: statistics.median(r["s"] for r in rs) for m, rs in results.items()}
    extra = {m: statistics.median(r["extra"] for r in rs) for m, rs in results.items()}
    model_bytes = results["ours"][0]["model_bytes"]
    label = f"fp32 EMA of a bf16 LM ({model_bytes / 1e6:.0f} MB bf16)"
    row(
        f"{label}, time",
        ms_(s["ours"]),
        f"raw _foreach_mul_+_foreach_add_ {ms_(s['raw'])}",
        s["ours"] / s["raw"],
        0.9,
    )
    row(
        "same, extra peak memory of a step (x model bytes)",
        f"{extra['ours'] / 1e6:.1f} MB",
        f"raw {extra['raw'] / 1e6:.1f} MB",
        extra["ours"] / model_bytes,
        0.1,
    )


def io_rows(quick: bool, repeats: int) -> None:
    import safetensors.torch as st

    from torch_modelstate import cli

    shape = LM_QUICK if quick else (16000, 768, 2048, 8)
    model = lm(*shape)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        tms.save(model, path)
        size = path.stat().st_size

        def touch(tensors: Any) -> None:
            for t in tensors:
                flat = t.view(-1).view(torch.uint8)
                flat[::4096].sum()

        def ours() -> None:
            touch(tms.load(path).to_dict().values())

        def floor() -> None:
            touch(st.load_file(path).values())

        t = measure({"ours": ours, "floor": floor}, repeats)
        row(
            f"standalone `tms.load(path)`, {size / 1e6:.0f} MB, every page touched",
            ms_(t["ours"]),
            f"load_file {ms_(t['floor'])}",
            t["ours"] / t["floor"],
            2.0,
        )
        inputs = []
        for i in range(3):
            p = Path(tmp) / f"in{i}.safetensors"
            st.save_file({k: v.float() + i for k, v in model.state_dict().items()}, p)
            inputs.append(str(p))
        out = str(Path(tmp) / "out.safetensors")

        def cli_merge() -> None:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                code = cli.main(["merge", *inputs, "-o", out])
            if code != 0:
                raise SystemExit("merge failed")

        def hand() -> None:
            sds = [st.load_file(p) for p in inputs]
            result = {}
            for key, first in sds[0].items():
                acc = first.float() / 3
                for sd in sds[1:]:
                    acc += sd[key].float() / 3
                result[key] = acc.to(first.dtype)
            st.save_file(result, out, metadata={"format": "pt"})

        t = measure({"cli": cli_merge, "hand": hand}, max(2, repeats // 3))
        mb = os.path.getsize(inputs[0]) / 1e6
        row(
            f"CLI `merge` of 3 x {mb:.0f} MB (memory: bench_merge.py)",
            ms_(t["cli"]),
            f"hand script {ms_(t['hand'])}",
            t["cli"] / t["hand"],
            1.1,
        )


def scaling(counts: list[int], repeats: int) -> None:
    print(
        "\n| tensors | EMA step µs/tensor | raw lerp µs/tensor | EMA over raw µs/tensor "
        "| sound floor over raw µs/tensor "
        "| update µs/tensor | raw copy µs/tensor | update over raw µs/tensor |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in counts:
        model = Tiny(n)
        ms = ModelState.new(model)
        ema = ms.clone()
        step = merges.ema(DECAY)
        floor = raw_ema(*float_lists(ema, ms))
        sides = [list(ema.to_dict().values()), list(ms.to_dict().values())]
        sound = checked(sound_checks(model, sides), floor)
        src = {k: v.detach().clone() for k, v in model.state_dict().items()}
        current = ms.to_dict()
        dsts = [current[k] for k in src]
        srcs = list(src.values())

        def raw_copy() -> None:
            with torch.no_grad():
                torch._foreach_copy_(dsts, srcs)  # noqa: B023

        t = measure(
            {
                "ema": lambda: ema.merge(ms, step),  # noqa: B023
                "lerp": floor,
                "sound": sound,
                "update": lambda: ms.update(src),  # noqa: B023
                "copy": raw_copy,
            },
            repeats,
        )
        per = {k: v / n * 1e6 for k, v in t.items()}
        print(
            f"| {n} | {per['ema']:.2f} | {per['lerp']:.2f} | {per['ema'] - per['lerp']:.2f} "
            f"| {per['sound'] - per['lerp']:.2f} | {per['update']:.2f} | {per['copy']:.2f} "
            f"| {per['update'] - per['copy']:.2f} |",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="default 15 (quick: 3)")
    parser.add_argument("--lm-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 15)
    if args.lm_child:
        print(json.dumps(lm_child(args.lm_child, LM_QUICK if args.quick else LM_FULL, repeats)))
        return 0
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print("\n| case | ours | floor | ratio | goal |")
    print("| --- | --- | --- | --- | --- |")
    n, bn, tiny = (200, 10, 200) if args.quick else (4000, 100, 4000)
    ema_rows(n, bn, repeats)
    update_row(tiny, repeats)
    lm_rows(args.quick, max(3, repeats // 3))
    io_rows(args.quick, max(3, repeats // 3))
    scaling([40, 400, 2000] if args.quick else [400, 4000, 40000], repeats)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
