"""EMA steps of a bf16 model: nearest vs stochastic rounding vs an fp32 shadow.

Run from the repository root (a script, not a test):

    python benchmarks/bench_precision.py            # 64 tensors of 2**20 elements (128 MB bf16)
    python benchmarks/bench_precision.py --quick    # 16 tensors of 2**18 elements

Each method runs in a fresh Python process (so peak memory is its own): it builds the
model, records the peak RSS of its first EMA step over the RSS it had before
(``ru_maxrss`` against ``/proc/self/statm``), then times `--steps` more steps. Methods:

- ``bf16 nearest``: ``ema.merge(model, merges.ema(0.999))`` in bf16 (stalls; the floor);
- ``bf16 stochastic``: the same with ``rounding="stochastic"``;
- ``fp32 shadow``: ``clone(dtype=torch.float32)`` merged from the bf16 model (rhs converted
  a chunk at a time inside the kernel layer);
- ``fp32 shadow, rhs cast first``: the same with every rhs tensor cast to fp32 beforehand,
  what a model-sized temporary costs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ["bf16 nearest", "bf16 stochastic", "fp32 shadow", "fp32 shadow, rhs cast first"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(method: str, n: int, numel: int, steps: int) -> dict[str, float]:
    import torch

    from torch_modelstate import ModelState, merges

    torch.manual_seed(0)
    model = {f"w{i}": torch.randn(numel).bfloat16() for i in range(n)}
    ms = ModelState.new(model)
    rounding = "stochastic" if method == "bf16 stochastic" else "nearest"
    step = merges.ema(0.999, rounding=rounding)
    ema = ms.clone() if method.startswith("bf16") else ms.clone(dtype=torch.float32)

    def once() -> None:
        if method == "fp32 shadow, rhs cast first":
            ema.merge({k: v.float() for k, v in model.items()}, step)
        else:
            ema.merge(ms, step)

    base = _rss()
    once()  # the first step: its temporaries set the peak (memory freed later stays mapped)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return {"ms": statistics.median(times) * 1e3, "extra_mb": max(0, peak - base) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n, numel = (16, 1 << 18) if args.quick else (64, 1 << 20)
    if args.child:
        print(json.dumps(child(args.child, n, numel, args.steps)))
        return
    print(f"# EMA step, {n} tensors x {numel} elements bf16 ({n * numel * 2 / 1e6:.0f} MB)")
    print("| method | ms / step (median) | extra peak memory |")
    print("| --- | --- | --- |")
    for method in METHODS:
        cmd = [sys.executable, __file__, "--child", method, "--steps", str(args.steps)]
        if args.quick:
            cmd.append("--quick")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {method} | {r['ms']:.1f} | {r['extra_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
