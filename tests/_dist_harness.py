"""Run many distributed checks in one 2-process gloo spawn, with a hard deadline.

The parent (a pytest fixture) calls `run_group(module, names, tmp)`: it starts this file as
a subprocess (its own session, so the deadline kills the workers too), which spawns
``WORLD`` workers with `torch.multiprocessing.start_processes` (``spawn``, no ports:
``init_method="file://..."``). Each worker runs every named check of `module` in order
and appends one JSON line per check to ``rank<r>.jsonl``: ``{"name", "ok", "error"}``.
A check that does not finish before the deadline is reported as such, as is every check
after it. A check is a function ``check_x(ctx: Ctx) -> None`` that raises on failure; every
rank runs it, and ``ctx.tmp`` is a directory shared by the ranks, fresh per check.

>>> sorted(_describe_missing({"a": {"ok": True, "error": ""}}, ["a", "b"]))
['b']
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

WORLD = 2
DEADLINE_S = 240.0
_COLLECTIVE_TIMEOUT_S = 10.0


@dataclass
class Ctx:
    """What a check sees: its rank, the world size and a directory shared by the ranks."""

    rank: int
    world: int
    tmp: Path


def _describe_missing(results: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    return [name for name in names if name not in results]


def run_group(names: list[str], tmp: Path) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """Run the checks `names` (``"module:check"``) on every rank, in one spawn:
    ``({name: [result per rank]}, log)``."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, __file__, str(tmp), *names]
    proc = subprocess.Popen(
        cmd,
        cwd=Path(__file__).parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S)
        note = f"the workers exited with {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        note = f"the workers were killed at the {DEADLINE_S:.0f} s deadline"
    log = out.decode(errors="replace")[-4000:]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for rank in range(WORLD):
        path = tmp / f"rank{rank}.jsonl"
        seen: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                seen[record["name"]] = record
        for name in names:
            record = seen.get(name)
            if record is None:
                record = {
                    "name": name,
                    "ok": False,
                    "error": f"rank {rank}: not run ({note})\n{log}",
                }
            results[name].append(record)
    return results, log


def check_names(module: ModuleType) -> list[str]:
    """The checks of a module: its ``check_*`` functions, in file order."""
    return [name for name in vars(module) if name.startswith("check_")]


def run_selected(
    request: pytest.FixtureRequest,
    tmp_factory: pytest.TempPathFactory | ModuleType,
    tmp: Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The results of every selected check of the session (``-k`` and the like respected),
    run in one spawn the first time a distributed test module asks. A test module names its
    checks module as ``CHECKS``; results are keyed ``"module:check"``.

    The older form ``run_selected(request, checks_module, tmp)`` runs that module's selected
    checks in a spawn of their own, keyed by check name.
    """
    if isinstance(tmp_factory, ModuleType):
        assert tmp is not None
        return _run_module(request, tmp_factory, tmp)
    session = request.session
    cached: dict[str, list[dict[str, Any]]] | None = getattr(session, "_dist_results", None)
    if cached is None:
        names: list[str] = []
        for item in session.items:
            checks = getattr(getattr(item, "module", None), "CHECKS", None)
            if checks is not None and hasattr(item, "callspec"):
                name = f"{checks.__name__}:{item.callspec.params['name']}"
                if name not in names:
                    names.append(name)
        cached, _ = run_group(names, tmp_factory.mktemp("dist"))
        session._dist_results = cached  # type: ignore[attr-defined]
    return cached


def _run_module(
    request: pytest.FixtureRequest, module: ModuleType, tmp: Path
) -> dict[str, list[dict[str, Any]]]:
    here = request.module
    selected = {
        item.callspec.params["name"]
        for item in request.session.items
        if getattr(item, "module", None) is here and hasattr(item, "callspec")
    }
    names = [name for name in check_names(module) if name in selected]
    results, _ = run_group([f"{module.__name__}:{name}" for name in names], tmp)
    return {name.partition(":")[2]: value for name, value in results.items()}


def _worker(rank: int, tmp: str, names: list[str]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    _init(tmp, rank, 0)
    out = Path(tmp) / f"rank{rank}.jsonl"
    try:
        for i, name in enumerate(names):
            module, _, function = name.partition(":")
            check: Callable[[Ctx], None] = getattr(importlib.import_module(module), function)
            where = Path(tmp) / function
            where.mkdir(exist_ok=True)
            ok, error = True, ""
            try:
                check(Ctx(rank, WORLD, where))
            except BaseException:  # every failure is reported, per check
                ok, error = False, f"rank {rank}:\n{traceback.format_exc()}"
            with out.open("a") as f:
                f.write(json.dumps({"name": name, "ok": ok, "error": error}) + "\n")
            if not _file_barrier(Path(tmp), i, rank, ok):
                # A failed check may leave the ranks out of step in their collectives:
                # start the next check on a fresh process group.
                dist.destroy_process_group()
                _init(tmp, rank, i + 1)
    finally:
        dist.destroy_process_group()


def _init(tmp: str, rank: int, generation: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/rendezvous{generation}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=_COLLECTIVE_TIMEOUT_S),
    )


def _file_barrier(tmp: Path, step: int, rank: int, ok: bool) -> bool:
    """Wait for every rank to finish check `step` (through files: no collective to go
    wrong); whether it passed on all of them."""
    sync = tmp / "sync"
    sync.mkdir(exist_ok=True)
    mine = sync / f"{step}-{rank}.done"
    mine.with_suffix(".tmp").write_text("1" if ok else "0")
    mine.with_suffix(".tmp").rename(mine)
    flags = []
    for other in range(WORLD):
        path = sync / f"{step}-{other}.done"
        while not path.exists():
            time.sleep(0.005)
        flags.append(path.read_text() == "1")
    return all(flags)


def _main(argv: list[str]) -> None:
    import torch.multiprocessing as mp

    tmp, *names = argv
    ctx = mp.start_processes(
        _worker, args=(tmp, names), nprocs=WORLD, join=False, start_method="spawn"
    )
    try:
        while not ctx.join(timeout=DEADLINE_S):
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


if __name__ == "__main__":
    _main(sys.argv[1:])
