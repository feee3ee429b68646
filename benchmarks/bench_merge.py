"""The CLI's ``merge`` (a weighted average of checkpoints) against a hand-written script.

Run from the repository root (a script, not a test):

    python benchmarks/bench_merge.py              # 3 inputs of ~337 MB (float32), 4 rounds
    python benchmarks/bench_merge.py --mb 128     # smaller inputs
    python benchmarks/bench_merge.py --quick      # smoke run: 3 x 16 MB, 2 rounds
    python benchmarks/bench_merge.py --check      # exit 1 if a goal is missed

It writes the inputs once, then per round starts one fresh Python process per method
(interleaved), which times the merge call itself and records its peak RSS over the RSS it
had before the call (``ru_maxrss``, ``/proc/self/statm``). The first round warms the page
cache and is dropped; the figures are medians of the later rounds. The methods:

- ``cli merge``: ``torch_modelstate.cli.main(["merge", a, b, c, "-o", out])``, as the
  ``torch-modelstate merge`` command runs it (streamed, fsynced, atomic);
- ``hand script``: ``safetensors.torch.load_file`` of each input, the weighted sum per key
  in float32, ``save_file`` (what one writes by hand; no fsync).

Goals (issue 11): time <= 1.1x the hand script, extra peak memory <= 0.5x the hand
script's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_load import current_rss, max_rss  # one way to read memory for both benchmarks

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["cli merge", "hand script"]
GOAL_TIME = 1.1
GOAL_MEMORY = 0.5


def make_inputs(directory: Path, mb: int, n: int) -> list[Path]:
    """`n` checkpoints of about `mb` MB of float32, LLM-shaped (a few large matrices)."""
    import torch_modelstate as tms

    elements = mb * 10**6 // 4
    width = 1024
    rows = [elements // 8 // width] * 8
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        tensors = {f"layers.{j}.weight": torch.randn(r, width) for j, r in enumerate(rows)}
        tensors["norm.weight"] = torch.randn(width)
        tensors["steps"] = torch.tensor(i)
        path = directory / f"in{i}.safetensors"
        tms.save(tensors, path)
        paths.append(path)
    return paths


def child(method: str, inputs: list[str], output: str) -> dict[str, Any]:
    import safetensors.torch as st

    from torch_modelstate import cli

    before = current_rss()
    start = time.perf_counter()
    if method == "cli merge":
        code = cli.main(["merge", *inputs, "-o", output])
        if code != 0:
            raise SystemExit(f"merge exited {code}")
    elif method == "hand script":
        sds = [st.load_file(p) for p in inputs]
        weight = 1.0 / len(sds)
        out = {}
        for key, first in sds[0].items():
            if not first.is_floating_point():
                out[key] = first
                continue
            acc = first.float() * weight
            for sd in sds[1:]:
                acc += sd[key].float() * weight
            out[key] = acc.to(first.dtype)
        st.save_file(out, output, metadata={"format": "pt"})
    else:
        raise SystemExit(f"unknown method {method!r}")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra": max_rss() - before}


def run_child(method: str, inputs: list[Path], output: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, __file__, "--child", method, "--out", str(output)]
    command += ["--inputs", *map(str, inputs)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    output.unlink(missing_ok=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=337, help="size of each input in MB")
    parser.add_argument("--inputs-count", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=None, help="default 4 (quick: 2)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="*", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.inputs, args.out)))
        return 0
    mb = 16 if args.quick else args.mb
    rounds = args.rounds or (2 if args.quick else 4)
    import safetensors

    print(f"torch {torch.__version__}, safetensors {safetensors.__version__}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs")  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        inputs = make_inputs(Path(tmp), mb, args.inputs_count)
        size = sum(p.stat().st_size for p in inputs) / len(inputs)
        print(f"inputs: {len(inputs)} x {size / 1e6:.0f} MB float32")
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        for r in range(rounds):
            for method in METHODS:
                samples[method].append(run_child(method, inputs, Path(tmp) / "out.safetensors"))
            print(f"  round {r + 1}/{rounds} done{' (warm-up, dropped)' if r == 0 else ''}")

    def med(method: str, field: str) -> float:
        values = [s[field] for s in samples[method][1:] or samples[method]]
        return float(statistics.median(values))

    print(f"\n{'method':<14}{'time':>10}{'extra peak RSS':>18}")
    for method in METHODS:
        print(f"{method:<14}{med(method, 'seconds'):>9.3f}s{med(method, 'extra') / 1e9:>14.3f} GB")
    time_ratio = med("cli merge", "seconds") / med("hand script", "seconds")
    mem_ratio = med("cli merge", "extra") / max(1.0, med("hand script", "extra"))
    goals = [
        (f"time <= {GOAL_TIME}x the hand script: {time_ratio:.2f}x", time_ratio <= GOAL_TIME),
        (f"memory <= {GOAL_MEMORY}x the hand script: {mem_ratio:.2f}x", mem_ratio <= GOAL_MEMORY),
    ]
    print("\ngoals:")
    for text, ok in goals:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    return 1 if args.check and not all(ok for _, ok in goals) else 0


if __name__ == "__main__":
    raise SystemExit(main())
