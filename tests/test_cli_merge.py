"""`merge`'s output checks (issue 8): an input never overwritten, the output path checked first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import torch_modelstate as tms
from torch_modelstate import cli


def _save(path: Path, value: float) -> Path:
    tms.save({"w": torch.full((3,), value), "n": torch.tensor(7)}, path)
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return _save(tmp_path / "a.safetensors", 1.0), _save(tmp_path / "b.safetensors", 3.0)


def _merge(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    status = cli.main(["merge", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _one_error_line(err: str) -> str:
    assert err.count("\n") == 1, err
    assert err.startswith("torch-modelstate merge: error: ")
    return err


@pytest.mark.parametrize("spelling", ["same", "dot", "absolute", "symlink", "hardlink"])
def test_merge_refuses_an_output_that_is_an_input(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str], spelling: str
) -> None:
    """`merge a b -o a` (however `a` is spelled) is refused and `a` keeps its bytes."""
    a, b = pair
    before = a.read_bytes()
    output = {
        "same": str(a),
        "dot": os.path.join(str(a.parent), ".", a.name),
        "absolute": str(a.resolve()),
        "symlink": str(a.parent / "link.safetensors"),
        "hardlink": str(a.parent / "hard.safetensors"),
    }[spelling]
    if spelling == "symlink":
        os.symlink(a, output)
    if spelling == "hardlink":
        os.link(a, output)
    status, out, err = _merge(capsys, a, b, "-o", output)
    assert status == 2 and out == ""
    err = _one_error_line(err)
    assert "-o/--output" in err and "would replace an input" in err and "--force" in err
    assert "merge [" not in err  # no progress bar was started
    assert a.read_bytes() == before


def test_merge_force_replaces_an_input(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """With --force the output may be an input: it then holds the average."""
    a, b = pair
    status, _, err = _merge(capsys, a, b, "-o", a, "--force", "-q")
    assert status == 0, err
    assert tms.load(a).to_dict()["w"].tolist() == [2.0, 2.0, 2.0]


def test_merge_refuses_an_output_inside_an_input_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory input would hold the output (or be replaced): refused, both unchanged."""
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    run1.mkdir()
    run2.mkdir()
    _save(run1 / "model.safetensors", 1.0)
    _save(run2 / "model.safetensors", 3.0)
    before = sorted(p.name for p in run1.iterdir())
    for output in (run1, run1 / "model.safetensors", run1 / "soup.safetensors"):
        status, _, err = _merge(capsys, run1, run2, "-o", output)
        assert status == 2, output
        assert "would replace an input" in _one_error_line(err)
    assert sorted(p.name for p in run1.iterdir()) == before


def test_merge_refuses_a_sharded_output_over_an_input_shard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Writing shards into the directory that holds an input file is refused."""
    soup = tmp_path / "soup"
    soup.mkdir()
    a = _save(soup / "a.safetensors", 1.0)
    b = _save(tmp_path / "b.safetensors", 3.0)
    status, _, err = _merge(capsys, a, b, "-o", soup, "--max-shard-size", "8B")
    assert status == 2 and "would replace an input" in _one_error_line(err)
    assert sorted(p.name for p in soup.iterdir()) == ["a.safetensors"]


def test_merge_output_in_a_missing_directory_fails_before_reading(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing output directory: named, with the fix, before any bar or temp file."""
    a, b = pair
    missing = a.parent / "nope" / "soup.safetensors"
    status, out, err = _merge(capsys, a, b, "-o", missing)
    assert status == 2 and out == ""
    err = _one_error_line(err)
    assert f"-o/--output: the directory `{missing.parent}` does not exist" in err
    assert f"fix: create it first (mkdir -p {missing.parent})" in err
    assert "merge [" not in err and ".tmp" not in err and "tmp-" not in err


def test_merge_output_checks_come_before_reading_the_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad output is reported even when an input is missing: nothing was read."""
    a = _save(tmp_path / "a.safetensors", 1.0)
    status, _, err = _merge(capsys, a, tmp_path / "missing", "-o", tmp_path / "x" / "o")
    assert status == 2 and "-o/--output" in err and "missing" not in err.split("`")[1]


def test_merge_extensionless_output_is_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With directory inputs, `-o soup` writes soup/model.safetensors, not a bare file."""
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    for run, value in ((run1, 1.0), (run2, 3.0)):
        run.mkdir()
        _save(run / "model.safetensors", value)
    soup = tmp_path / "soup"
    status, out, err = _merge(capsys, run1, run2, "-o", soup, "-q")
    assert status == 0, err
    assert soup.is_dir() and (soup / "model.safetensors").is_file()
    assert f"wrote {soup / 'model.safetensors'}" in out
    assert tms.load(soup).to_dict()["w"].tolist() == [2.0, 2.0, 2.0]


def test_merge_refuses_a_file_name_with_another_extension(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o soup.pt` is refused with the fix (.safetensors, or a directory)."""
    a, b = pair
    status, _, err = _merge(capsys, a, b, "-o", a.parent / "soup.pt")
    err = _one_error_line(err)
    assert status == 2 and "a checkpoint file name ends in .safetensors" in err
    assert "fix: -o " in err and "soup.safetensors" in err
    assert not (a.parent / "soup.pt").exists()


def test_merge_refuses_to_replace_a_file_that_is_not_a_checkpoint(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing non-.safetensors file as the output is left alone."""
    a, b = pair
    notes = a.parent / "notes"
    notes.write_text("keep me")
    status, _, err = _merge(capsys, a, b, "-o", notes)
    assert status == 2 and "is not a .safetensors file" in _one_error_line(err)
    assert notes.read_text() == "keep me"


def test_merge_shards_into_a_file_name_is_refused(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-shard-size with a .safetensors OUT names the flag and shows the directory fix."""
    a, b = pair
    status, _, err = _merge(
        capsys, a, b, "-o", a.parent / "o.safetensors", "--max-shard-size", "1KB"
    )
    err = _one_error_line(err)
    assert status == 2 and "with --max-shard-size, OUT is the directory" in err
    assert f"fix: -o {a.parent / 'o'}{os.sep}" in err
    assert "max_shard_size" not in err and "`path`" not in err


def test_merge_bad_shard_size_names_the_flag(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """An unreadable --max-shard-size is a usage error that names --max-shard-size."""
    a, b = pair
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["merge", str(a), str(b), "-o", str(a.parent / "o"), "--max-shard-size", "5XB"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --max-shard-size:" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        cli.main(["merge", str(a), str(b), "-o", str(a.parent / "o"), "--max-shard-size", "0"])
    err = capsys.readouterr().err
    assert "argument --max-shard-size: must be positive" in err and "max_shard_size" not in err


def test_library_messages_name_the_flags() -> None:
    """A library message naming a Python parameter shows the flag instead, parts kept."""
    err = ValueError("`weights` must sum to 1.\n  got: [0.0]\n  fix: pass `max_shard_size`")
    assert (
        cli._one_line(err) == "`--weights` must sum to 1; got: [0.0]; fix: pass `--max-shard-size`"
    )


def test_merge_method_defaults_to_mean(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """--method mean is the default; an unknown method is a usage error listing the choices."""
    a, b = pair
    out = a.parent / "o.safetensors"
    assert _merge(capsys, a, b, "-o", out, "--method", "mean", "-q")[0] == 0
    assert tms.load(out).to_dict()["w"].tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(SystemExit):
        cli.main(["merge", str(a), str(b), "-o", str(out), "--method", "median"])
    assert "invalid choice: 'median'" in capsys.readouterr().err
