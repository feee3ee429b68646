"""Saving: save ids in every file, mixtures refused, failures seen before any change (a
directory in the way, no space), the writer lock, cleanup, and the entry points for
collective saves and loads (tensors produced one at a time, rows read into a buffer)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import Tensor

import torch_modelstate as tms
from torch_modelstate import CheckpointCorruptError
from torch_modelstate.checkpoint import _steps, _writer
from torch_modelstate.checkpoint._codec import Spec
from torch_modelstate.checkpoint._files import open_checkpoint
from torch_modelstate.checkpoint._stamp import SAVE_ID_KEY, SHARD_KEY, read_stamp


def values(seed: int, n: int = 6) -> dict[str, Tensor]:
    """`n` 256-byte tensors whose values say which save wrote them."""
    return {f"layer{i}.w": torch.full((64,), float(seed * 10 + i)) for i in range(n)}


def listing(root: Path) -> dict[str, bytes]:
    """Every file under `root` with its bytes (directories as empty markers)."""
    return {
        str(p.relative_to(root)): (b"<dir>" if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


def metadata_of(file: Path) -> dict[str, str]:
    """A safetensors file's metadata, read by safetensors itself."""
    with safe_open(file, framework="pt") as f:
        return dict(f.metadata())


# --------------------------------------------------------------------------- save ids


def test_every_file_of_a_sharded_save_carries_one_save_id(tmp_path: Path) -> None:
    """Each shard says its save id and position; the index says the same id."""
    tms.save(values(1), tmp_path, max_shard_size=512)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    save_id = index["metadata"][SAVE_ID_KEY]
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) == 3
    for i, shard in enumerate(shards, 1):
        meta = metadata_of(shard)
        assert meta[SAVE_ID_KEY] == save_id and meta[SHARD_KEY] == f"{i}/3"
        assert meta["format"] == "pt"
    tms.save(values(1), tmp_path, max_shard_size=512)
    again = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert again["metadata"][SAVE_ID_KEY] != save_id


def test_a_single_file_carries_a_save_id_and_no_shard_position(tmp_path: Path) -> None:
    """A single file is a whole save: an id, no shard entry."""
    tms.save(values(1), tmp_path / "m.safetensors")
    stamp = read_stamp(tmp_path / "m.safetensors", metadata_of(tmp_path / "m.safetensors"))
    assert stamp is not None and stamp.shard is None and stamp.of is None


def test_one_shard_is_recognised_by_its_stamp(tmp_path: Path) -> None:
    """Opened alone, a shard's metadata says which shard of how many it is."""
    tms.save(values(1), tmp_path, max_shard_size=512)
    with open_checkpoint(tmp_path / "model-00002-of-00003.safetensors") as ckpt:
        stamp = read_stamp(ckpt.path, ckpt.metadata)
    assert stamp is not None and (stamp.shard, stamp.of) == (2, 3)


def test_a_shard_from_another_save_with_identical_metadata_is_refused(tmp_path: Path) -> None:
    """Same model, same frozen set, other values: the save id tells the shards apart."""
    tms.save(values(1), tmp_path / "a", max_shard_size=512)
    tms.save(values(2), tmp_path / "b", max_shard_size=512)
    name = "model-00002-of-00003.safetensors"
    shutil.copy(tmp_path / "b" / name, tmp_path / "a" / name)
    with pytest.raises(CheckpointCorruptError, match=rf"different saves.*{name}"):
        tms.load(tmp_path / "a")
    with pytest.raises(CheckpointCorruptError, match=r"different saves"):
        tms.load(tmp_path / "a", into=tms.ModelState.new(values(0)))


def test_an_index_from_another_save_is_refused(tmp_path: Path) -> None:
    """Every shard matches, but the index is of another save: refused, naming the index."""
    tms.save(values(1), tmp_path / "a", max_shard_size=512)
    tms.save(values(2), tmp_path / "b", max_shard_size=512)
    index = "model.safetensors.index.json"
    shutil.copy(tmp_path / "b" / index, tmp_path / "a" / index)
    with pytest.raises(CheckpointCorruptError, match=r"index.json: the shards come from"):
        tms.load(tmp_path / "a")


def test_shards_without_save_ids_still_load(tmp_path: Path) -> None:
    """Files of other tools (no ids) load as before."""
    tms.save(values(1), tmp_path, max_shard_size=512)
    for shard in tmp_path.glob("model-*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        from safetensors.torch import save_file

        save_file(tensors, shard, metadata={"format": "pt"})
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["metadata"][SAVE_ID_KEY]
    index_path.write_text(json.dumps(index))
    assert torch.equal(tms.load(tmp_path).to_dict()["layer5.w"], values(1)["layer5.w"])


def test_an_average_gets_its_own_save_id(tmp_path: Path) -> None:
    """A merged checkpoint is a new save, not a copy of its first input's id."""
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "o"
    tms.save(values(1), a)
    tms.save(values(2), b)
    tms.io.average([a, b], out, max_shard_size=512)
    ids = {metadata_of(f)[SAVE_ID_KEY] for f in out.glob("model-*.safetensors")}
    assert len(ids) == 1 and ids.isdisjoint({metadata_of(a)[SAVE_ID_KEY]})


# --------------------------------------------------------------------------- failures seen first


@pytest.mark.parametrize(
    ("previous", "blocked", "shards"),
    [
        (6, "model-00002-of-00003.safetensors", 3),
        (3, "model.safetensors.index.json", 6),
        (3, "model.safetensors", None),
    ],
)
def test_a_directory_in_the_way_fails_before_anything_changes(
    tmp_path: Path, previous: int, blocked: str, shards: int | None
) -> None:
    """A directory under a name the save writes or removes: refused, naming it; all kept."""
    tms.save(values(1), tmp_path, max_shard_size=256 * 6 // previous)
    if (tmp_path / blocked).exists():
        (tmp_path / blocked).unlink()
        (tmp_path / blocked).mkdir()
        (tmp_path / blocked / "x").write_text("user data")
        tms.save(values(1), tmp_path / "ref", max_shard_size=256 * 6 // previous)
    else:
        (tmp_path / blocked).mkdir()
    before = listing(tmp_path)
    limit = None if shards is None else 256 * 6 // shards
    with pytest.raises(IsADirectoryError, match=rf"`{tmp_path / blocked}`: a directory"):
        tms.save(values(2), tmp_path, max_shard_size=limit)
    assert listing(tmp_path) == before


def test_a_directory_in_the_way_of_an_index_keeps_the_loadable_checkpoint(tmp_path: Path) -> None:
    """The previous checkpoint still loads after the refused save."""
    tms.save(values(1), tmp_path, max_shard_size=512)
    stale = tmp_path / "model-00003-of-00006.safetensors"
    stale.mkdir()
    with pytest.raises(IsADirectoryError, match="model-00003-of-00006"):
        tms.save(values(2), tmp_path, max_shard_size=256)
    assert torch.equal(tms.load(tmp_path).to_dict()["layer0.w"], values(1)["layer0.w"])


def test_too_little_free_space_fails_before_anything_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """statvfs says the bytes do not fit: ENOSPC naming the directory and the sizes."""
    tms.save(values(1), tmp_path, max_shard_size=512)
    before = listing(tmp_path)
    fake = SimpleNamespace(f_bavail=2, f_frsize=512)
    monkeypatch.setattr(os, "statvfs", lambda path: fake)
    with pytest.raises(OSError, match=r"No space left on device.*writes \d+ bytes, 1024 are free"):
        tms.save(values(2), tmp_path, max_shard_size=256)
    assert listing(tmp_path) == before


def test_disk_full_while_writing_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC in the middle of a shard names that shard; temporaries go; the old one stays."""
    tms.save(values(1), tmp_path, max_shard_size=512)
    before = listing(tmp_path)
    open_new = _writer._open_new
    opened = [0]

    class Full:
        def __init__(self, out: Any) -> None:
            self.out = out

        def write(self, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.out, name)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.out.close()

    def second_is_full(path: Path) -> Any:
        opened[0] += 1
        out = open_new(path)
        return Full(out) if opened[0] == 2 else out

    monkeypatch.setattr(_writer, "_open_new", second_is_full)
    with pytest.raises(OSError, match=r"writing the checkpoint file `.*model-00002-of-00003") as e:
        tms.save(values(2), tmp_path, max_shard_size=512)
    assert e.value.errno == errno.ENOSPC
    assert e.value.filename == str(tmp_path / "model-00002-of-00003.safetensors")
    assert listing(tmp_path) == before


# --------------------------------------------------------------------------- order, lock, cleanup


def test_a_layout_change_renames_new_shards_then_the_index_then_retires_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 shards to 6: the old index names intact shards until the new index replaces it."""
    tms.save(values(1), tmp_path, max_shard_size=512)
    steps: list[tuple[str, str]] = []
    monkeypatch.setattr(_steps, "step", lambda name, path: steps.append((name, path.name)))
    tms.save(values(2), tmp_path, max_shard_size=256)
    names = [name for name, _ in steps]
    assert names[0] == "lock" and names[-1] == "unlock"
    renames = [path for name, path in steps if name == "rename"]
    assert renames == [
        *(f"model-0000{i}-of-00006.safetensors" for i in range(1, 7)),
        "model.safetensors.index.json",
    ]
    last_rename = max(i for i, name in enumerate(names) if name == "rename")
    first_unlink = min(i for i, name in enumerate(names) if name == "unlink")
    assert first_unlink > last_rename
    removed = [path for name, path in steps if name == "unlink"]
    assert removed == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_a_load_opens_only_through_the_seam(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file a load opens goes through the one seam, index first."""
    tms.save(values(1), tmp_path, max_shard_size=512)
    opened: list[str] = []
    monkeypatch.setattr(_steps, "step", lambda name, path: opened.append(f"{name} {path.name}"))
    tms.load(tmp_path)
    assert opened == [
        "open model.safetensors.index.json",
        *(f"open model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
    ]


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="reads /proc/locks")
def test_a_save_waits_for_the_lock_of_another_writer(tmp_path: Path) -> None:
    """While another process holds the checkpoint's lock, a save blocks; then it proceeds."""
    fcntl = pytest.importorskip("fcntl")
    tms.save(values(1), tmp_path)
    lock = tmp_path / ".model.safetensors.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    thread = threading.Thread(target=tms.save, args=(values(2), tmp_path), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        inode = os.fstat(fd).st_ino
        while time.monotonic() < deadline:
            with open("/proc/locks") as f:
                if any("->" in line and line.split()[6].endswith(f":{inode}") for line in f):
                    break
            time.sleep(0.005)
        else:
            pytest.fail("the save did not wait for the lock")
        assert torch.equal(tms.load(tmp_path).to_dict()["layer0.w"], values(1)["layer0.w"])
    finally:
        os.close(fd)  # the writer started over on the lock file it now owns
    thread.join(30)
    assert torch.equal(tms.load(tmp_path).to_dict()["layer0.w"], values(2)["layer0.w"])
    assert not lock.exists()


def test_no_lock_file_or_temporary_file_outlives_a_save(tmp_path: Path) -> None:
    """After a save the directory holds exactly the checkpoint's files."""
    tms.save(values(1), tmp_path, max_shard_size=512)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        *(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
        "model.safetensors.index.json",
    ]


def test_leftovers_of_a_killed_save_are_removed_by_the_next(tmp_path: Path) -> None:
    """Temporary files and the lock of this checkpoint go; another file's temporaries stay."""
    tms.save(values(1), tmp_path, max_shard_size=512)
    ours = [
        ".model-00002-of-00006.safetensors.0123456789ab.tmp",
        ".model.safetensors.index.json.0123456789ab.tmp",
        ".model.safetensors.lock",
    ]
    theirs = ".other.safetensors.0123456789ab.tmp"
    for name in [*ours, theirs]:
        (tmp_path / name).write_bytes(b"partial")
    tms.save(values(2), tmp_path, max_shard_size=512)
    names = {p.name for p in tmp_path.iterdir()}
    assert theirs in names and not names & set(ours)


# ------------------------------------------------------------------- collective entry points


def test_tensors_can_be_produced_one_at_a_time(tmp_path: Path) -> None:
    """With budget=0 the writer asks for one tensor per call, in `data_order`."""
    tensors = {"a": torch.ones(3, dtype=torch.float16), "b": torch.ones(2), "c": torch.ones(1)}
    specs = [Spec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    asked: list[list[str]] = []

    def fill(batch: Sequence[Spec]) -> list[Tensor]:
        asked.append([s.key for s in batch])
        return [tensors[s.key] for s in batch]

    _writer.write_checkpoint(
        tmp_path / "x.safetensors", specs, {"format": "pt"}, fill, max_shard_size=None, budget=0
    )
    assert asked == [[s.key] for s in _writer.data_order(specs, None)] == [["b"], ["c"], ["a"]]
    assert torch.equal(tms.load(tmp_path / "x.safetensors").to_dict()["a"], tensors["a"])


def test_rows_of_one_tensor_are_read_into_a_given_buffer(tmp_path: Path) -> None:
    """read_rows reads rows start:stop of a tensor, and refuses a wrong buffer or range."""
    weight = torch.arange(24.0).reshape(6, 4)
    tms.save({"w": weight, "b": torch.zeros(3)}, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        info = ckpt.tensors["w"]
        out = torch.empty(2, 4)
        ckpt.read_rows(info, 3, 5, out)
        assert torch.equal(out, weight[3:5])
        with pytest.raises(IndexError, match="rows 5:7"):
            ckpt.read_rows(info, 5, 7, torch.empty(2, 4))
        with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
            ckpt.read_rows(info, 0, 2, torch.empty(2, 3))
