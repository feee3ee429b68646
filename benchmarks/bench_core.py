"""Speed of torch_modelstate's core operations against the baselines users have today.

Run from the repository root (this is a script, not a test):

    python benchmarks/bench_core.py                    # full run, CPU
    python benchmarks/bench_core.py --quick            # smoke run: small models, few repeats
    python benchmarks/bench_core.py --device cuda      # on a GPU, plus a pinned-host row
    python benchmarks/bench_core.py --json out.json    # also write every sample as JSON

Every figure is the median of several timed repeats taken after a warm-up. The
cases of one section are interleaved round by round, so drift on a busy machine
hits all of them alike and the ratios (measured in the same run) stay fair.
`torch.set_num_threads` is left at its default. The "goals" section at the end
checks the speed targets of the design; `--check` makes a missed goal exit 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import torch_modelstate as tms
from torch_modelstate import ModelState, merges

Fn = Callable[[], object]

# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class LLMShape:
    """Sizes of the LLM-shaped model (a Llama-like decoder without the compute)."""

    vocab: int
    hidden: int
    mlp: int
    blocks: int


FULL_LLM = LLMShape(vocab=32000, hidden=1024, mlp=2816, blocks=32)  # 291 tensors, 0.95 GB bf16
QUICK_LLM = LLMShape(vocab=8000, hidden=256, mlp=704, blocks=8)  # 75 tensors, 21 MB bf16


class RMSNormLike(nn.Module):
    """Just the weight vector of an RMSNorm: one 1-d parameter."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)


class MLP(nn.Module):
    def __init__(self, hidden: int, mlp: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, mlp, bias=False)
        self.up_proj = nn.Linear(hidden, mlp, bias=False)
        self.down_proj = nn.Linear(mlp, hidden, bias=False)


class DecoderBlock(nn.Module):
    def __init__(self, hidden: int, mlp: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNormLike(hidden)
        self.self_attn = Attention(hidden)
        self.post_attention_layernorm = RMSNormLike(hidden)
        self.mlp = MLP(hidden, mlp)


class Decoder(nn.Module):
    def __init__(self, shape: LLMShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab, shape.hidden)
        self.layers = nn.ModuleList(
            DecoderBlock(shape.hidden, shape.mlp) for _ in range(shape.blocks)
        )
        self.norm = RMSNormLike(shape.hidden)


class LLM(nn.Module):
    """Keys as in Hugging Face Llama: `model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`."""

    def __init__(self, shape: LLMShape) -> None:
        super().__init__()
        self.model = Decoder(shape)
        self.lm_head = nn.Linear(shape.hidden, shape.vocab, bias=False)


def build_llm(shape: LLMShape, device: torch.device) -> nn.Module:
    # Built on the meta device and materialised once in bf16: no float32 copy, no
    # slow kaiming init of half a billion elements. Values are uniform, never
    # uninitialised memory, whose NaNs and denormals would distort the timings.
    with torch.device("meta"):
        model = LLM(shape)
    model = model.to(torch.bfloat16).to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05)
    return model


class SmallBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(64, 64, bias=False)
        self.fc1 = nn.Linear(64, 64, bias=False)
        self.fc2 = nn.Linear(64, 64, bias=False)
        self.fc3 = nn.Linear(64, 64, bias=False)


class ManySmall(nn.Module):
    """`blocks` x 4 weights of 64x64 in float32 (4000 tensors, 65 MB of params at 1000 blocks)."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SmallBlock() for _ in range(blocks))


class LeafBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.fc3 = nn.Linear(4, 4)
        self.fc4 = nn.Linear(4, 4)
        self.fc5 = nn.Linear(4, 4)


class ManyLeaves(nn.Module):
    """`blocks.{i}.fc{1..5}.{weight,bias}`: 10 leaves per block (10,000 at 1000 blocks)."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LeafBlock() for _ in range(blocks))


def source_like(model: nn.Module) -> dict[str, torch.Tensor]:
    """A second state dict of the same keys, shapes, dtypes and device; different values."""
    return {k: torch.neg(v.detach()) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- timing


@dataclass
class Case:
    name: str
    fn: Fn
    setup: Fn | None = None
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class Section:
    title: str
    cases: list[Case]
    baselines: list[str]
    bytes_per_call: dict[str, int] = field(default_factory=dict)
    note: str = ""

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        msg = f"no case named {name!r} in section {self.title!r}"
        raise KeyError(msg)


def synchronizer(device: torch.device) -> Fn:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def run_section(section: Section, *, repeats: int, warmup: int, sync: Fn) -> Section:
    """Time every case of `section`, interleaved round by round, rotating the order."""
    cases = section.cases
    for _ in range(warmup):
        for c in cases:
            if c.setup is not None:
                c.setup()
            c.fn()
            sync()
    for r in range(repeats):
        order = cases[r % len(cases) :] + cases[: r % len(cases)]
        for c in order:
            if c.setup is not None:
                c.setup()
            sync()
            gc.collect()
            gc.disable()  # as timeit does: a collection inside one sample is noise
            try:
                t0 = time.perf_counter()
                c.fn()
                sync()
                t1 = time.perf_counter()
            finally:
                gc.enable()
            c.times.append(t1 - t0)
    return section


def fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:8.3f} s "
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds * 1e6:8.1f} us"


def print_section(section: Section) -> None:
    print(f"\n## {section.title}")
    if section.note:
        print(f"   {section.note}")
    name_w = max(len(c.name) for c in section.cases) + 2
    heads = [f"{'case':<{name_w}}", f"{'median':>11}", f"{'min':>11}"]
    if section.bytes_per_call:
        heads.append(f"{'GB/s':>8}")
    heads += [f"{'vs ' + b:>{max(12, len(b) + 5)}}" for b in section.baselines]
    print("   " + " ".join(heads))
    for c in section.cases:
        cols = [f"{c.name:<{name_w}}", f"{fmt_time(c.median):>11}", f"{fmt_time(min(c.times)):>11}"]
        if section.bytes_per_call:
            moved = section.bytes_per_call.get(c.name)
            cols.append(f"{moved / c.median / 1e9:8.1f}" if moved else f"{'':>8}")
        for b in section.baselines:
            ratio = c.median / section.case(b).median
            cols.append(f"{f'{ratio:.2f}x':>{max(12, len(b) + 5)}}")
        print("   " + " ".join(cols))


# --------------------------------------------------------------------------- sections


def update_and_merge_sections(
    label: str, model: nn.Module, *, device: torch.device
) -> tuple[Section, Section]:
    """`ms.update` and `ms.merge(lerp)` against load_state_dict, loops and raw foreach ops."""
    src = source_like(model)
    ms = ModelState.new(model)
    src_ms = ModelState.new(src)
    live = model.state_dict(keep_vars=True)
    dst_list = [live[k] for k in src]
    src_list = list(src.values())
    pairs = list(zip(dst_list, src_list, strict=True))
    lerp = merges.lerp(0.1)
    nbytes = sum(t.numel() * t.element_size() for t in src_list)
    shape = f"{len(src_list)} tensors, {nbytes / 1e9:.3f} GB, {src_list[0].dtype}, {device}"

    def copy_loop() -> None:
        with torch.no_grad():
            for d, s in pairs:
                d.copy_(s)

    def foreach_copy() -> None:
        with torch.no_grad():
            torch._foreach_copy_(dst_list, src_list)

    def lerp_loop() -> None:
        with torch.no_grad():
            for d, s in pairs:
                d.lerp_(s, 0.1)

    def foreach_lerp() -> None:
        with torch.no_grad():
            torch._foreach_lerp_(dst_list, src_list, 0.1)

    update = Section(
        title=f"{label}: update ({shape})",
        cases=[
            Case("ms.update(src)", lambda: ms.update(src)),
            Case("load_state_dict", lambda: model.load_state_dict(src)),
            Case("copy_ loop", copy_loop),
            Case("_foreach_copy_", foreach_copy),
        ],
        baselines=["load_state_dict", "_foreach_copy_"],
        # read the source, write the destination
        bytes_per_call={n: 2 * nbytes for n in ("ms.update(src)", "_foreach_copy_")},
        note="copy_ loop and _foreach_copy_ get their (dst, src) pairs precomputed",
    )
    merge = Section(
        title=f"{label}: merge lerp(0.1) ({shape})",
        cases=[
            Case("ms.merge(src_ms, lerp)", lambda: ms.merge(src_ms, lerp)),
            Case("lerp_ loop", lerp_loop),
            Case("_foreach_lerp_", foreach_lerp),
        ],
        baselines=["lerp_ loop", "_foreach_lerp_"],
        # read both, write the destination
        bytes_per_call={n: 3 * nbytes for n in ("ms.merge(src_ms, lerp)", "_foreach_lerp_")},
    )
    return update, merge


def pinned_section(label: str, model: nn.Module) -> Section:
    """CUDA only: update from pinned host memory against a non-blocking raw foreach copy."""
    pinned = {k: v.detach().cpu().pin_memory() for k, v in model.state_dict().items()}
    ms = ModelState.new(model)
    live = model.state_dict(keep_vars=True)
    dst_list = [live[k] for k in pinned]
    src_list = list(pinned.values())
    nbytes = sum(t.numel() * t.element_size() for t in src_list)

    def foreach_copy_nb() -> None:
        with torch.no_grad():
            torch._foreach_copy_(dst_list, src_list, non_blocking=True)

    return Section(
        title=f"{label}: update from pinned host memory ({len(src_list)} tensors, "
        f"{nbytes / 1e9:.3f} GB)",
        cases=[
            Case("ms.update(pinned)", lambda: ms.update(pinned)),
            Case("_foreach_copy_(nb=True)", foreach_copy_nb),
        ],
        baselines=["_foreach_copy_(nb=True)"],
        bytes_per_call={"ms.update(pinned)": nbytes, "_foreach_copy_(nb=True)": nbytes},
    )


def freeze_section(model: nn.Module, glob: str, prefix: str) -> Section:
    """`ms.freeze(glob)` against the loop a user writes by hand, on a many-leaf model."""
    ms = ModelState.new(model)
    params = list(model.parameters())
    n_leaves = len(params)

    def hand_loop() -> None:
        for name, p in model.named_parameters():
            if name.startswith(prefix):
                p.requires_grad_(False)

    def unfreeze_all() -> None:
        for p in params:
            p.requires_grad_(True)

    # Both select the same leaves; check once so the comparison is honest.
    expected = {n for n, _ in model.named_parameters() if n.startswith(prefix)}
    ms.freeze(glob)
    got = {n for n, p in model.named_parameters() if not p.requires_grad}
    if got != expected:
        msg = (
            f"ms.freeze({glob!r}) froze {len(got)} leaves, the hand loop freezes "
            f"{len(expected)}; they differ in e.g. {sorted(got ^ expected)[:5]}"
        )
        raise AssertionError(msg)
    ms.unfreeze()
    if any(not p.requires_grad for p in params):
        msg = "ms.unfreeze() left parameters frozen"
        raise AssertionError(msg)

    return Section(
        title=f"freeze by path ({n_leaves} leaves, {len(expected)} selected)",
        cases=[
            Case(f"ms.freeze({glob!r})", lambda: ms.freeze(glob), setup=lambda: ms.unfreeze()),
            Case("hand loop (startswith)", hand_loop, setup=unfreeze_all),
        ],
        baselines=["hand loop (startswith)"],
        note=f"hand loop: for n, p in named_parameters(): if n.startswith({prefix!r}): "
        "p.requires_grad_(False)",
    )


NEW = "ModelState.new(model)"
NEW_FIRST_USE = "ModelState.new(model).parameters()"


def new_section(model: nn.Module) -> Section:
    """Cost of building the live view, next to listing the module's tensors.

    A view may defer its walk over the module to first use, so the time of `new` alone
    can hide the work: the second row includes the first accessor call on a fresh view.
    """
    return Section(
        title=f"ModelState.new(model) ({sum(1 for _ in model.parameters())} leaves)",
        cases=[
            Case(NEW, lambda: ModelState.new(model)),
            Case(NEW_FIRST_USE, lambda: ModelState.new(model).parameters()),
            Case("dict(named_parameters())", lambda: dict(model.named_parameters())),
            Case("model.state_dict()", lambda: model.state_dict()),
        ],
        baselines=["dict(named_parameters())", "model.state_dict()"],
        note="the second row is a fresh view plus its first accessor call (the first walk)",
    )


# --------------------------------------------------------------------------- goals


@dataclass
class Goal:
    text: str
    ratio: float
    limit: float
    at_least: bool = False  # True: ratio must be >= limit (a speed-up); else <= limit
    floor: str = ""  # what the raw op reaches on this machine, when that bounds the goal

    @property
    def passed(self) -> bool:
        return self.ratio >= self.limit if self.at_least else self.ratio <= self.limit


def ratio(section: Section, case: str, baseline: str) -> float:
    return section.case(case).median / section.case(baseline).median


def goals(sections: dict[str, Section]) -> list[Goal]:
    llm_u, llm_m = sections["llm_update"], sections["llm_merge"]
    small_u, small_m = sections["small_update"], sections["small_merge"]
    fr = sections["freeze"]
    freeze_case = fr.cases[0].name
    return [
        Goal(
            "many-small: update >= 50x faster than load_state_dict",
            ratio(small_u, "load_state_dict", "ms.update(src)"),
            50.0,
            at_least=True,
            # On a slow memory system even the raw op may not reach 50x: say so.
            floor=f"raw _foreach_copy_ reaches "
            f"{ratio(small_u, 'load_state_dict', '_foreach_copy_'):.1f}x here",
        ),
        Goal(
            "LLM: update not slower than load_state_dict",
            ratio(llm_u, "ms.update(src)", "load_state_dict"),
            1.0,
        ),
        Goal(
            "LLM: update within 1.25x of raw _foreach_copy_",
            ratio(llm_u, "ms.update(src)", "_foreach_copy_"),
            1.25,
        ),
        Goal(
            "many-small: update within 2x of raw _foreach_copy_",
            ratio(small_u, "ms.update(src)", "_foreach_copy_"),
            2.0,
        ),
        Goal(
            "LLM: merge(lerp) within 1.25x of raw _foreach_lerp_",
            ratio(llm_m, "ms.merge(src_ms, lerp)", "_foreach_lerp_"),
            1.25,
        ),
        Goal(
            "many-small: merge(lerp) within 2x of raw _foreach_lerp_",
            ratio(small_m, "ms.merge(src_ms, lerp)", "_foreach_lerp_"),
            2.0,
        ),
        Goal(
            "freeze(glob) within 3x of the hand loop",
            ratio(fr, freeze_case, "hand loop (startswith)"),
            3.0,
        ),
    ]


def print_goals(found: Sequence[Goal]) -> None:
    print("\n## goals")
    width = max(len(g.text) for g in found)
    for g in found:
        verdict = "PASS" if g.passed else "FAIL"
        bound = f"{'>=' if g.at_least else '<='} {g.limit:g}x"
        floor = f"; {g.floor}" if g.floor else ""
        print(f"   {verdict}  {g.text:<{width}}  ratio {g.ratio:7.2f}x  (goal {bound}{floor})")


# --------------------------------------------------------------------------- main


def peak_rss_gb() -> float | None:
    """Peak resident memory of this process (Linux and macOS), or None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes vs KiB


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: smaller LLM-shaped model, fewer repeats"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--repeats", type=int, help="timed repeats per case (default 15, quick 3)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any goal fails")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"--device {args.device}: only cpu and cuda are supported", file=sys.stderr)
        return 2
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = 1 if args.quick else 2
    llm_shape = QUICK_LLM if args.quick else FULL_LLM
    small_blocks = 1000  # 4000 tensors: the per-tensor overhead is the point, even when quick
    leaf_blocks = 1000  # 10,000 leaves
    sync = synchronizer(device)

    print("# torch_modelstate core benchmark")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"   torch {torch.__version__}, torch_modelstate {getattr(tms, '__version__', '?')}, "
        f"python {platform.python_version()}, {device_name}, "
        f"{torch.get_num_threads()} threads, {repeats} repeats (median), {warmup} warm-up"
    )
    if args.quick:
        print("   --quick: small models and few repeats; the figures are only indicative")

    sections: dict[str, Section] = {}

    def run(key: str, section: Section) -> None:
        sections[key] = run_section(section, repeats=repeats, warmup=warmup, sync=sync)
        print_section(sections[key])

    # Models are built one at a time and dropped before the next, to keep the peak
    # memory at about two copies of the LLM-shaped model (plus a pinned one on cuda).
    llm = build_llm(llm_shape, device)
    label = "LLM-shaped" + (" (quick)" if args.quick else "")
    upd, mrg = update_and_merge_sections(label, llm, device=device)
    run("llm_update", upd)
    run("llm_merge", mrg)
    del upd, mrg
    if device.type == "cuda":
        run("llm_pinned", pinned_section(label, llm))
    del llm
    gc.collect()

    small = ManySmall(small_blocks).to(device)
    upd, mrg = update_and_merge_sections("many-small", small, device=device)
    run("small_update", upd)
    run("small_merge", mrg)
    del small, upd, mrg
    gc.collect()

    leaves = ManyLeaves(leaf_blocks).to(device)
    run("freeze", freeze_section(leaves, glob="blocks.1*.**", prefix="blocks.1"))
    run("new", new_section(leaves))
    n_leaves = sum(1 for _ in leaves.parameters())
    per_leaf_us = {
        name: sections["new"].case(name).median * 1e6 / n_leaves for name in (NEW, NEW_FIRST_USE)
    }
    for name, us in per_leaf_us.items():
        print(f"   {name}: {us:.3f} us per leaf")

    found = goals(sections)
    print_goals(found)
    peak = peak_rss_gb()
    if peak is not None:
        print(f"\n   peak resident memory of this process: {peak:.2f} GB")

    if args.json is not None:
        payload: dict[str, Any] = {
            "torch": torch.__version__,
            "torch_modelstate": getattr(tms, "__version__", None),
            "python": platform.python_version(),
            "device": device_name,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "warmup": warmup,
            "quick": args.quick,
            "peak_rss_gb": peak,
            "sections": {
                key: {
                    "title": s.title,
                    "cases": {
                        c.name: {"median_s": c.median, "min_s": min(c.times), "times_s": c.times}
                        for c in s.cases
                    },
                }
                for key, s in sections.items()
            },
            "new_us_per_leaf": per_leaf_us[NEW],
            "new_first_use_us_per_leaf": per_leaf_us[NEW_FIRST_USE],
            "goals": [
                {
                    "goal": g.text,
                    "ratio": g.ratio,
                    "limit": g.limit,
                    "at_least": g.at_least,
                    "passed": g.passed,
                    "floor": g.floor,
                }
                for g in found
            ],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")

    if args.check and not all(g.passed for g in found):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
