"""Hostile files: FIFOs, devices and sockets are refused without being opened; crafted headers
fail at once with a `CheckpointCorruptError` naming the file; reserved tensor names are
refused before anything is replaced."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import torch_modelstate as tms
from torch_modelstate import CheckpointCorruptError

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")


def fails_quickly(fn: Callable[[], object], fifos: list[Path]) -> BaseException:
    """Run `fn` in a thread; it must raise within 10 s (a FIFO opened would block forever)."""
    caught: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as err:
            caught.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        for fifo in fifos:  # open the other end so the blocked reader returns
            os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail("the load blocked on a FIFO")
    assert caught, "expected an error"
    return caught[0]


@pytest.fixture
def fifo_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for FIFOs."""
    yield tmp_path


@needs_fifo
@pytest.mark.parametrize(
    "name", ["model.safetensors", "model.safetensors.index.json", "lone.safetensors"]
)
def test_a_fifo_in_a_checkpoint_directory_is_refused_not_opened(fifo_dir: Path, name: str) -> None:
    """load and check of the directory raise at once, naming the FIFO."""
    fifo = fifo_dir / name
    os.mkfifo(fifo)
    for call in (lambda: tms.load(fifo_dir), lambda: tms.io.check(fifo_dir, nn.Linear(2, 2))):
        err = fails_quickly(call, [fifo])
        assert isinstance(err, CheckpointCorruptError), repr(err)
        assert str(fifo) in str(err) and "FIFO" in str(err) and "regular file" in str(err)


@needs_fifo
def test_a_fifo_given_as_the_path_is_refused(fifo_dir: Path) -> None:
    """A FIFO passed directly, as a file or as an index, is refused."""
    for name in ("direct.safetensors", "direct.index.json"):
        fifo = fifo_dir / name
        os.mkfifo(fifo)
        err = fails_quickly(lambda f=fifo: tms.load(f), [fifo])
        assert isinstance(err, CheckpointCorruptError) and str(fifo) in str(err)


@needs_fifo
def test_a_fifo_named_by_an_index_as_a_shard_is_refused(fifo_dir: Path) -> None:
    """An index whose shard is a FIFO is refused, naming the shard."""
    tms.save({"a": torch.ones(8), "b": torch.ones(8)}, fifo_dir, max_shard_size=32)
    shard = fifo_dir / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    err = fails_quickly(lambda: tms.load(fifo_dir), [shard])
    assert isinstance(err, CheckpointCorruptError) and str(shard) in str(err)


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_a_device_is_refused() -> None:
    """A character device is not a checkpoint."""
    with pytest.raises(CheckpointCorruptError, match=r"/dev/null: it is a character device"):
        tms.load("/dev/null")


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs unix sockets")
def test_a_socket_named_model_safetensors_is_refused(tmp_path: Path) -> None:
    """A unix socket under the checkpoint's name is refused."""
    path = tmp_path / "model.safetensors"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(CheckpointCorruptError, match=r"it is a socket, not a regular file"):
            tms.load(tmp_path)


def test_symlinks_to_regular_files_still_load(tmp_path: Path) -> None:
    """The Hugging Face cache links files into snapshots: links to regular files load."""
    tms.save({"a": torch.arange(4.0)}, tmp_path / "blob")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "model.safetensors").symlink_to(tmp_path / "blob")
    assert torch.equal(tms.load(tmp_path / "snap").to_dict()["a"], torch.arange(4.0))


# --------------------------------------------------------------------------- crafted headers


def crafted(path: Path, header: dict[str, object], data: bytes = b"") -> Path:
    """Write a safetensors file with exactly this header."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def fails_at_once(path: Path, match: str) -> None:
    """Loading `path` is a CheckpointCorruptError naming it, well within a second.

    (A robustness bound, not a speed claim: these headers took 1 to 13 s before.)
    """
    start = time.perf_counter()
    with pytest.raises(CheckpointCorruptError, match=match) as info:
        tms.load(path)
    assert str(path) in str(info.value)
    assert len(str(info.value)) < 1000  # a crafted shape is not echoed in full
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("rank", [20_000, 50_000, 150_000])
def test_a_header_with_thousands_of_dimensions_fails_at_once(tmp_path: Path, rank: int) -> None:
    """0.4 MB (20,000 dims), 50,000 dims and a 3 MB header: refused by rank, not computed."""
    path = crafted(
        tmp_path / "dims.safetensors",
        {"t": {"dtype": "F32", "shape": [2**62] * rank, "data_offsets": [0, 4]}},
        b"\0" * 4,
    )
    assert path.stat().st_size > rank * 10
    fails_at_once(path, rf"{rank} dimensions, at most 64")


def test_a_shape_whose_size_overflows_fails_at_once(tmp_path: Path) -> None:
    """64 huge dimensions: the element count is bounded as it is multiplied."""
    path = crafted(
        tmp_path / "big.safetensors",
        {"t": {"dtype": "F32", "shape": [2**62] * 64, "data_offsets": [0, 4]}},
        b"\0" * 4,
    )
    fails_at_once(path, r"overflows 64 bits")


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [2**40, 0, 2**40], [0, 2**61, 8]])
def test_an_empty_tensor_whose_strides_overflow_fails_at_once(
    tmp_path: Path, shape: list[int]
) -> None:
    """Zero elements, but strides past 64 bits: refused before torch.empty sees it."""
    path = crafted(
        tmp_path / "zero.safetensors",
        {"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}},
    )
    fails_at_once(path, r"overflows 64 bits")


def test_a_dimension_past_64_bits_fails_at_once(tmp_path: Path) -> None:
    """A dimension that is not a 64-bit size is an invalid shape."""
    path = crafted(
        tmp_path / "dim.safetensors",
        {"t": {"dtype": "F32", "shape": [2**70], "data_offsets": [0, 4]}},
        b"\0" * 4,
    )
    fails_at_once(path, r"invalid shape")


def test_offsets_past_64_bits_fail_at_once(tmp_path: Path) -> None:
    """data_offsets are bounded like sizes."""
    path = crafted(
        tmp_path / "off.safetensors",
        {"t": {"dtype": "F32", "shape": [1], "data_offsets": [2**64, 2**64 + 4]}},
        b"\0" * 4,
    )
    fails_at_once(path, r"invalid data_offsets")


# --------------------------------------------------------------------------- reserved names


def test_a_tensor_named_metadata_is_refused_before_anything_is_replaced(tmp_path: Path) -> None:
    """`__metadata__` is the header's own key: save refuses it and keeps the previous file."""
    path = tmp_path / "m.safetensors"
    tms.save({"a": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"named `__metadata__`.*\n  fix: rename the tensor"):
        tms.save({"__metadata__": torch.zeros(2), "a": torch.zeros(2)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
