"""Smoke test of benchmarks/bench_step.py: it runs and prints every row (no timing asserts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    "view made once",
    "`ModelState.new(model)` each step",
    "after a buffer assignment in an unrelated module",
    "packed model and",
    "peer: AveragedModel",
    "peer: timm ModelEmaV3",
    "`update` of 200 tiny 4x4 tensors",
    "fp32 EMA of a bf16 LM",
    "extra peak memory of a step",
    "standalone `tms.load(path)`",
    "CLI `merge` of 3",
    "| 2000 |",
    "floor of a sound reused plan",
    "the sound checks' passes",
    "torch.compile's own C++ guard tree",
    "sound floor over raw",
    "module entries by identity",
    "the full checks of one side",
    "what an exact check that every new value lies inside its storage would add",
]


def test_bench_step_quick_prints_every_row() -> None:
    """`bench_step.py --quick` exits 0 and prints each row of the issue's table."""
    script = ROOT / "benchmarks" / "bench_step.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--repeats", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    missing = [r for r in ROWS if r not in out.stdout]
    assert not missing, (missing, out.stdout)
