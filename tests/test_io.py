"""Checkpoints: save and load round trips, ties, frozen sets, shards, atomic writes."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from _io_helpers import assert_values, build, header_of, saved, snapshot
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import torch_modelstate as tms
from torch_modelstate import CheckpointMismatchError, ModelState, _kernels
from torch_modelstate.checkpoint import _layout, _writer

# --------------------------------------------------------------------------- the file


def test_save_writes_a_plain_safetensors_file(tmp_path: Path) -> None:
    """Any safetensors reader opens the file; its metadata has format pt and a versioned entry."""
    path = saved(tmp_path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    assert metadata["format"] == "pt"
    entry = json.loads(metadata["torch_modelstate"])
    assert entry["version"] == 1
    assert keys == {
        "enc.weight",
        "enc.bias",
        "dec.bias",
        "bn.weight",
        "bn.bias",
        "bn.running_mean",
    } | {
        "bn.running_var",
        "bn.num_batches_tracked",
        "emb.weight",
    }


def test_metadata_records_order_state_frozen_and_ties(tmp_path: Path) -> None:
    """The entry lists every key in state_dict order, the state keys, frozen set and ties."""
    model = build()
    ModelState.new(model).freeze(["enc.bias", "bn.running_var"])
    with safe_open(saved(tmp_path, model), framework="pt") as f:
        entry = json.loads(f.metadata()["torch_modelstate"])
    assert entry["keys"] == list(model.state_dict())
    assert entry["state"] == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert entry["frozen"] == ["enc.bias", "bn.running_var"]
    assert entry["ties"] == {
        "dec.weight": {"source": "enc.weight", "transform": "transpose"},
        "head.weight": {"source": "emb.weight", "transform": None},
    }


def test_tied_data_is_stored_once_under_the_source_key(tmp_path: Path) -> None:
    """Tie destinations hold no data in the file; the file is the size of the stored tensors."""
    model = build()
    path = saved(tmp_path, model)
    header, data = header_of(path)
    assert "head.weight" not in header and "dec.weight" not in header
    stored = sum(t.numel() * t.element_size() for t in ModelState.new(model).to_dict().values())
    assert len(data) == stored - 20 * 4 - 8 * 4  # minus head.weight (5x4) and dec.weight (4x2)


def test_tensor_data_is_aligned_to_its_element_size(tmp_path: Path) -> None:
    """Data offsets are multiples of each tensor's element size (8-byte header padding included)."""
    tensors = {
        "a": torch.ones(3, dtype=torch.int8),
        "b": torch.ones(3, dtype=torch.float64),
        "c": torch.ones(1),
    }
    path = saved(tmp_path, tensors)
    header, _ = header_of(path)
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert n % 8 == 0
    for key in tensors:
        entry = header[key]
        assert isinstance(entry, dict)
        assert entry["data_offsets"][0] % tensors[key].element_size() == 0


# --------------------------------------------------------------------------- round trips


def test_load_without_into_returns_the_values_in_state_dict_order(tmp_path: Path) -> None:
    """A standalone load holds every key of the saved model, tie destinations included."""
    model = build()
    loaded = tms.load(saved(tmp_path, model))
    assert_values(loaded.to_dict(), snapshot(model))


def test_load_into_keeps_parameter_identity_and_data_ptr(tmp_path: Path) -> None:
    """Loading in place writes into the existing tensors; objects and storage stay the same."""
    path = saved(tmp_path, build(seed=1))
    target = build(seed=2)
    before = {
        k: (v, v.data_ptr())
        for k, v in ModelState.new(target).to_dict().items()
        if k != "dec.weight"
    }
    tms.load(path, into=target)
    after = ModelState.new(target).to_dict()
    for key, (tensor, ptr) in before.items():
        assert after[key] is tensor and tensor.data_ptr() == ptr, key
    assert_values(snapshot(target), snapshot(build(seed=1)))


def test_load_into_returns_the_targets_model_state(tmp_path: Path) -> None:
    """The returned ModelState views the target module."""
    target = build(seed=2)
    assert tms.load(saved(tmp_path), into=target).module is target


def test_load_into_a_model_state_writes_in_place(tmp_path: Path) -> None:
    """A ModelState target (here over a dict) is loaded into its own tensors."""
    path = saved(tmp_path, {"w": torch.arange(4.0), "b": torch.ones(2)})
    w = torch.zeros(4)
    target = ModelState.new({"w": w, "b": torch.zeros(2)})
    tms.load(path, into=target)
    assert target.to_dict()["w"] is w and torch.equal(w, torch.arange(4.0))


def test_identity_tie_round_trips_standalone(tmp_path: Path) -> None:
    """The loaded state ties the destination to the source: one tensor for both keys."""
    loaded = tms.load(saved(tmp_path))
    assert loaded.ties()["head.weight"] == "emb.weight"
    values = loaded.to_dict()
    assert values["head.weight"] is values["emb.weight"]


def test_identity_tie_is_made_in_an_untied_target(tmp_path: Path) -> None:
    """Loading a tied checkpoint into an untied model ties it: one Parameter for both."""
    target = build(seed=3, tie=False)
    tms.load(saved(tmp_path), into=target, strict=True)
    assert target["head"].weight is target["emb"].weight
    assert torch.equal(target["emb"].weight, build()["emb"].weight)


def test_transform_tie_round_trips_standalone(tmp_path: Path) -> None:
    """A transpose tie is restored by name: the destination is computed from its source."""
    loaded = tms.load(saved(tmp_path))
    assert loaded.transforms() == {"dec.weight": "transpose"}
    values = loaded.to_dict()
    assert torch.equal(values["dec.weight"], values["enc.weight"].t())


def test_transform_tie_is_made_in_an_untied_target(tmp_path: Path) -> None:
    """Loading makes the transform tie in the target; the destination follows its source."""
    target = build(seed=3, tie=False)
    ms = tms.load(saved(tmp_path), into=target)
    assert ms.transforms() == {"dec.weight": "transpose"}
    with torch.no_grad():
        target["enc"].weight.add_(1)
    assert torch.equal(target["dec"].weight, target["enc"].weight.t())


def test_transform_tie_already_in_the_target_is_kept(tmp_path: Path) -> None:
    """A target with the same ties loads without re-tying; values arrive through the source."""
    target = build(seed=3)
    source = target["enc"].weight
    tms.load(saved(tmp_path), into=target)
    assert target["enc"].weight is source
    assert torch.equal(target["dec"].weight, build()["enc"].weight.t())


def test_frozen_parameters_and_buffers_round_trip_into_a_model(tmp_path: Path) -> None:
    """Frozen flags of parameters (requires_grad) and buffers come back on load."""
    model = build()
    ModelState.new(model).freeze(["enc.**", "bn.running_mean"])
    target = build(seed=4)
    ms = tms.load(saved(tmp_path, model), into=target, frozen="file")
    assert list(ms.frozen_parameters()) == ["enc.weight", "enc.bias"]
    assert list(ms.frozen_state()) == ["bn.running_mean"]
    assert not target["enc"].weight.requires_grad


def test_loading_restores_exactly_the_saved_frozen_set(tmp_path: Path) -> None:
    """Leaves frozen in the target but not in the file are unfrozen by the load."""
    path = saved(tmp_path)
    target = build(seed=4)
    ModelState.new(target).freeze()
    ms = tms.load(path, into=target, frozen="file")
    assert ms.frozen_parameters() == {} and ms.frozen_state() == {}


def test_frozen_set_round_trips_standalone(tmp_path: Path) -> None:
    """A standalone load has the saved frozen parameters and state."""
    model = build()
    ModelState.new(model).freeze(["emb.weight", "bn.num_batches_tracked"])
    loaded = tms.load(saved(tmp_path, model))
    assert list(loaded.frozen_parameters()) == ["emb.weight"]
    assert list(loaded.frozen_state()) == ["bn.num_batches_tracked"]


def test_state_keys_round_trip_standalone(tmp_path: Path) -> None:
    """Buffers come back as state, the rest as parameters."""
    loaded = tms.load(saved(tmp_path))
    assert list(loaded.state()) == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert "bn.weight" in loaded.parameters()


def test_standalone_state_round_trips_with_ties_and_frozen(tmp_path: Path) -> None:
    """A dict-built ModelState keeps its ties, transforms and frozen set through a checkpoint."""
    ms = ModelState.new({"a": torch.randn(2, 3), "b": torch.zeros(3, 2), "c": torch.randn(2, 3)})
    ms.tie("b", "a", "transpose").tie("c", "a").freeze("a")
    loaded = tms.load(saved(tmp_path, ms))
    assert loaded.ties() == {"b": "a", "c": "a"} and loaded.transforms() == {"b": "transpose"}
    assert list(loaded.frozen_parameters()) == ["a"]
    assert_values(loaded.to_dict(), ms.to_dict())


def test_a_tie_whose_destination_comes_first_keeps_its_direction(tmp_path: Path) -> None:
    """An identity tie from an earlier key to a later one is restored the same way round."""
    ms = ModelState.new({"a": torch.zeros(2), "b": torch.ones(2)}).tie("a", "b")
    assert tms.load(saved(tmp_path, ms)).ties() == {"a": "b"}


def test_unnamed_transform_tie_cannot_be_saved(tmp_path: Path) -> None:
    """A tie with an unregistered callable is a ValueError naming the tie; no file is written."""
    ms = ModelState.new({"a": torch.randn(2, 3), "b": torch.zeros(3, 2)}).tie(
        "b", "a", lambda t: t.t()
    )
    with pytest.raises(
        ValueError, match=r"tie `b` <- `a` uses a transform with no registered name"
    ):
        tms.save(ms, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_non_contiguous_tensors_are_saved(tmp_path: Path) -> None:
    """Transposed and strided tensors are written as their values, not refused."""
    base = torch.arange(24.0).reshape(4, 6)
    tensors = {
        "t": base.t(),
        "s": base[:, ::2],
        "c": torch.randn(3, 2, dtype=torch.complex64).conj(),
    }
    loaded = tms.load(saved(tmp_path, tensors)).to_dict()
    assert_values(loaded, {k: v.resolve_conj().contiguous() for k, v in tensors.items()})


def test_non_contiguous_parameter_is_saved_and_loaded_in_place(tmp_path: Path) -> None:
    """A parameter stored transposed in memory round-trips into the same strided tensor."""
    model = nn.Linear(3, 4)
    model.weight = nn.Parameter(torch.randn(3, 4).t())
    path = saved(tmp_path, model)
    target = nn.Linear(3, 4)
    target.weight = nn.Parameter(torch.zeros(3, 4).t())
    weight = target.weight
    tms.load(path, into=target)
    assert target.weight is weight and torch.equal(weight, model.weight)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int64,
        torch.bool,
        torch.complex64,
        torch.float8_e4m3fn,
        torch.uint32,
    ],
)
def test_dtypes_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    """Each dtype safetensors stores comes back bit for bit."""
    value = torch.randint(0, 2, (3, 5)).to(dtype)
    assert_values(tms.load(saved(tmp_path, {"x": value})).to_dict(), {"x": value})


def test_scalars_and_empty_tensors_round_trip(tmp_path: Path) -> None:
    """0-d and zero-element tensors are stored with their shapes."""
    tensors = {"s": torch.tensor(3.5), "e": torch.zeros(0, 4), "n": torch.ones(2)}
    assert_values(tms.load(saved(tmp_path, tensors)).to_dict(), tensors)


def test_unsupported_dtype_is_a_value_error(tmp_path: Path) -> None:
    """complex128 has no safetensors code: the error names the key and the fix."""
    with pytest.raises(ValueError, match=r"(?s)`z` has dtype torch.complex128.*fix: convert"):
        tms.save({"z": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "z.safetensors")


def test_meta_tensors_cannot_be_saved(tmp_path: Path) -> None:
    """A model on the meta device has no data to save."""
    with pytest.raises(ValueError, match=r"`weight` is on the meta device"):
        tms.save(nn.Linear(2, 2, device="meta"), tmp_path / "m.safetensors")


def test_save_into_an_existing_directory_writes_model_safetensors(tmp_path: Path) -> None:
    """A directory as `path` receives model.safetensors, and loads back as a directory."""
    tms.save(build(), tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert_values(tms.load(tmp_path).to_dict(), snapshot(build()))


def test_save_to_a_missing_directory_is_file_not_found(tmp_path: Path) -> None:
    """The parent directory of a single file must exist."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tms.save(build(), tmp_path / "nope" / "m.safetensors")


def test_load_casts_within_a_dtype_kind(tmp_path: Path) -> None:
    """A bfloat16 checkpoint loads into a float32 model, cast as `update` casts."""
    value = torch.randn(4, 3).bfloat16()
    path = saved(tmp_path, {"weight": value, "bias": torch.ones(4, dtype=torch.bfloat16)})
    target = nn.Linear(3, 4)
    assert tms.io.check(path, target).cast == ("weight", "bias")
    tms.load(path, into=target)
    assert target.weight.dtype == torch.float32 and torch.equal(target.weight, value.float())


def test_load_refuses_a_dtype_of_another_kind(tmp_path: Path) -> None:
    """A float value for an integer buffer is a mismatch; the target is untouched."""
    model = build()
    state = snapshot(model)
    state["bn.num_batches_tracked"] = state["bn.num_batches_tracked"].float()
    state.pop("head.weight")
    state.pop("dec.weight")
    save_file(state, tmp_path / "f.safetensors")
    target = build(seed=5)
    before = snapshot(target)
    with pytest.raises(
        CheckpointMismatchError, match=r"floating value cannot load into a integer tensor"
    ):
        tms.load(tmp_path / "f.safetensors", into=target)
    assert_values(snapshot(target), before)


def test_load_into_a_non_module_is_a_type_error(tmp_path: Path) -> None:
    """`into` must be a module or a ModelState."""
    with pytest.raises(TypeError, match=r"`into` must be an nn.Module or a ModelState"):
        tms.load(saved(tmp_path), into={"w": torch.zeros(2)})  # type: ignore[arg-type]


@given(
    st.dictionaries(
        st.sampled_from(["a", "b.c", "b.d", "e.f.g"]),
        st.tuples(
            st.lists(st.integers(0, 3), max_size=3),
            st.sampled_from([torch.float32, torch.int64, torch.bfloat16]),
        ),
    )
)
def test_round_trip_law(spec: dict[str, tuple[list[int], torch.dtype]]) -> None:
    """load(save(x)) has x's keys, shapes, dtypes and values, for any dict of tensors."""
    import tempfile

    tensors = {k: torch.randint(-5, 5, shape).to(dtype) for k, (shape, dtype) in spec.items()}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        tms.save(tensors, path)
        assert_values(tms.load(path).to_dict(), tensors)


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("1GiB", 2**30),
        ("64KiB", 65536),
        ("1.5kB", 1500),
        (123, 123),
    ],
)
def test_max_shard_size_parses_units(size: int | str, expected: int) -> None:
    """Decimal units are powers of 1000, binary units powers of 1024."""
    assert _layout.parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "GB", "-1MB", "0", 0])
def test_max_shard_size_rejects_non_sizes(size: int | str) -> None:
    """A size must be positive, with a known unit."""
    with pytest.raises(ValueError, match="max_shard_size"):
        _layout.parse_size(size)


def test_max_shard_size_of_a_wrong_type_is_a_type_error() -> None:
    """Only ints and strings are sizes."""
    with pytest.raises(TypeError, match="max_shard_size"):
        _layout.parse_size(1.5)  # type: ignore[arg-type]


def test_sharded_save_writes_the_common_layout(tmp_path: Path) -> None:
    """Several shards named model-0000i-of-0000N, an index with total_size and a weight_map."""
    model = build()
    tms.save(model, tmp_path / "ckpt", max_shard_size=50)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    n = len(names) - 1
    assert n > 2
    assert names[:-1] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    stored = {
        k: v
        for k, v in ModelState.new(model).to_dict().items()
        if k not in ("head.weight", "dec.weight")
    }
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in stored.values()
    )
    assert list(index["weight_map"]) == list(stored)
    for name in names[:-1]:
        with safe_open(tmp_path / "ckpt" / name, framework="pt") as f:
            assert f.metadata()["format"] == "pt"
            assert {k for k, v in index["weight_map"].items() if v == name} == set(f.keys())


def test_shards_respect_the_size_limit(tmp_path: Path) -> None:
    """Each shard holds at most max_shard_size bytes of data, unless one tensor is larger."""
    tensors = {f"t{i}": torch.zeros(10) for i in range(10)} | {"big": torch.zeros(100)}
    tms.save(tensors, tmp_path, max_shard_size=120)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    for name in set(index["weight_map"].values()):
        _, data = header_of(tmp_path / name)
        keys = [k for k, v in index["weight_map"].items() if v == name]
        assert len(data) <= 120 or keys == ["big"]


def test_sharded_checkpoint_round_trips_from_the_directory_or_the_index(tmp_path: Path) -> None:
    """A directory and its index path both load, standalone and in place."""
    model = build()
    ModelState.new(model).freeze("bn.**")
    tms.save(model, tmp_path, max_shard_size="100B")
    assert_values(tms.load(tmp_path).to_dict(), snapshot(model))
    target = build(seed=9, tie=False)
    ms = tms.load(tmp_path / "model.safetensors.index.json", into=target, frozen="file")
    assert_values(snapshot(target), snapshot(model))
    assert ms.ties() == {"dec.weight": "enc.weight", "head.weight": "emb.weight"}
    assert list(ms.frozen_state()) == [
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    ]


def test_sharded_save_that_fits_one_shard_writes_model_safetensors(tmp_path: Path) -> None:
    """Everything under the limit: a single model.safetensors and no index, as transformers does."""
    tms.save(build(), tmp_path / "d", max_shard_size="5GB")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["model.safetensors"]


def test_sharded_save_replaces_the_previous_checkpoint(tmp_path: Path) -> None:
    """Stale shards and a stale single file of an earlier save are removed."""
    tms.save(build(), tmp_path, max_shard_size=50)
    tms.save(build(), tmp_path, max_shard_size=100)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = {p.name for p in tmp_path.glob("model-*.safetensors")}
    assert shards == set(index["weight_map"].values())
    tms.save(build(), tmp_path, max_shard_size="1MB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_sharded_path_must_be_a_directory(tmp_path: Path) -> None:
    """With max_shard_size, a file name as `path` is refused with the fix."""
    with pytest.raises(ValueError, match=r"(?s)`path` is the directory.*fix: pass a directory"):
        tms.save(build(), tmp_path / "m.safetensors", max_shard_size=100)


# --------------------------------------------------------------------------- atomic writes


def test_a_failing_save_leaves_no_file_under_the_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that fails midway removes its temporary file and creates nothing."""

    def fail(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(_kernels, "copy_", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        tms.save({"t": torch.arange(6.0).reshape(2, 3).t()}, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old file stays, byte for byte, when overwriting it fails."""
    path = saved(tmp_path, {"t": torch.ones(3, 2)})
    before = path.read_bytes()
    monkeypatch.setattr(_kernels, "copy_", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        tms.save({"t": torch.zeros(2, 3).t()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_a_failing_sharded_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure in a later shard leaves the earlier checkpoint loadable and no temporary files."""
    tms.save(build(), tmp_path, max_shard_size=100)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = [0]
    write = _writer._write_file

    def flaky(*args: object, **kwargs: object) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError("no space left on device")
        write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_writer, "_write_file", flaky)
    with pytest.raises(OSError, match="no space"):
        tms.save(build(seed=3), tmp_path, max_shard_size=100)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert_values(tms.load(tmp_path).to_dict(), snapshot(build()))


def test_save_uses_a_temporary_name_then_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data goes to a hidden temporary file in the target directory, renamed at the end."""
    renames: list[tuple[str, str]] = []
    replace = os.replace

    def spy(src: str, dst: str) -> None:
        renames.append((Path(src).name, Path(dst).name))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    saved(tmp_path)
    [(src, dst)] = renames
    assert src.startswith(".m.safetensors.") and src.endswith(".tmp") and dst == "m.safetensors"
