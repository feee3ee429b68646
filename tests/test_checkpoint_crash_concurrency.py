"""Two writers, or a reader and a writer, on one checkpoint, driven step by step.

Each thread's file-system calls are intercepted at the ``os`` level; a thread is paused
before a chosen call while the other runs, then resumed. Every interleaving must end in
one writer's checkpoint, whole, and a reader must get the previous values, the new ones,
or a `CheckpointCorruptError` — never a missing file, never mixed values.
"""

from __future__ import annotations

import builtins
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import torch_modelstate as tms

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

Layout = str | int  # "dir" (model.safetensors) or a number of shards

LAYOUT_PAIRS = [(3, 6), (6, 3), (3, 3), ("dir", 3), (3, "dir")]


@pytest.fixture(autouse=True)
def no_fsync() -> Iterator[None]:
    """fsync costs milliseconds here and matters only for power loss, not for these orders."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        yield


def values(seed: int) -> dict[str, torch.Tensor]:
    """Six 256-byte tensors whose values say which save wrote them."""
    return {f"layer{i}.w": torch.full((64,), float(seed * 10 + i)) for i in range(6)}


def save(root: Path, layout: Layout, seed: int) -> None:
    """Save `values(seed)` into the directory `root` in `layout`."""
    root.mkdir(parents=True, exist_ok=True)
    if layout == "dir":
        tms.save(values(seed), root)
    else:
        tms.save(values(seed), root, max_shard_size=256 * 6 // int(layout))


def which(root: Path, seeds: tuple[int, ...]) -> str:
    """The seed whose values `root` loads, "corrupt", "mixed" or the error."""
    try:
        got = tms.load(root).to_dict()
    except tms.CheckpointCorruptError:
        return "corrupt"
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    for seed in seeds:
        expected = values(seed)
        if list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in got):
            return str(seed)
    return "mixed"


class Gate:
    """Intercepts file-system calls of named threads; pauses one before its k-th call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: dict[str, int] = {}
        self.stops: dict[str, Callable[[str, str], bool]] = {}
        self.paused: dict[str, threading.Event] = {}
        self.resume: dict[str, threading.Event] = {}
        self.done: dict[str, threading.Event] = {}
        write = os.O_CREAT | os.O_WRONLY | os.O_RDWR
        self._wrap(monkeypatch, os, "replace", lambda src, dst, *a, **k: ("rename", dst))
        self._wrap(monkeypatch, os, "rename", lambda src, dst, *a, **k: ("rename", dst))
        self._wrap(monkeypatch, os, "unlink", lambda p, *a, **k: ("unlink", p))
        self._wrap(monkeypatch, os, "fsync", lambda fd: ("fsync", str(fd)))
        self._wrap(
            monkeypatch,
            os,
            "open",
            lambda p, flags, *a, **k: ("create" if flags & write else "open", p),
        )
        self._wrap(
            monkeypatch,
            builtins,
            "open",
            lambda f, mode="r", *a, **k: (
                None
                if isinstance(f, int)
                else ("create" if any(c in mode for c in "wa+") else "open", f)
            ),
        )

    def _wrap(
        self,
        monkeypatch: pytest.MonkeyPatch,
        module: Any,
        name: str,
        describe: Callable[..., tuple[str, Any] | None],
    ) -> None:
        original = getattr(module, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            thread = threading.current_thread().name
            if thread in self.stops:
                what = describe(*args, **kwargs)
                if what is not None:
                    self._step(thread, what[0], os.path.basename(os.fspath(what[1])))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, call)

    def _step(self, thread: str, op: str, name: str) -> None:
        self.counts[thread] = self.counts.get(thread, 0) + 1
        if self.stops[thread](op, name):
            self.stops[thread] = lambda op, name: False  # one pause per thread
            self.paused[thread].set()
            self.resume[thread].wait()

    def start(
        self, name: str, fn: Callable[[], object], stop: Callable[[str, str], bool]
    ) -> threading.Thread:
        """Run `fn` in a thread called `name`, pausing it where `stop(op, file)` is true."""
        self.stops[name] = stop
        self.paused[name] = threading.Event()
        self.resume[name] = threading.Event()
        self.done[name] = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                fn()
            except BaseException as err:
                errors.append(err)
            finally:
                self.done[name].set()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.errors = errors  # type: ignore[attr-defined]
        thread.start()
        return thread

    def wait_paused_or_done(self, name: str) -> bool:
        """Whether `name` paused (True) or finished (False)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.paused[name].is_set():
                return True
            if self.done[name].is_set():
                return False
            self.done[name].wait(0.001)
        raise AssertionError(f"{name} neither paused nor finished")


def watch_lock_waits(monkeypatch: pytest.MonkeyPatch) -> dict[str, threading.Event]:
    """Events set when a named thread is about to wait for a writer lock another one holds.

    Each blocking ``fcntl.flock`` first tries without blocking; when that fails the lock is
    held (by the paused writer), so the caller's event is set before it blocks. No polling:
    the event says the thread has opened the lock file under the holder's name and goes on
    to wait on it.
    """
    waiting: dict[str, threading.Event] = {}
    original = fcntl.flock

    def flock(fd: Any, operation: int) -> None:
        event = waiting.get(threading.current_thread().name)
        if event is not None and operation == fcntl.LOCK_EX:
            try:
                original(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                event.set()
            else:
                return
        original(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    return waiting


def blocked_on_a_lock_or_done(gate: Gate, waiting: threading.Event, name: str) -> None:
    """Wait until `name` waits for the writer lock (`waiting` is set) or finishes."""
    deadline = time.monotonic() + 30
    while not (waiting.wait(0.001) or gate.done[name].is_set()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} neither blocked nor finished")


def steps_of(fn: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> int:
    """How many intercepted file-system calls `fn` makes (run in a watched thread)."""
    gate = Gate(monkeypatch)
    thread = gate.start("count", fn, lambda op, name: False)
    thread.join()
    monkeypatch.undo()
    assert not thread.errors, thread.errors  # type: ignore[attr-defined]
    return gate.counts.get("count", 0)


def interleavings(n: int) -> Iterator[int]:
    """Every pause point 1..n."""
    return iter(range(1, n + 1))


@pytest.mark.skipif(fcntl is None, reason="writers are serialised by fcntl.flock (POSIX)")
@pytest.mark.parametrize(("first", "second"), LAYOUT_PAIRS)
def test_two_writers_end_in_one_whole_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: Layout, second: Layout
) -> None:
    """Writer A paused before each of its steps while writer B saves: one whole checkpoint."""
    n = steps_of(lambda: save(tmp_path / "count", first, 1), monkeypatch)
    outcomes = []
    blocked = 0
    for k in interleavings(n):
        root = tmp_path / str(k)
        save(root, 3, 0)
        gate = Gate(monkeypatch)
        waiting = watch_lock_waits(monkeypatch)
        waiting["B"] = threading.Event()
        count = [0]

        def at_k(op: str, name: str, count: list[int] = count, k: int = k) -> bool:
            count[0] += 1
            return count[0] == k

        a = gate.start("A", lambda r=root: save(r, first, 1), at_k)
        paused = gate.wait_paused_or_done("A")
        b = gate.start("B", lambda r=root: save(r, second, 2), lambda op, name: False)
        blocked_on_a_lock_or_done(gate, waiting["B"], "B")
        blocked += waiting["B"].is_set()
        gate.resume["A"].set()
        a.join(30)
        b.join(30)
        assert not a.errors and not b.errors, (a.errors, b.errors)  # type: ignore[attr-defined]
        got = which(root, (1, 2))
        outcomes.append((k, paused, got))
        monkeypatch.undo()
    bad = [o for o in outcomes if o[2] not in ("1", "2")]
    assert not bad, f"pause points of A where the result is not one writer's checkpoint: {bad}"
    assert blocked, "B never waited for A's lock: the interleavings did not exercise the lock"


@pytest.mark.parametrize(("old", "new"), LAYOUT_PAIRS)
def test_a_reader_during_a_save_gets_old_new_or_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: Layout, new: Layout
) -> None:
    """A load while the writer is paused before each of its steps: never missing or mixed."""
    n = steps_of(lambda: save(tmp_path / "count", new, 2), monkeypatch)
    outcomes = []
    for k in interleavings(n):
        root = tmp_path / str(k)
        save(root, old, 1)
        gate = Gate(monkeypatch)
        count = [0]

        def at_k(op: str, name: str, count: list[int] = count, k: int = k) -> bool:
            count[0] += 1
            return count[0] == k

        writer = gate.start("W", lambda r=root: save(r, new, 2), at_k)
        gate.wait_paused_or_done("W")
        outcomes.append((k, which(root, (1, 2))))
        gate.resume["W"].set()
        writer.join(30)
        assert not writer.errors, writer.errors  # type: ignore[attr-defined]
        monkeypatch.undo()
        assert which(root, (2,)) == "2"
    bad = [o for o in outcomes if o[1] not in ("1", "2", "corrupt")]
    assert not bad, f"writer pause points where a reader lost or mixed the checkpoint: {bad}"


@pytest.mark.parametrize(("old", "new"), [p for p in LAYOUT_PAIRS if p[0] != "dir"])
def test_a_reader_paused_between_shards_while_a_save_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: Layout, new: Layout
) -> None:
    """A reader that read the index and some shards, then a whole save, then the rest."""
    root = tmp_path / "ckpt"
    outcomes = []
    for opened in range(1, int(old) + 1):  # pause before opening shard `opened`
        save(root, old, 1)
        gate = Gate(monkeypatch)
        shards = [0]

        def before_shard(
            op: str, name: str, opened: int = opened, shards: list[int] = shards
        ) -> bool:
            if op == "open" and name.startswith("model-"):
                shards[0] += 1
                return shards[0] == opened
            return False

        result: list[str] = []
        reader = gate.start("R", lambda r=result: r.append(which(root, (1, 2))), before_shard)
        assert gate.wait_paused_or_done("R")
        save(root, new, 2)  # the main thread is not watched: the save runs through
        gate.resume["R"].set()
        reader.join(30)
        assert not reader.errors, reader.errors  # type: ignore[attr-defined]
        outcomes.append((opened, result[0]))
        monkeypatch.undo()
    bad = [o for o in outcomes if o[1] not in ("1", "2", "corrupt")]
    assert not bad, f"reader pause points that gave a missing or mixed checkpoint: {bad}"
    assert any(o[1] == "2" for o in outcomes), outcomes  # a changed index is read again
