"""Checkpoints: damaged files, bad paths and indexes, ties that do not fit, streaming."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from _io_helpers import assert_values, build, header_of, saved, snapshot, write_raw
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import torch_modelstate as tms
from torch_modelstate import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    ModelState,
)
from torch_modelstate.checkpoint import _budget

# --------------------------------------------------------------------------- damaged files


def load_fails(path: Path, error: type[Exception], match: str) -> None:
    """Loading `path` into a model raises `error` and leaves the model as it was."""
    target = build(seed=11)
    before = snapshot(target)
    grads = {k: p.requires_grad for k, p in target.named_parameters()}
    with pytest.raises(error, match=match):
        tms.load(path, into=target)
    assert_values(snapshot(target), before)
    assert {k: p.requires_grad for k, p in target.named_parameters()} == grads
    assert ModelState.new(target).ties() == {
        "head.weight": "emb.weight",
        "dec.weight": "enc.weight",
    }


def test_empty_file(tmp_path: Path) -> None:
    """A zero-byte file is named as empty."""
    path = tmp_path / "e.safetensors"
    path.write_bytes(b"")
    load_fails(path, CheckpointCorruptError, r"e.safetensors: the file is empty")


def test_file_shorter_than_the_header_length(tmp_path: Path) -> None:
    """Fewer than 8 bytes cannot even hold the header length."""
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    load_fails(path, CheckpointCorruptError, r"truncated: 3 bytes")


def test_truncated_data(tmp_path: Path) -> None:
    """A file cut inside its tensor data is truncated, and says how much is missing."""
    path = saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    load_fails(
        path,
        CheckpointCorruptError,
        r"m.safetensors: the file is truncated: the header describes \d+ bytes",
    )


def test_truncated_header(tmp_path: Path) -> None:
    """A file cut inside its header: the header length runs past the end."""
    path = saved(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    load_fails(
        path,
        CheckpointCorruptError,
        r"header length field says \d+ bytes, but only 92 bytes follow",
    )


def test_header_length_that_lies(tmp_path: Path) -> None:
    """A length field larger than the file is caught before reading."""
    path = write_raw(tmp_path / "l.safetensors", {}, length=10**12)
    load_fails(path, CheckpointCorruptError, r"header length field says 1000000000000 bytes")


def test_corrupted_header_bytes(tmp_path: Path) -> None:
    """Garbage in the header is not valid JSON."""
    path = saved(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[8:20] = b"\xff" * 12
    path.write_bytes(bytes(raw))
    load_fails(path, CheckpointCorruptError, r"the header is not valid JSON")


def test_header_that_is_not_an_object(tmp_path: Path) -> None:
    """A JSON list is not a safetensors header."""
    load_fails(
        write_raw(tmp_path / "h.safetensors", [1, 2]), CheckpointCorruptError, r"not an object"
    )


def test_trailing_bytes_after_the_data(tmp_path: Path) -> None:
    """Bytes the header does not describe are a corrupted file."""
    path = saved(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    load_fails(path, CheckpointCorruptError, r"8 bytes follow the last tensor's data")


def test_gap_between_tensors(tmp_path: Path) -> None:
    """Offsets that leave a hole in the data are refused."""
    header = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
    }
    path = write_raw(tmp_path / "g.safetensors", header, b"\0" * 12)
    load_fails(path, CheckpointCorruptError, r"tensor `b` starts at data byte 8, expected 4")


def test_size_that_does_not_match_the_shape(tmp_path: Path) -> None:
    """A tensor whose offsets span a different size than its shape needs."""
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    path = write_raw(tmp_path / "z.safetensors", header, b"\0" * 8)
    load_fails(path, CheckpointCorruptError, r"needs 12 bytes, but its data_offsets span 8")


def test_unknown_dtype_code(tmp_path: Path) -> None:
    """A dtype code outside the format is named."""
    header = {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}
    path = write_raw(tmp_path / "d.safetensors", header, b"\0" * 16)
    load_fails(path, CheckpointCorruptError, r"tensor `a` has the unsupported dtype 'F128'")


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    """A header naming a tensor twice is corrupted (JSON would keep the last silently)."""
    entry = b'{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}'
    raw = b'{"a":' + entry % (0, 4) + b',"a":' + entry % (4, 8) + b"}"
    path = write_raw(tmp_path / "d.safetensors", raw, b"\0" * 8)
    load_fails(path, CheckpointCorruptError, r"appears twice")


def test_shape_mismatch_with_the_target(tmp_path: Path) -> None:
    """A checkpoint of another width names the key, the target's and the file's shapes."""
    other = nn.ModuleDict({"enc": nn.Linear(4, 3)})
    path = saved(tmp_path, other)
    target = nn.ModuleDict({"enc": nn.Linear(4, 2)})
    before = snapshot(target)
    with pytest.raises(
        CheckpointMismatchError, match=r"shape mismatch for `enc.weight`.*\n.*\(2, 4\)\n.*\(3, 4\)"
    ):
        tms.load(path, into=target)
    assert_values(snapshot(target), before)


def test_missing_keys_are_an_error_by_default(tmp_path: Path) -> None:
    """A file without some of the target's keys raises and names them."""
    state = {
        k: v
        for k, v in snapshot(build()).items()
        if k not in ("bn.weight", "head.weight", "dec.weight")
    }
    save_file(state, tmp_path / "p.safetensors")
    load_fails(
        tmp_path / "p.safetensors",
        CheckpointMismatchError,
        r"1 missing from the file.*\n.*bn.weight",
    )


def test_unexpected_keys_are_an_error_by_default(tmp_path: Path) -> None:
    """A file with keys the target lacks raises and names them."""
    state = {k: v for k, v in snapshot(build()).items() if k not in ("head.weight", "dec.weight")}
    save_file({**state, "extra.weight": torch.zeros(1)}, tmp_path / "u.safetensors")
    load_fails(
        tmp_path / "u.safetensors",
        CheckpointMismatchError,
        r"1 not in the target.*\n.*extra.weight",
    )


def test_strict_false_loads_the_common_keys_and_reports_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Missing keys keep their values, unexpected ones are ignored, both are logged."""
    source = build()
    state = {
        k: v
        for k, v in snapshot(source).items()
        if k not in ("bn.weight", "head.weight", "dec.weight")
    }
    save_file({**state, "extra": torch.zeros(1)}, tmp_path / "p.safetensors")
    target = build(seed=12)
    bn_weight = target["bn"].weight.detach().clone()
    report = tms.io.check(tmp_path / "p.safetensors", target, strict=False)
    assert report.missing == ("bn.weight",) and report.unexpected == ("extra",)
    with caplog.at_level(logging.WARNING, logger="torch_modelstate"):
        tms.load(tmp_path / "p.safetensors", into=target, strict=False)
    assert "bn.weight" in caplog.text and "extra" in caplog.text
    assert torch.equal(target["bn"].weight, bn_weight)
    assert torch.equal(target["enc"].weight, source["enc"].weight)


def test_strict_false_still_checks_shapes(tmp_path: Path) -> None:
    """Relaxing keys does not relax shapes."""
    path = saved(tmp_path, {"weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointMismatchError, match="shape mismatch for `weight`"):
        tms.load(path, into=nn.Linear(2, 2), strict=False)


def test_malformed_metadata_json(tmp_path: Path) -> None:
    """A torch_modelstate entry that is not JSON is a clear error, and nothing is evaluated."""
    state = {k: v for k, v in snapshot(build()).items() if k not in ("head.weight", "dec.weight")}
    save_file(
        state,
        tmp_path / "j.safetensors",
        metadata={"format": "pt", "torch_modelstate": "__import__('os')"},
    )
    load_fails(
        tmp_path / "j.safetensors",
        CheckpointCorruptError,
        r"`torch_modelstate` metadata entry is malformed",
    )


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ([], "expected a JSON object"),
        ({"keys": []}, "positive integer `version`"),
        (
            {"version": 1, "keys": "a", "state": [], "frozen": [], "ties": {}},
            "`keys` must be a list",
        ),
        (
            {"version": 1, "keys": ["w"], "state": [], "frozen": [], "ties": []},
            "`ties` must be an object",
        ),
        (
            {
                "version": 1,
                "keys": ["w", "v"],
                "state": [],
                "frozen": [],
                "ties": {"v": {"src": "w"}},
            },
            "the tie `v`",
        ),
        (
            {
                "version": 1,
                "keys": ["w", "v"],
                "state": [],
                "frozen": [],
                "ties": {"v": {"source": "x"}},
            },
            "source `x`",
        ),
        (
            {"version": 1, "keys": ["x"], "state": [], "frozen": [], "ties": {}},
            "does not list the stored",
        ),
        (
            {"version": 1, "keys": ["w"], "state": [], "frozen": ["q"], "ties": {}},
            "`frozen` lists `q`",
        ),
    ],
)
def test_metadata_entry_with_a_wrong_schema(tmp_path: Path, entry: object, problem: str) -> None:
    """Each field of the entry is checked; the message says which."""
    path = tmp_path / "s.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={"torch_modelstate": json.dumps(entry)})
    with pytest.raises(CheckpointCorruptError, match=problem):
        tms.load(path)


def test_metadata_from_a_newer_version(tmp_path: Path) -> None:
    """A future metadata version asks to upgrade."""
    entry = {"version": 2, "keys": ["w"], "state": [], "frozen": [], "ties": {}}
    save_file(
        {"w": torch.zeros(2)},
        tmp_path / "n.safetensors",
        metadata={"torch_modelstate": json.dumps(entry)},
    )
    with pytest.raises(CheckpointError, match=r"newer torch_modelstate.*\n.*upgrade"):
        tms.load(tmp_path / "n.safetensors")


def test_unknown_transform_name(tmp_path: Path) -> None:
    """A tie whose transform is not registered here is an error, and the target is untouched."""
    path = saved(tmp_path)
    header, data = header_of(path)
    metadata = header["__metadata__"]
    assert isinstance(metadata, dict)
    metadata["torch_modelstate"] = metadata["torch_modelstate"].replace(
        '"transpose"', '"os.system"'
    )
    write_raw(path, header, data)
    load_fails(
        path,
        CheckpointError,
        r"transform 'os.system', which is not registered here.*\n.*\n.*register_transform",
    )
    with pytest.raises(CheckpointError, match="not registered"):
        tms.load(path)


@given(st.integers(min_value=0, max_value=10**6))
def test_truncation_law(cut: int) -> None:
    """A valid checkpoint cut at any length raises CheckpointError; the target is untouched."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        tms.save(build(), path)
        raw = path.read_bytes()
        path.write_bytes(raw[: cut % len(raw)])
        target = build(seed=13)
        before = snapshot(target)
        with pytest.raises(CheckpointError):
            tms.load(path, into=target)
        assert_values(snapshot(target), before)


# --------------------------------------------------------------------------- paths and indexes


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    """A path that does not exist is FileNotFoundError, not a CheckpointError."""
    with pytest.raises(FileNotFoundError, match=r"No checkpoint at `.*nope.safetensors`"):
        tms.load(tmp_path / "nope.safetensors")


def test_directory_without_a_checkpoint_is_file_not_found(tmp_path: Path) -> None:
    """A directory must hold model.safetensors or an index; pickles are never read."""
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"expected `model.safetensors`.*never read"):
        tms.load(tmp_path)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    """A shard the index names but the directory lacks is FileNotFoundError naming it."""
    tms.save(build(), tmp_path, max_shard_size=50)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"names the shard `{shard.name}`, which does not"):
        tms.load(tmp_path)


def test_index_that_is_not_json(tmp_path: Path) -> None:
    """A corrupted index is a CheckpointCorruptError naming it."""
    (tmp_path / "model.safetensors.index.json").write_text("{weight_map")
    load_fails(
        tmp_path,
        CheckpointCorruptError,
        r"model.safetensors.index.json: the index is not valid JSON",
    )


def test_index_pointing_outside_its_directory(tmp_path: Path) -> None:
    """Shard names are plain file names; a path escaping the directory is refused."""
    index = {"weight_map": {"w": "../other.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointCorruptError, match=r"expected the name of a shard file"):
        tms.load(tmp_path)


def test_index_that_disagrees_with_a_shard(tmp_path: Path) -> None:
    """A key the index maps to a shard that lacks it is refused before any write."""
    tms.save(build(), tmp_path, max_shard_size=50)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    last = sorted(tmp_path.glob("model-*.safetensors"))[-1].name
    index["weight_map"]["enc.weight"] = last
    index_path.write_text(json.dumps(index))
    load_fails(
        tmp_path, CheckpointCorruptError, rf"maps `enc.weight` to `{last}`, which has no such"
    )


def test_shards_from_different_saves(tmp_path: Path) -> None:
    """Shards whose torch_modelstate entries differ are detected."""
    tms.save(build(), tmp_path / "a", max_shard_size=50)
    model = build()
    ModelState.new(model).freeze("enc.bias")
    tms.save(model, tmp_path / "b", max_shard_size=50)
    name = sorted((tmp_path / "a").glob("model-*.safetensors"))[1].name
    (tmp_path / "a" / name).write_bytes((tmp_path / "b" / name).read_bytes())
    load_fails(tmp_path / "a", CheckpointCorruptError, r"the shards come from different saves")


def test_directory_with_both_layouts_is_ambiguous(tmp_path: Path) -> None:
    """model.safetensors next to an index is refused rather than guessed."""
    tms.save(build(), tmp_path / "single.safetensors")
    tms.save(build(), tmp_path, max_shard_size=100)
    (tmp_path / "single.safetensors").rename(tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"both `model.safetensors` and `model.safetensors.index.json`"
    ):
        tms.load(tmp_path)


# --------------------------------------------------------------------------- ties vs. the target


def test_tie_that_conflicts_with_the_targets_tie(tmp_path: Path) -> None:
    """The file ties a key the target ties to another source: a mismatch, target untouched."""
    ms = ModelState.new({"a": torch.ones(2), "b": torch.zeros(2), "c": torch.ones(2)}).tie("c", "a")
    path = saved(tmp_path, ms)
    target = ModelState.new({"a": torch.ones(2), "b": torch.zeros(2), "c": torch.zeros(2)}).tie(
        "c", "b"
    )
    with pytest.raises(
        CheckpointMismatchError, match=r"ties `c` to `a`, but the target ties it to `b`"
    ):
        tms.load(path, into=target)
    assert target.ties() == {"c": "b"}


def test_tie_that_does_not_fit_the_target(tmp_path: Path) -> None:
    """A transform tie whose result has the wrong shape in the target is refused before writing."""
    ms = ModelState.new({"a": torch.ones(2, 3), "b": torch.zeros(3, 2)}).tie("b", "a", "transpose")
    path = saved(tmp_path, ms)
    target = ModelState.new({"a": torch.ones(2, 3), "b": torch.zeros(2, 3)})
    with pytest.raises(
        CheckpointMismatchError, match=r"ties `b` to transpose\(`a`\), which does not fit"
    ):
        tms.load(path, into=target)
    assert target.ties() == {} and torch.equal(target.to_dict()["a"], torch.ones(2, 3))


def test_file_values_that_disagree_for_a_tied_target(tmp_path: Path) -> None:
    """Two stored keys that are one tensor in the target must hold equal values."""
    untied = build(tie=False)
    ModelState.new(untied).tie("dec.weight", "enc.weight", "transpose")
    path = saved(tmp_path, untied)
    load_fails(
        path, CheckpointMismatchError, r"`emb.weight` and `head.weight` hold different values"
    )


def test_file_values_that_agree_for_a_tied_target_load(tmp_path: Path) -> None:
    """Equal values under both keys of a tied tensor load fine."""
    untied = build(tie=False)
    with torch.no_grad():
        untied["head"].weight.copy_(untied["emb"].weight)
    ModelState.new(untied).tie("dec.weight", "enc.weight", "transpose")
    target = build(seed=14)
    tms.load(saved(tmp_path, untied), into=target)
    assert target["head"].weight is target["emb"].weight
    assert torch.equal(target["emb"].weight, untied["emb"].weight)


def test_load_into_a_meta_model_is_refused(tmp_path: Path) -> None:
    """Meta tensors have no memory to load into; the fix says how to materialize."""
    with pytest.raises(CheckpointMismatchError, match=r"meta device.*\n.*to_empty"):
        tms.load(saved(tmp_path, nn.Linear(2, 2)), into=nn.Linear(2, 2, device="meta"))


def test_check_changes_nothing(tmp_path: Path) -> None:
    """`check` reports what a load would do without doing it."""
    target = build(seed=15, tie=False)
    before = snapshot(target)
    report = tms.io.check(saved(tmp_path), target)
    assert set(report.ties) == {"dec.weight", "head.weight"} and report.missing == ()
    assert ModelState.new(target).ties() == {}
    assert_values(snapshot(target), before)


def test_load_into_bumps_the_version_counter(tmp_path: Path) -> None:
    """In-place reads count as in-place writes for autograd, as copy_ does."""
    target = nn.Linear(2, 2)
    version = target.weight._version
    tms.load(saved(tmp_path, nn.Linear(2, 2)), into=target)
    assert target.weight._version > version


# --------------------------------------------------------------------------- streaming


def test_large_loads_read_in_parallel_in_place(tmp_path: Path) -> None:
    """Tensors above the threading threshold are read by several threads into the target."""
    source = {"a": torch.randn(3_000_000), "b": torch.randn(2_000, 1_500), "c": torch.arange(7.0)}
    path = saved(tmp_path, source)
    target = ModelState.new({k: torch.zeros_like(v) for k, v in source.items()})
    a = target.to_dict()["a"]
    tms.load(path, into=target)
    assert target.to_dict()["a"] is a
    assert_values(target.to_dict(), source)
    assert_values(tms.load(path).to_dict(), source)


def test_a_file_that_shrinks_after_opening_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that comes back short (the file changed under us) is a CheckpointCorruptError."""
    path = saved(tmp_path, {"a": torch.randn(3_000_000), "b": torch.randn(3_000_000)})
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: 0)
    target = ModelState.new({"a": torch.zeros(3_000_000), "b": torch.zeros(3_000_000)})
    with pytest.raises(CheckpointCorruptError, match=r"the file ended while reading tensor `a`"):
        tms.load(path, into=target)


def test_staged_loads_copy_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values that need a cast are staged a few at a time and all arrive."""
    source = {f"t{i}": torch.randn(4, 4, dtype=torch.float64) for i in range(10)}
    path = saved(tmp_path, source)
    monkeypatch.setattr(_budget, "BUDGET", 300)
    target = ModelState.new({k: torch.zeros(4, 4) for k in source})
    assert len(tms.io.check(path, target).cast) == 10
    tms.load(path, into=target)
    assert_values(target.to_dict(), {k: v.float() for k, v in source.items()})


def test_saves_copy_non_contiguous_tensors_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors that need a copy to be written are copied a few at a time."""
    source = {f"t{i}": torch.randn(5, 3).t() for i in range(10)}
    monkeypatch.setattr(_budget, "BUDGET", 150)
    assert_values(
        tms.load(saved(tmp_path, source)).to_dict(), {k: v.contiguous() for k, v in source.items()}
    )


def test_load_into_an_expanded_buffer_is_refused_before_writing(tmp_path: Path) -> None:
    """A target buffer whose elements share memory cannot be loaded into; nothing written."""

    class Expanded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.register_buffer("pos", torch.zeros(1).expand(4))

    path = tmp_path / "m.safetensors"
    tms.save(Expanded(), path)
    target = Expanded()
    before = target.fc.weight.detach().clone()
    with pytest.raises(CheckpointMismatchError, match="share one memory"):
        tms.load(path, into=target)
    assert torch.equal(target.fc.weight, before)


def test_save_to_a_new_directory_named_with_a_slash(tmp_path: Path) -> None:
    """`save(m, "new/")` creates the directory and writes model.safetensors in it."""
    tms.save(nn.Linear(2, 2), f"{tmp_path}/new/")
    assert (tmp_path / "new" / "model.safetensors").is_file()


def test_a_dimension_too_large_is_a_corrupt_file(tmp_path: Path) -> None:
    """A header dimension of 2**63 or more is a CheckpointCorruptError naming the file."""
    header = b'{"w":{"dtype":"F32","shape":[0,1180591620717411303424],"data_offsets":[0,0]}}'
    header += b" " * (-len(header) % 8)
    path = tmp_path / "z.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CheckpointCorruptError, match=r"z\.safetensors"):
        tms.load(path)
