"""`merge --method slerp`: two checkpoints interpolated on the arc, checked first."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import torch_modelstate as tms
from torch_modelstate import ModelState, _slerp_files, cli, merges
from torch_modelstate._slerp_files import slerp_files
from torch_modelstate.checkpoint import _average, _budget


def two(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    a = {"w": torch.randn(8, 8), "h": torch.randn(5).bfloat16(), "n": torch.tensor(3)}
    b = {"w": torch.randn(8, 8), "h": torch.randn(5).bfloat16(), "n": torch.tensor(9)}
    tms.save(a, tmp_path / "a.safetensors")
    tms.save(b, tmp_path / "b.safetensors")
    return tmp_path / "a.safetensors", tmp_path / "b.safetensors", a, b


def test_slerp_of_two_files_equals_the_in_memory_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI writes what merges.slerp(t) gives in memory; integers from the first input."""
    pa, pb, a, b = two(tmp_path)
    out = tmp_path / "out.safetensors"
    argv = ["merge", str(pa), str(pb), "-o", str(out), "--method", "slerp", "--t", "0.3", "-q"]
    assert cli.main(argv) == 0
    assert "slerp (t=0.3) of 2 checkpoints" in capsys.readouterr().out
    expected = ModelState.new({k: v.clone() for k, v in a.items()})
    expected.merge(b, merges.slerp(0.3, nonfloat="lhs"))
    got = tms.load(out).to_dict()
    for key, value in expected.to_dict().items():
        assert got[key].dtype == value.dtype
        assert torch.equal(got[key], value), key


def test_slerp_defaults_to_the_midpoint(tmp_path: Path) -> None:
    """Without --t, t is 0.5."""
    pa, pb, a, b = two(tmp_path)
    out = slerp_files([pa, pb], tmp_path / "mid.safetensors")
    expected = merges.slerp(0.5)(["w"], a["w"], b["w"])
    assert torch.equal(tms.load(out).to_dict()["w"], expected)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "slerp", "c"], "--method slerp: interpolates exactly two checkpoints"),
        (["--method", "slerp", "--weights", "1", "2"], "--weights: --method slerp takes --t"),
        (["--t", "0.3"], "--t: only --method slerp takes it"),
        (["--method", "slerp", "--t", "nan"], "--t: must be a finite number"),
    ],
)
def test_slerp_command_lines_are_checked_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    """Usage errors exit with status 2, name the flag, and write nothing."""
    pa, pb, _, _ = two(tmp_path)
    (tmp_path / "c").write_bytes(b"")
    inputs = [str(pa), str(pb)]
    if "c" in extra:
        extra = [e for e in extra if e != "c"]
        inputs.append(str(tmp_path / "c"))
    out = tmp_path / "out.safetensors"
    assert cli.main(["merge", *inputs, "-o", str(out), *extra, "-q"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_slerp_of_mismatched_files_is_refused(tmp_path: Path) -> None:
    """Different shapes are a CheckpointMismatchError, as for the mean."""
    tms.save({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    tms.save({"w": torch.ones(3)}, tmp_path / "b.safetensors")
    with pytest.raises(tms.CheckpointMismatchError):
        slerp_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "o")
    with pytest.raises(ValueError, match="exactly two"):
        slerp_files([tmp_path / "a.safetensors"], tmp_path / "o")


def test_slerp_files_is_library_code_without_the_cli_layer() -> None:
    """_slerp_files imports nothing of the command line (UsageError, _cli_* modules)."""
    tree = ast.parse(Path(_slerp_files.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not [name for name in imported if "_cli" in name or name.endswith(".cli")]


def test_slerp_files_errors_name_the_fix(tmp_path: Path) -> None:
    """A wrong input count or t is a ValueError with expected, got and fix."""
    pa, pb, _, _ = two(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)expected: 2 inputs.*got: 1.*fix:"):
        slerp_files([pa], tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match=r"(?s)expected: a finite.*fix:"):
        slerp_files([pa, pb], tmp_path / "o.safetensors", t=float("nan"))


def test_slerp_files_imports_no_private_name_of_another_module() -> None:
    """The same-inputs check and the staging are shared public helpers of `average`."""
    tree = ast.parse(Path(_slerp_files.__file__).read_text())
    private = [
        alias.name
        for node in ast.walk(tree)
        # from a private module (`._average`), not a package (which lends its modules)
        if isinstance(node, ast.ImportFrom) and (node.module or "").rpartition(".")[2][:1] == "_"
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []


def test_slerp_files_reuses_its_staging_from_batch_to_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch after batch is read into the same staging memory, and the result is right."""
    a = {f"w{i}": torch.randn(64) for i in range(4)}
    b = {f"w{i}": torch.randn(64) for i in range(4)}
    tms.save(a, tmp_path / "a.safetensors")
    tms.save(b, tmp_path / "b.safetensors")
    ptrs: list[int] = []
    take = _average.Staging.take

    def spy(self: _average.Staging, wanted: list[tuple[torch.dtype, tuple[int, ...]]]) -> list:
        got = take(self, wanted)
        ptrs.append(got[0].untyped_storage().data_ptr())
        return got

    monkeypatch.setattr(_average.Staging, "take", spy)
    monkeypatch.setattr(_budget, "BUDGET", 64 * 4)  # one tensor per batch
    out = slerp_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "o")
    assert len(ptrs) == 8 and len(set(ptrs)) == 2  # two buffers (one per input), reused
    got = tms.load(out).to_dict()
    want = ModelState.new(a).clone()
    want.merge(b, merges.slerp(0.5))
    for key, value in want.to_dict().items():
        torch.testing.assert_close(got[key], value)


def test_slerp_of_files_with_different_ties_names_the_fix(tmp_path: Path) -> None:
    """Ties that differ are a CheckpointMismatchError with a fix, as for the mean."""
    model = torch.nn.ModuleDict({"enc": torch.nn.Linear(2, 2), "dec": torch.nn.Linear(2, 2)})
    tms.save(ModelState.new(model).tie("dec.weight", "enc.weight"), tmp_path / "a.safetensors")
    plain = {k: v for k, v in model.state_dict().items() if k != "dec.weight"}  # same keys
    tms.save(plain, tmp_path / "b.safetensors")
    with pytest.raises(tms.CheckpointMismatchError, match=r"(?s)ties differ.*fix: interpolate"):
        slerp_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "o")
