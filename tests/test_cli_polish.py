"""Command-line polish (issue 12): progress bars, torch's NumPy warning, help with examples."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_modelstate as tms
from torch_modelstate import _progress, cli
from torch_modelstate._progress import ProgressBar

ROOT = Path(__file__).resolve().parents[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_off_a_terminal_writes_a_few_lines() -> None:
    """Off a terminal, 1000 updates give four whole lines (a quarter each), the last at 100%."""
    stream = io.StringIO()
    bar = ProgressBar("merge", stream=stream, unit="bytes")
    for done in range(0, 1001):
        bar(done, 1000)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in stream.getvalue()
    assert [line.split("]")[1].split("%")[0].strip() for line in lines] == ["25", "50", "75", "100"]
    assert lines[-1].startswith("merge [" + "#" * 30 + "] 100%  1.00 KB / 1.00 KB")


def test_progress_bar_on_a_terminal_redraws_in_place_with_an_eta(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a terminal the line is redrawn with \\r, shows an ETA, and ends with one newline."""
    clock = [100.0]
    monkeypatch.setattr(_progress.time, "perf_counter", lambda: clock[0])
    stream = _Terminal()
    bar = ProgressBar("train", 10, stream=stream)
    for step in range(1, 11):
        clock[0] += 1.0  # one second a step: redrawn every step
        bar.update(step, note="loss 1.000")
    bar.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    draws = text.rstrip("\n").split("\r")[1:]
    assert len(draws) == 11  # ten updates and the final line
    assert "1/10  loss 1.000  1.0 s, ETA 9.0 s" in draws[0]
    assert "ETA" not in draws[-1] and "10/10" in draws[-1]


def test_progress_bar_on_a_terminal_is_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Updates closer than 0.1 s are not drawn (except the last)."""
    clock = [0.0]
    monkeypatch.setattr(_progress.time, "perf_counter", lambda: clock[0])
    stream = _Terminal()
    bar = ProgressBar("x", 1000, stream=stream)
    for step in range(1, 1001):
        clock[0] += 0.001
        bar.update(step)
    assert 9 <= stream.getvalue().count("\r") <= 12


def test_format_duration_reads_like_a_clock() -> None:
    """Short times in seconds, longer ones as m:ss and h:mm:ss."""
    assert _progress.format_duration(0.04) == "0.0 s"
    assert _progress.format_duration(61) == "1:01"
    assert _progress.format_duration(7322) == "2:02:02"


def _without_numpy(tmp_path: Path) -> dict[str, str]:
    """An environment where `import numpy` fails, as on a machine without NumPy."""
    fake = tmp_path / "fake" / "numpy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named numpy (hidden by a test)", name="numpy")\n'
    )
    path = os.pathsep.join([str(tmp_path / "fake"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def test_numpy_warning_is_not_shown_by_commands(tmp_path: Path) -> None:
    """Without NumPy, torch warns at import; the command line does not show that warning."""
    env = _without_numpy(tmp_path)
    plain = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, check=False
    )
    assert "Failed to initialize NumPy" in plain.stderr  # the setup does trigger it
    path = tmp_path / "m.safetensors"
    tms.save({"w": torch.zeros(2)}, path)
    result = subprocess.run(
        [sys.executable, "-m", "torch_modelstate", "inspect", str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    library = subprocess.run(
        [sys.executable, "-c", "import torch_modelstate"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Failed to initialize NumPy" in library.stderr  # a library user still sees it


@pytest.mark.parametrize("command", [[], ["inspect"], ["merge"], ["demo"]])
def test_help_has_examples(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Every --help ends with examples, laid out as written."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    examples = out.split("\nexamples:\n")[1]
    lines = [line for line in examples.splitlines() if line.startswith("  torch-modelstate ")]
    assert lines, out
    if command:
        assert all(line.startswith(f"  torch-modelstate {command[0]}") for line in lines)


def test_merge_help_explains_the_output_and_force(capsys: pytest.CaptureFixture[str]) -> None:
    """`merge --help` says what OUT may be and documents --force and --method."""
    with pytest.raises(SystemExit):
        cli.main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "-f, --force" in text and "--method {mean" in text
    assert "refused unless --force" in text and "ending in .safetensors" in text


def test_demo_command_passes_its_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`demo --steps 3 --seed 5 --out DIR` calls the demo with those values, DIR made."""
    seen: list[dict[str, object]] = []
    monkeypatch.setattr(cli.demo, "main", lambda **kw: seen.append(kw) or 0)
    out = tmp_path / "new" / "dir"
    assert cli.main(["demo", "--steps", "3", "--seed", "5", "--out", str(out)]) == 0
    assert seen == [{"steps": 3, "seed": 5, "out": str(out)}] and out.is_dir()
    assert cli.main(["demo"]) == 0
    assert seen[-1] == {"steps": 300, "seed": 0, "out": None}


def test_demo_unusable_out_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --out below a file: exit status 2, one line naming --out, before any training."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli.main(["demo", "--out", str(blocker / "sub")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "--out" in captured.err


def test_cli_has_no_function_level_imports(capsys: pytest.CaptureFixture[str]) -> None:
    """cli.py imports at module top (no cycle to dodge); --version prints tms.__version__."""
    tree = ast.parse((ROOT / "torch_modelstate" / "cli.py").read_text())
    inner = [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and any(isinstance(n, ast.Import | ast.ImportFrom) for n in ast.walk(node))
    ]
    assert inner == []
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.split() == ["torch-modelstate", tms.__version__]
