"""The command line: inspect, merge and demo, as subprocesses and in process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torch_modelstate as tms
from torch_modelstate import ModelState, cli

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m torch_modelstate ARGS`` with this checkout importable."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "torch_modelstate", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def model(seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    m = nn.ModuleDict({"enc": nn.Linear(4, 2), "dec": nn.Linear(2, 4), "bn": nn.BatchNorm1d(3)})
    ModelState.new(m).tie("dec.weight", "enc.weight", "transpose").freeze("bn.**")
    with torch.no_grad():
        m["bn"].num_batches_tracked.fill_(seed)
    return m


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    tms.save(model(), path)
    return path


# --------------------------------------------------------------------------- subprocesses


def test_inspect_prints_totals_modules_frozen_flags_and_ties(ckpt: Path) -> None:
    """The text summary: parameters apart from state, the Axon total, a module table, ties."""
    result = run("inspect", ckpt)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # 8 + 2 + 4 + 3 + 3 parameters (dec.weight is tied), 3 + 3 + 1 state; bn is frozen
    summary = [" ".join(line.split()) for line in out.splitlines()[3:11]]
    assert summary == [
        "Parameters: 20 (80 B)",
        "trainable 14 (56 B)",
        "frozen 6 (24 B)",
        "State (buffers): 7 (32 B)",
        "trainable 0 (0 B)",
        "Total: 27 (112 B): parameters and state, as Axon counts",
        "Tensors: 8 stored, 1 tied (tie destinations are stored once, as their source)",
        "Dtypes: float32 (7 tensors, 26 elements, 104 B), int64 (1 tensor, 1 element, 8 B)",
    ]
    assert "float32 (7 tensors, 26 elements, 104 B), int64 (1 tensor, 1 element, 8 B)" in out
    rows = {line.split()[0]: re.split(r"\s{2,}", line) for line in out.splitlines()[-3:]}
    assert rows["dec"][-1] == "weight = transpose(enc.weight)"
    assert rows["bn"][4] == "yes" and rows["enc"][4] == "no"


def test_inspect_json_is_machine_readable(ckpt: Path) -> None:
    """--json prints one JSON document with totals, dtypes, modules, ties and tensors."""
    result = run("inspect", ckpt, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["total"] == {"tensors": 8, "elements": 27, "bytes": 112}
    assert info["ties"] == {"dec.weight": {"source": "enc.weight", "transform": "transpose"}}
    assert info["dtypes"]["int64"] == {"tensors": 1, "elements": 1, "bytes": 8}
    assert [m["name"] for m in info["modules"]] == ["enc", "dec", "bn"]
    frozen = {t["key"]: t["frozen"] for t in info["tensors"]}
    assert frozen["bn.running_mean"] is True and frozen["enc.weight"] is False


def test_merge_writes_the_weighted_average_with_a_progress_bar(tmp_path: Path) -> None:
    """merge averages floats with the given weights, takes integers from the first input."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tms.save(model(0), a)
    tms.save(model(1), b)
    out = tmp_path / "out.safetensors"
    result = run("merge", a, b, "-o", out, "--weights", "1", "3")
    assert result.returncode == 0, result.stderr
    assert "merge [" in result.stderr and "100%" in result.stderr
    assert f"wrote {out}" in result.stdout
    merged = tms.load(out)
    ma, mb = model(0).state_dict(), model(1).state_dict()
    values = merged.to_dict()
    assert torch.allclose(values["enc.weight"], 0.25 * ma["enc.weight"] + 0.75 * mb["enc.weight"])
    assert values["bn.num_batches_tracked"].item() == 0
    assert (
        merged.ties() == {"dec.weight": "enc.weight"} and "bn.running_mean" in merged.frozen_state()
    )


def test_missing_file_is_one_line_on_stderr(tmp_path: Path) -> None:
    """Bad input: exit status 1, one line naming the problem, no traceback."""
    result = run("inspect", tmp_path / "nope.safetensors")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("torch-modelstate inspect: error: No checkpoint at")


def test_damaged_file_is_one_line_on_stderr(ckpt: Path) -> None:
    """A truncated file: the message names the file and the problem on one line."""
    ckpt.write_bytes(ckpt.read_bytes()[:-4])
    result = run("merge", ckpt, ckpt, "-o", ckpt.with_name("o.safetensors"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"{ckpt}: the file is truncated" in result.stderr
    assert not ckpt.with_name("o.safetensors").exists()


# --------------------------------------------------------------------------- in process


def test_usage_error_is_one_line_and_exit_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A command line argparse rejects ends with one line and status 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["merge", "a.safetensors"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "required: -o/--output" in err


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str], ckpt: Path) -> None:
    """Options a command does not define are rejected."""
    with pytest.raises(SystemExit):
        cli.main(["inspect", str(ckpt), "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_merge_refuses_mismatched_shapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Inputs of different shapes are rejected before anything is written."""
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(3)}, tmp_path / "b.safetensors")
    out = tmp_path / "o.safetensors"
    assert (
        cli.main(
            [
                "merge",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "b.safetensors"),
                "-o",
                str(out),
            ]
        )
        == 1
    )
    assert "`w` differs" in capsys.readouterr().err and not out.exists()


def test_merge_refuses_mismatched_dtypes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Inputs whose dtypes differ are rejected with both dtypes named."""
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, tmp_path / "b.safetensors")
    args = [
        "merge",
        str(tmp_path / "a.safetensors"),
        str(tmp_path / "b.safetensors"),
        "-o",
        str(tmp_path / "o"),
    ]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "expected: float32 (2,)" in err and "got: float16 (2,)" in err


def test_merge_refuses_mismatched_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Inputs with different keys are rejected, naming a missing key."""
    save_file({"w": torch.zeros(2), "v": torch.zeros(1)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    args = [
        "merge",
        str(tmp_path / "a.safetensors"),
        str(tmp_path / "b.safetensors"),
        "-o",
        str(tmp_path / "o"),
    ]
    assert cli.main(args) == 1
    assert "its keys differ" in capsys.readouterr().err


def test_merge_needs_one_weight_per_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ckpt: Path
) -> None:
    """A weight count that does not match the inputs is an error."""
    args = ["merge", str(ckpt), str(ckpt), "-o", str(tmp_path / "o.safetensors"), "--weights", "1"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--weights: give one weight per input; expected: 2 weights (one per IN); got: 1" in err


def test_merge_keeps_low_precision_dtypes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bfloat16 inputs are averaged in float32 and written as bfloat16."""
    save_file({"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}, tmp_path / "a.safetensors")
    save_file({"w": torch.tensor([2.0, 4.0], dtype=torch.bfloat16)}, tmp_path / "b.safetensors")
    out = tmp_path / "o.safetensors"
    assert (
        cli.main(
            [
                "merge",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / "b.safetensors"),
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    value = tms.load(out).to_dict()["w"]
    assert value.dtype == torch.bfloat16 and value.tolist() == [1.5, 3.0]
    assert capsys.readouterr().err == ""


def test_merge_writes_shards(tmp_path: Path, ckpt: Path) -> None:
    """--max-shard-size writes the sharded layout into the output directory."""
    out = tmp_path / "merged"
    assert (
        cli.main(["merge", str(ckpt), str(ckpt), "-o", str(out), "--max-shard-size", "40B", "-q"])
        == 0
    )
    assert (out / "model.safetensors.index.json").is_file()
    assert torch.equal(tms.load(out).to_dict()["enc.weight"], model().state_dict()["enc.weight"])


def test_inspect_a_sharded_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory with an index is summarised across its shards."""
    tms.save(model(), tmp_path, max_shard_size=40)
    assert cli.main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["files"]) > 1 and info["total"]["elements"] == 27
    assert info["index"].endswith("model.safetensors.index.json")


def test_inspect_depth_limits_the_module_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--depth 1 shows top-level modules only."""
    tms.save({"a": {"b": {"c": torch.zeros(2)}}, "d": torch.zeros(1)}, tmp_path / "n.safetensors")
    assert cli.main(["inspect", str(tmp_path / "n.safetensors"), "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "(top level)" in out and "\na " in out.replace("  ", " ") and "    b" not in out


def test_inspect_a_file_from_another_tool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without our metadata, frozen flags are unknown and everything counts as parameters."""
    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "x.safetensors")
    assert cli.main(["inspect", str(tmp_path / "x.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "no torch_modelstate metadata" in out and "Total:            4 (16 B)\n" in out
    assert "every tensor counts as a parameter" in out and "format" not in out
    assert re.split(r"\s{2,}", out.splitlines()[-1])[4] == "?"


def test_merge_refuses_inputs_tied_differently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checkpoints whose ties differ cannot be averaged key by key."""
    tied = ModelState.new({"a": torch.ones(2), "c": torch.zeros(2), "b": torch.zeros(2)})
    tms.save(tied.tie("b", "c"), tmp_path / "y.safetensors")  # stores a and c
    tms.save({"a": torch.ones(2), "c": torch.zeros(2)}, tmp_path / "z.safetensors")
    out = tmp_path / "o.safetensors"
    args = [
        "merge",
        str(tmp_path / "y.safetensors"),
        str(tmp_path / "z.safetensors"),
        "-o",
        str(out),
    ]
    assert cli.main(args) == 1
    assert "its ties differ" in capsys.readouterr().err


def test_merge_weights_must_not_sum_to_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ckpt: Path
) -> None:
    """Weights are normalised, so their sum must be non-zero."""
    args = [
        "merge",
        str(ckpt),
        str(ckpt),
        "-o",
        str(tmp_path / "o.safetensors"),
        "--weights",
        "1",
        "-1",
    ]
    assert cli.main(args) == 2
    assert "--weights: the weights must be finite numbers with a non-zero sum" in (
        capsys.readouterr().err
    )


# ------------------------------------------------------------- inspect (issues 8 and 12)


def test_inspect_one_shard_says_so_and_shows_it_as_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One shard beside its index is a good file: named as a shard, its own tensors shown."""
    tms.save(model(), tmp_path, max_shard_size=40)
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[0]
    assert cli.main(["inspect", str(shard)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "malformed" not in out + captured.err and "re-save" not in out + captured.err
    assert "one shard (1 of 3) of a sharded checkpoint" in out
    assert f"listed by {tmp_path / 'model.safetensors.index.json'}" in out
    assert cli.main(["inspect", str(shard), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    stored = tms.load(tmp_path).to_dict()
    keys = [t["key"] for t in info["tensors"]]
    assert keys and set(keys) < set(stored)  # a subset: this shard's tensors only
    assert info["shard"]["number"] == 1 and info["shard"]["of"] == 3
    assert info["total"]["elements"] == sum(stored[k].numel() for k in keys)
    assert info["frozen_known"] is True  # from the checkpoint's metadata, via the index


def test_inspect_a_lone_shard_without_its_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shard copied away from its index is recognised by its name, its tensors shown."""
    tms.save(model(), tmp_path / "sharded", max_shard_size=40)
    lone = tmp_path / "model-00002-of-00003.safetensors"
    lone.write_bytes((tmp_path / "sharded" / lone.name).read_bytes())
    assert cli.main(["inspect", str(lone)]) == 0
    out = capsys.readouterr().out
    assert "one shard (2 of 3) of a sharded checkpoint" in out
    assert "no index beside it" in out and "malformed" not in out


def test_inspect_a_renamed_shard_alone_is_recognised_by_its_stamp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shard renamed and copied away from its index is still named as shard i of n."""
    tms.save(model(), tmp_path / "sharded", max_shard_size=40)
    piece = tmp_path / "piece.safetensors"
    piece.write_bytes((tmp_path / "sharded" / "model-00003-of-00003.safetensors").read_bytes())
    assert cli.main(["inspect", str(piece)]) == 0
    out = capsys.readouterr().out
    assert "one shard (3 of 3) of a sharded checkpoint" in out and "malformed" not in out


def test_inspect_a_shard_named_otherwise_but_listed_by_an_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shard from another tool, with a custom name, is recognised by the index beside it."""
    save_file({"a.weight": torch.zeros(2)}, tmp_path / "part-a.safetensors")
    save_file({"b.weight": torch.zeros(3)}, tmp_path / "part-b.safetensors")
    weight_map = {"a.weight": "part-a.safetensors", "b.weight": "part-b.safetensors"}
    index = tmp_path / "weights.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 20}, "weight_map": weight_map}))
    assert cli.main(["inspect", str(tmp_path / "part-a.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "one shard of a sharded checkpoint" in out and f"listed by {index}" in out
    assert "Total:            2 (8 B)" in out


def test_inspect_uses_thousands_separators_and_short_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Large counts read as 1,234,567 (1.2M), as PyTorch tools print them."""
    tms.save({"emb": {"weight": torch.zeros(1000, 1235)}}, tmp_path / "big.safetensors")
    assert cli.main(["inspect", str(tmp_path / "big.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "Parameters:       1,235,000 (1.2M, 4.94 MB)\n" in out
    assert "float32 (1 tensor, 1,235,000 elements, 4.94 MB)" in out
    assert re.search(r"emb\s+1\s+1,235,000\s+4\.94 MB", out)


def test_inspect_never_prints_format_question_mark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file without `format` metadata is described without a "format ?" placeholder."""
    save_file({"w": torch.zeros(3)}, tmp_path / "x.safetensors", metadata={})
    assert cli.main(["inspect", str(tmp_path / "x.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "?" not in out.split("\n\n")[0] and "format" not in out


def test_inspect_tensors_lists_key_shape_dtype(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--tensors lists every stored tensor with its shape, dtype, kind and frozen flag."""
    assert cli.main(["inspect", str(ckpt), "--tensors"]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split()[0]: re.split(r"\s{2,}", line)
        for line in out.split("\nkey ")[1].splitlines()[1:]
    }
    assert rows["enc.weight"][1:5] == ["[2, 4]", "float32", "parameter", "no"]
    assert rows["bn.num_batches_tracked"][1:5] == ["[]", "int64", "state", "yes"]
    assert "dec.weight = transpose(enc.weight)" in out


def test_inspect_help_states_the_depth_default_and_an_example(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`inspect --help` says what --depth does by default and shows examples."""
    with pytest.raises(SystemExit):
        cli.main(["inspect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: all depths; 1: the outermost modules)" in text
    assert "examples: torch-modelstate inspect model.safetensors" in text
    assert "--tensors" in text


def test_multi_line_library_messages_keep_their_parts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A message of several lines is one line on stderr with its parts joined by '; '."""
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(2, dtype=torch.float16)}, tmp_path / "b.safetensors")
    args = ["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    assert cli.main([*args, "-o", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "differs from" in err and "; expected: float32 (2,); got: float16 (2,)" in err


def test_inspect_depth_must_be_positive(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--depth 0 or -1 is a usage error naming --depth, not an empty table."""
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["inspect", str(ckpt), "--depth", bad])
        assert exit_info.value.code == 2
        assert "argument --depth: expected a positive integer" in capsys.readouterr().err
