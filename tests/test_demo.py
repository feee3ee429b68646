"""The ``demo`` command runs end to end and passes its checks (examples: tests/test_readme.py)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_modelstate as tms
from torch_modelstate import demo

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
    (tmp_path / "ckpt").mkdir()
    status = demo.main(steps=STEPS, out=str(tmp_path / "ckpt"), seed=0)
    captured = capsys.readouterr()
    assert status == 0, captured.out
    _assert_passed(captured.out)
    assert "ModelState<" in captured.out
    assert (tmp_path / "ckpt" / "demo.safetensors").is_file()
    # The shared progress bar, off a terminal: a few lines per phase, not one per step.
    bars = captured.err.splitlines()
    assert any("pretrain" in line for line in bars) and any("fine-tune" in line for line in bars)
    assert len(bars) <= 8 and all("[" in line and "loss" in line for line in bars)


def test_demo_is_deterministic_for_a_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One seed gives the same losses, samples and checks twice; another seed differs."""
    first = demo.run(3, 7, str(tmp_path))
    second = demo.run(3, 7, str(tmp_path))
    other = demo.run(3, 8, str(tmp_path))
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
    assert demo.main(steps=1, out=str(tmp_path), seed=0) == 0
    capsys.readouterr()
    assert torch.equal(torch.rand(3), expected)


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


def test_demo_uses_only_the_public_api() -> None:
    """The demo package imports `torch_modelstate` as a user does (and the shared progress bar)."""
    allowed = {"torch_modelstate", "torch_modelstate._progress"}
    package = ROOT / "torch_modelstate" / "demo"
    seen: set[str] = set()
    for file in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                if name.startswith("torch_modelstate") and not name.startswith(
                    "torch_modelstate.demo"
                ):
                    seen.add(name)
                    assert name in allowed, f"{file.name} imports {name}"
                if isinstance(node, ast.ImportFrom) and name == "torch_modelstate":
                    assert all(not a.name.startswith("_") for a in node.names), file.name
    assert "torch_modelstate" in seen


def test_demo_rejects_steps_below_one() -> None:
    """`demo.main(steps=0)` is a ValueError naming `steps`, before any training."""
    with pytest.raises(ValueError, match="`steps` must be a positive integer, got 0"):
        demo.main(steps=0)


def test_demo_prints_sizes_with_the_librarys_format_bytes() -> None:
    """No second bytes formatter in the demo: it uses tms.format_bytes (which has GB)."""
    assert tms.format_bytes(3 * 10**9) == "3.00 GB"
    for file in sorted((ROOT / "torch_modelstate" / "demo").glob("*.py")):
        assert '"KB"' not in file.read_text() and " KB" not in file.read_text(), file.name
