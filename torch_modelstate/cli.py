"""The command line: ``torch-modelstate inspect | merge | demo``, or ``python -m torch_modelstate``.

- ``inspect FILE_OR_DIR [--json] [--depth N]`` reads only the headers (instant on any
  size): totals as Axon's summary counts them, dtypes, and a per-module table with
  counts, sizes, frozen flags and ties.
- ``merge IN... -o OUT [--weights W...] [--max-shard-size S]`` writes the weighted average
  of checkpoints (uniform by default), tensor by tensor (see `torch_modelstate.io.average`).
- ``demo`` runs the project's demonstration (``torch_modelstate._demo``).

Bad input ends with one line on stderr and exit status 1 (2 for a bad command line),
never a traceback. Set ``TORCH_MODELSTATE_DEBUG=1`` to see the traceback of an
unexpected error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NoReturn, TextIO

from torch_modelstate import _format
from torch_modelstate import io as tms_io
from torch_modelstate._state import format_bytes

__all__ = ["ProgressBar", "describe", "main"]

PROG = "torch-modelstate"


class _Parser(argparse.ArgumentParser):
    """Errors on one line: ``torch-modelstate merge: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser(demo_module: ModuleType | None = None) -> _Parser:
    parser = _Parser(
        prog=PROG, description="Inspect, merge and demonstrate torch_modelstate checkpoints."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect",
        help="summarise a checkpoint: totals, dtypes, modules, frozen flags, ties",
        description=(
            "Summarise a safetensors checkpoint (a file, a directory or an index) from its headers."
        ),
    )
    inspect.add_argument("path", metavar="FILE_OR_DIR")
    inspect.add_argument("--json", action="store_true", help="print JSON for scripts")
    inspect.add_argument(
        "--depth", type=int, default=None, metavar="N", help="show modules down to depth N"
    )

    merge = commands.add_parser(
        "merge",
        help="weighted average of checkpoints",
        description=(
            "Write the weighted average of checkpoints of one architecture, tensor by tensor. "
            "Weights are normalised to sum to 1; integer and bool tensors come from the first "
            "input."
        ),
    )
    merge.add_argument("inputs", nargs="+", metavar="IN")
    merge.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="file (or directory with sharding)"
    )
    merge.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one weight per input (default: equal)",
    )
    merge.add_argument(
        "--max-shard-size", metavar="SIZE", help='write shards of at most SIZE ("5GB") into OUT/'
    )
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    demo = commands.add_parser(
        "demo", help="train, freeze, tie, EMA, save and reload a small model"
    )
    # The demo may define its options itself (``add_arguments(parser)``); they pass through.
    add_arguments = getattr(demo_module, "add_arguments", None)
    if add_arguments is not None:
        add_arguments(demo)
    else:
        _demo_arguments(demo)
    return parser


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--steps", type=int, default=None, metavar="N", help="training steps")
    demo.add_argument("--out", default=None, metavar="DIR", help="where to write the checkpoint")
    demo.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")


def _version() -> str:
    from torch_modelstate import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    demo_module = None
    if argv[:1] == ["demo"]:
        try:
            demo_module = importlib.import_module("torch_modelstate._demo")
        except ModuleNotFoundError as err:
            if err.name != "torch_modelstate._demo":
                raise
            print(f"{PROG} demo: error: the demo is not part of this installation", file=sys.stderr)
            return 1
    args = _parser(demo_module).parse_args(argv)
    try:
        if demo_module is not None:
            return int(demo_module.main(args) or 0)
        if args.command == "inspect":
            return _inspect(args)
        return _merge(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `inspect | head`: the reader left; stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (ValueError, TypeError, KeyError, OSError) as err:
        print(f"{PROG} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        if os.environ.get("TORCH_MODELSTATE_DEBUG"):
            raise
        print(
            f"{PROG} {args.command}: internal error: {type(err).__name__}: {_one_line(err)} "
            "(set TORCH_MODELSTATE_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 70


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.strerror}: {err.filename}"
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return (
        " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(err).__name__
    )


# --------------------------------------------------------------------------- inspect


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready summary of a checkpoint, read from its headers only.

    >>> import os, tempfile, torch
    >>> import torch_modelstate as tms
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> tms.save({"fc": {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}}, path)
    >>> info = describe(path)
    >>> info["total"]["elements"], info["modules"][0]["name"], info["dtypes"]["float32"]["tensors"]
    (8, 'fc', 2)
    """
    with _format.open_checkpoint(path) as ckpt:
        saved = tms_io._saved(ckpt)
        metadata = ckpt.metadata
        files = [str(shard.path) for shard in ckpt.shards]
        infos = dict(ckpt.tensors)
        resolved = str(ckpt.path)
        index = str(ckpt.index) if ckpt.index else None
    known = saved.frozen is not None
    frozen = saved.frozen or set()
    tensors: list[dict[str, Any]] = []
    totals = {"tensors": 0, "elements": 0, "bytes": 0}
    kinds: dict[str, dict[str, int]] = {
        name: {"elements": 0, "bytes": 0, "trainable_elements": 0, "trainable_bytes": 0}
        for name in ("parameters", "state")
    }
    dtypes: dict[str, dict[str, int]] = {}
    modules: dict[str, dict[str, Any]] = {}

    def module_row(name: str) -> dict[str, Any]:
        row = modules.get(name)
        if row is None:
            row = modules[name] = {
                "name": name,
                "depth": name.count(".") + 1 if name else 0,
                "tensors": 0,
                "elements": 0,
                "bytes": 0,
                "frozen_tensors": 0,
                "dtypes": [],
                "ties": {},
            }
        return row

    for key in saved.order:
        parts = key.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts))] or [""]
        for prefix in prefixes:
            module_row(prefix)
        info = infos.get(key)
        if info is None:
            source, transform = saved.ties[key]
            modules[prefixes[-1]]["ties"][parts[-1]] = {"source": source, "transform": transform}
            continue
        kind = "state" if key in saved.state else "parameters"
        is_frozen = key in frozen
        dtype = _format.dtype_name(info.dtype)
        tensors.append(
            {
                "key": key,
                "dtype": dtype,
                "shape": list(info.shape),
                "elements": info.numel,
                "bytes": info.nbytes,
                "kind": "state" if kind == "state" else "parameter",
                "frozen": is_frozen if known else None,
                "file": info.file.name,
            }
        )
        totals["tensors"] += 1
        totals["elements"] += info.numel
        totals["bytes"] += info.nbytes
        bucket = kinds[kind]
        bucket["elements"] += info.numel
        bucket["bytes"] += info.nbytes
        if not is_frozen:
            bucket["trainable_elements"] += info.numel
            bucket["trainable_bytes"] += info.nbytes
        d = dtypes.setdefault(dtype, {"tensors": 0, "elements": 0, "bytes": 0})
        d["tensors"] += 1
        d["elements"] += info.numel
        d["bytes"] += info.nbytes
        for prefix in prefixes:
            row = modules[prefix]
            row["tensors"] += 1
            row["elements"] += info.numel
            row["bytes"] += info.nbytes
            row["frozen_tensors"] += is_frozen
            if dtype not in row["dtypes"]:
                row["dtypes"].append(dtype)
    if not known:
        for row in modules.values():
            row["frozen_tensors"] = None
    return {
        "path": resolved,
        "index": index,
        "files": files,
        "format": metadata.get("format"),
        "torch_modelstate": _version_of(metadata),
        "total": totals,
        "parameters": kinds["parameters"],
        "state": kinds["state"],
        "frozen_known": known,
        "dtypes": dtypes,
        "ties": {dest: {"source": s, "transform": t} for dest, (s, t) in saved.ties.items()},
        "modules": list(modules.values()),
        "tensors": tensors,
    }


def _version_of(metadata: dict[str, str]) -> int | None:
    try:
        version = json.loads(metadata[tms_io.METADATA_KEY])["version"]
    except (KeyError, ValueError, TypeError):
        return None
    return version if isinstance(version, int) else None


def _inspect(args: argparse.Namespace) -> int:
    info = describe(args.path)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    out = sys.stdout
    total, params, state = info["total"], info["parameters"], info["state"]
    files = info["files"]
    origin = (
        f"torch_modelstate metadata v{info['torch_modelstate']}"
        if info["torch_modelstate"]
        else "no torch_modelstate metadata"
    )
    out.write(f"{info['path']}\n")
    plural = "s" if len(files) != 1 else ""
    out.write(f"  {len(files)} file{plural}, format {info['format'] or '?'}, {origin}\n\n")
    out.write(f"Parameters: {total['elements']} ({format_bytes(total['bytes'])})\n")
    if info["frozen_known"]:
        for label, bucket in (("Trainable Parameters", params), ("Trainable State", state)):
            size = format_bytes(bucket["trainable_bytes"])
            out.write(f"{label}: {bucket['trainable_elements']} ({size})\n")
        out.write(
            f"  parameters {params['elements']} ({format_bytes(params['bytes'])}), "
            f"state {state['elements']} ({format_bytes(state['bytes'])})\n"
        )
    else:
        out.write(
            "  (no record of state keys or frozen flags: the file was written by another tool)\n"
        )
    ties = info["ties"]
    out.write(f"Tensors: {total['tensors']} stored, {len(ties)} tied\n")
    dtype_parts = [
        f"{name} ({d['tensors']} tensors, {d['elements']} elements, {format_bytes(d['bytes'])})"
        for name, d in info["dtypes"].items()
    ]
    out.write(f"Dtypes: {', '.join(dtype_parts) or '-'}\n\n")
    rows = [r for r in info["modules"] if args.depth is None or r["depth"] <= args.depth]
    table = [["module", "tensors", "elements", "size", "frozen", "dtype", "ties"]]
    for row in rows:
        name = (
            "(top level)"
            if not row["name"]
            else "  " * (row["depth"] - 1) + row["name"].rsplit(".", 1)[-1]
        )
        table.append(
            [
                name,
                str(row["tensors"]),
                str(row["elements"]),
                format_bytes(row["bytes"]),
                _frozen_word(row["frozen_tensors"], row["tensors"]),
                ", ".join(row["dtypes"]) or "-",
                ", ".join(_tie_text(attr, tie) for attr, tie in row["ties"].items()),
            ]
        )
    _write_table(out, table, right={1, 2, 3})
    return 0


def _frozen_word(frozen: int | None, count: int) -> str:
    if frozen is None or count == 0:
        return "?" if frozen is None else "-"
    if frozen == 0:
        return "no"
    return "yes" if frozen == count else f"{frozen}/{count}"


def _tie_text(attr: str, tie: dict[str, Any]) -> str:
    source = tie["source"] if tie["transform"] is None else f"{tie['transform']}({tie['source']})"
    return f"{attr} = {source}"


def _write_table(out: TextIO, table: list[list[str]], right: set[int]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.write("  ".join(cells).rstrip() + "\n")


# --------------------------------------------------------------------------- merge


def _merge(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    bar = None if args.quiet else ProgressBar("merge")
    try:
        written = tms_io.average(
            args.inputs,
            args.output,
            weights=args.weights,
            max_shard_size=args.max_shard_size,
            progress=bar,
        )
    finally:
        if bar is not None:
            bar.close()
    info = describe(written)
    seconds = time.perf_counter() - start
    print(
        f"wrote {written}: {info['total']['tensors']} tensors, "
        f"{format_bytes(info['total']['bytes'])}, average of {len(args.inputs)} checkpoints "
        f"in {seconds:.1f} s"
    )
    return 0


class ProgressBar:
    """A small progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise.

    Call it with ``(done, total)``; `close` ends the line.
    """

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_step = -1
        self._drawn = False
        self._state = (0, 0)

    def __call__(self, done: int, total: int) -> None:
        self._state = (done, total)
        now = time.perf_counter()
        if self.tty:
            if done >= total or now - self._last_draw >= 0.1:
                self._draw("\r")
                self._last_draw = now
            return
        step = 10 if total == 0 else done * 10 // total
        if step != self._last_step:
            self._last_step = step
            self._draw("")

    def _draw(self, prefix: str) -> None:
        done, total = self._state
        fraction = 1.0 if total == 0 else min(done / total, 1.0)
        filled = round(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        line = (
            f"{self.label} [{bar}] {fraction * 100:3.0f}%  "
            f"{format_bytes(done)} / {format_bytes(total)}  "
            f"{time.perf_counter() - self.start:.1f} s"
        )
        self.stream.write(prefix + line + ("" if self.tty else "\n"))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.tty and self._drawn:
            self._draw("\r")
            self.stream.write("\n")
            self.stream.flush()
