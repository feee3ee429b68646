"""The ``demo`` command and ``examples/quickstart.py`` run end to end and pass their checks."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch_modelstate import _demo

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6  # enough for every check; the default run takes 300
CHECKS = [
    "tie: head.weight is embed.weight, one Parameter",
    "pretraining lowered the validation loss",
    "tie held through the optimizer steps",
    "fine-tuning lowered the validation loss",
    "frozen parameters unchanged by fine-tuning",
    "frozen BatchNorm statistics kept, the last block's updated",
    "EMA: a separate copy that moved toward the model",
    "checkpoint: plain safetensors, the tied weight stored once",
    "reload: every value equal",
    "reload: tie restored, one Parameter",
    "reload: frozen flags restored",
    "reload: identical logits",
    "reload: frozen statistics stay put in training mode",
]


def _env() -> dict[str, str]:
    """The environment for a subprocess that imports this checkout's package."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _assert_passed(report: str) -> None:
    for what in CHECKS:
        assert f"PASS  {what}" in report, f"no PASS line for {what!r} in:\n{report}"
    assert "FAIL" not in report
    assert f"All {len(CHECKS)} checks passed" in report


def test_demo_passes_every_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A short run exits 0, prints a PASS line per check and keeps its checkpoint in --out."""
    status = _demo.main(argparse.Namespace(steps=STEPS, out=str(tmp_path / "ckpt"), seed=0))
    captured = capsys.readouterr()
    assert status == 0, captured.out
    _assert_passed(captured.out)
    assert "ModelState<" in captured.out
    assert (tmp_path / "ckpt" / "demo.safetensors").is_file()
    assert "pretrain" in captured.err and "fine-tune" in captured.err  # the progress bars


def test_demo_is_deterministic_for_a_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One seed gives the same losses, samples and checks twice; another seed differs."""
    first = _demo.run(3, 7, str(tmp_path))
    second = _demo.run(3, 7, str(tmp_path))
    other = _demo.run(3, 8, str(tmp_path))
    capsys.readouterr()
    assert first.losses == second.losses
    assert first.samples == second.samples
    assert first.checks == second.checks
    assert other.losses != first.losses


def test_demo_leaves_the_global_random_state_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Running the demo in-process does not reseed the caller's torch random generator."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert _demo.main(argparse.Namespace(steps=1, out=str(tmp_path), seed=0)) == 0
    capsys.readouterr()
    assert torch.equal(torch.rand(3), expected)


def test_demo_reports_an_unusable_out_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --out that is a file is one line on stderr and exit status 2, before any training."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    status = _demo.main(argparse.Namespace(steps=1, out=str(blocker / "sub"), seed=0))
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "--out" in captured.err


def test_demo_defines_its_command_line_options() -> None:
    """`add_arguments` gives --steps (a positive integer), --out and --seed."""
    parser = argparse.ArgumentParser()
    _demo.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.steps, args.out, args.seed) == (None, None, 0)
    args = parser.parse_args(["--steps", "5", "--out", "d", "--seed", "3"])
    assert (args.steps, args.out, args.seed) == (5, "d", 3)
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--steps", bad])


def test_demo_command_runs_as_a_subprocess(tmp_path: Path) -> None:
    """`python -m torch_modelstate demo --steps N` exits 0 and prints every PASS line."""
    result = subprocess.run(
        [sys.executable, "-m", "torch_modelstate", "demo", "--steps", str(STEPS), "--seed", "1"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_passed(result.stdout)
    assert "Traceback" not in result.stderr


def test_demo_command_rejects_bad_steps(tmp_path: Path) -> None:
    """`demo --steps 0` is a usage error: exit status 2, a message on stderr, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "torch_modelstate", "demo", "--steps", "0"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "--steps" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_quickstart_example_runs(tmp_path: Path) -> None:
    """`examples/quickstart.py` runs without error or warning and prints the summary."""
    result = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "examples" / "quickstart.py")],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Trainable Parameters: 1120 (4.48 KB)" in result.stdout
