"""The command line: ``torch-modelstate inspect | merge | demo``, or ``python -m torch_modelstate``.

Argument parsing and rendering only: `describe` (``torch_modelstate._describe``) gives the
data behind ``inspect``, `average` (``torch_modelstate.checkpoint``) does the work of
``merge``, and `torch_modelstate.demo` is the demo.

Bad input ends with one line on stderr and exit status 1 (2 for a bad command line),
never a traceback; a library message of several lines keeps its parts, joined by ``; ``.
Set ``TORCH_MODELSTATE_DEBUG=1`` to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from torch_modelstate import __version__, demo
from torch_modelstate._cli_paths import UsageError, check_merge_output, check_weights
from torch_modelstate._cli_render import render_inspect, render_tensors
from torch_modelstate._describe import describe
from torch_modelstate._progress import ProgressBar
from torch_modelstate._slerp_files import slerp_files
from torch_modelstate._summary import format_bytes
from torch_modelstate.checkpoint._average import average
from torch_modelstate.checkpoint._layout import parse_size

__all__ = ["ProgressBar", "describe", "main"]

PROG = "torch-modelstate"
DEBUG_ENV = "TORCH_MODELSTATE_DEBUG"

_TOP_EPILOG = f"""\
examples:
  {PROG} demo                              # the library on one small job, checked
  {PROG} inspect model.safetensors         # totals, dtypes, modules, frozen flags, ties
  {PROG} merge a.safetensors b.safetensors -o soup.safetensors

Run `{PROG} COMMAND --help` for a command's options.
"""
_INSPECT_EPILOG = f"""\
examples:
  {PROG} inspect model.safetensors
  {PROG} inspect checkpoints/run1 --depth 2      # a directory, sharded or not
  {PROG} inspect model.safetensors --tensors     # every tensor: key, shape, dtype
  {PROG} inspect model.safetensors --json | jq .total
"""
_MERGE_EPILOG = f"""\
examples:
  {PROG} merge a.safetensors b.safetensors -o soup.safetensors
  {PROG} merge run1/ run2/ run3/ -o soup/ --weights 1 1 2
  {PROG} merge a.safetensors b.safetensors -o soup/ --max-shard-size 2GB

OUT is a file ending in .safetensors, or a directory (an existing one, a name ending in
"/" or a name without an extension) that gets model.safetensors, or the shards and
their index with --max-shard-size. An output that is one of the inputs (or inside an
input directory) is refused unless --force.
"""
_DEMO_EPILOG = f"""\
examples:
  {PROG} demo
  {PROG} demo --steps 50 --out demo-ckpt    # shorter, and keep demo-ckpt/{demo.CHECKPOINT}
"""


class _Parser(argparse.ArgumentParser):
    """Errors on one line: ``torch-modelstate merge: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        # argparse names the flag before the message: "argument --max-shard-size: ..."
        text = _joined(err).replace("`max_shard_size` ", "")
        raise argparse.ArgumentTypeError(text) from None


def _parser() -> _Parser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Inspect, merge and demonstrate torch_modelstate checkpoints.",
        epilog=_TOP_EPILOG,
        formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect",
        help="summarise a checkpoint: totals, dtypes, modules, frozen flags, ties",
        description=(
            "Summarise a safetensors checkpoint (a file, a directory, an index, or one shard\n"
            "of a sharded checkpoint) from its headers alone: instant on any size."
        ),
        epilog=_INSPECT_EPILOG,
        formatter_class=raw,
    )
    inspect.add_argument(
        "path", metavar="FILE_OR_DIR", help="a .safetensors file, a directory, an index or a shard"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON for scripts")
    inspect.add_argument(
        "--depth",
        type=_positive_int,
        default=None,
        metavar="N",
        help="show modules down to depth N (default: all depths; 1: the outermost modules)",
    )
    inspect.add_argument(
        "--tensors", action="store_true", help="list every tensor: key, shape, dtype, frozen"
    )

    merge = commands.add_parser(
        "merge",
        help="weighted average of checkpoints (a model soup)",
        description=(
            "Write the weighted average of checkpoints of one architecture, tensor by tensor\n"
            "with bounded memory. Weights are normalised to sum to 1; integer and bool\n"
            "tensors (counters, masks) and the metadata come from the first input."
        ),
        epilog=_MERGE_EPILOG,
        formatter_class=raw,
    )
    merge.add_argument("inputs", nargs="+", metavar="IN", help="checkpoint files or directories")
    merge.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="the file or directory to write"
    )
    merge.add_argument(
        "--weights", nargs="+", type=float, metavar="W", help="one per input (default: equal)"
    )
    merge.add_argument(
        "--method",
        choices=["mean", "slerp"],
        default="mean",
        help="how to combine: mean, the weighted average (default); slerp, the spherical "
        "interpolation of two inputs at --t",
    )
    merge.add_argument(
        "--t",
        type=float,
        metavar="T",
        help="with --method slerp: 0 is the first input, 1 the second (default 0.5)",
    )
    merge.add_argument(
        "--max-shard-size",
        type=_size,
        metavar="SIZE",
        help='write shards of at most SIZE ("5GB", "500MB") into the directory OUT',
    )
    merge.add_argument(
        "-f", "--force", action="store_true", help="allow an output that is one of the inputs"
    )
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    demo_cmd = commands.add_parser(
        "demo",
        help="train, freeze, tie, EMA, save and reload a small model, checked",
        description=(
            "Train a tiny language model with tied embeddings, freeze all but its last block,\n"
            "fine-tune it with an EMA, save, reload and check it (no downloads, about 20 s)."
        ),
        epilog=_DEMO_EPILOG,
        formatter_class=raw,
    )
    demo_cmd.add_argument(
        "--steps",
        type=_positive_int,
        default=demo.DEFAULT_STEPS,
        metavar="N",
        help=f"optimizer steps, for pretraining and again for fine-tuning "
        f"(default {demo.DEFAULT_STEPS})",
    )
    demo_cmd.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"keep the checkpoint as DIR/{demo.CHECKPOINT} (default: a temporary directory)",
    )
    demo_cmd.add_argument(
        "--seed", type=int, default=0, metavar="N", help="random seed, one run per seed (default 0)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "merge":
            return _merge(args)
        return _demo(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `inspect | head`: the reader left; stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except UsageError as err:
        print(f"{PROG} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, KeyError, OSError) as err:
        print(f"{PROG} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(
            f"{PROG} {args.command}: internal error: {type(err).__name__}: {_one_line(err)} "
            f"(set {DEBUG_ENV}=1 for a traceback)",
            file=sys.stderr,
        )
        return 70


# The library's parameter names, as the user typed them on the command line.
_FLAGS = {
    "`max_shard_size`": "`--max-shard-size`",
    "`weights`": "`--weights`",
    "`output`": "`-o/--output`",
}


def _one_line(err: BaseException) -> str:
    """The message on one line, its parts (lines) joined by ``; ``, flags as typed."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"{err.strerror}: {err.filename}"
    return _flags(_joined(err))


def _flags(text: str) -> str:
    for name, flag in _FLAGS.items():
        text = text.replace(name, flag)
    return text


def _joined(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    parts = [part.strip() for part in text.splitlines() if part.strip()]
    # "a sentence.\n  fix: ..." reads "a sentence; fix: ..." on one line.
    joined = [part.rstrip(".;") for part in parts[:-1]] + parts[-1:]
    return "; ".join(joined) or type(err).__name__


def _inspect(args: argparse.Namespace) -> int:
    info = describe(args.path)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    render_inspect(sys.stdout, info, depth=args.depth)
    if args.tensors:
        sys.stdout.write("\n")
        render_tensors(sys.stdout, info)
    return 0


def check_slerp_args(
    method: str, n_inputs: int, t: float | None, weights: Sequence[float] | None
) -> None:
    """The command line of ``merge --method slerp`` (``--t``), checked before anything runs.

    >>> check_slerp_args("slerp", 3, None, None)
    Traceback (most recent call last):
    torch_modelstate._cli_paths.UsageError: --method slerp: interpolates exactly two checkpoints.
      got: 3 inputs
      fix: give two IN, or use --method mean for more
    """
    if method != "slerp":
        if t is not None:
            msg = "--t: only --method slerp takes it.\n  fix: add --method slerp, or drop --t"
            raise UsageError(msg)
        return
    if n_inputs != 2:
        msg = (
            "--method slerp: interpolates exactly two checkpoints.\n"
            f"  got: {n_inputs} inputs\n  fix: give two IN, or use --method mean for more"
        )
        raise UsageError(msg)
    if weights is not None:
        msg = (
            "--weights: --method slerp takes --t (the position between the two inputs).\n"
            "  fix: drop --weights; --t 0.3 is 30 % of the way from the first to the second"
        )
        raise UsageError(msg)
    if t is not None and not math.isfinite(t):
        msg = f"--t: must be a finite number (0 is the first input, 1 the second).\n  got: {t}"
        raise UsageError(msg)


def _merge(args: argparse.Namespace) -> int:
    # Every check of the command line comes first: nothing is read, no bar is started.
    check_weights(args.weights, len(args.inputs))
    check_slerp_args(args.method, len(args.inputs), args.t, args.weights)
    output = check_merge_output(
        args.inputs, args.output, sharded=args.max_shard_size is not None, force=args.force
    )
    start = time.perf_counter()
    bar = None if args.quiet else ProgressBar("merge", unit="bytes")
    try:
        # The one place a method is chosen: another --method adds a branch here.
        if args.method == "mean":
            written = average(
                args.inputs,
                output,
                weights=args.weights,
                max_shard_size=args.max_shard_size,
                progress=bar,
            )
            what = "weighted average" if args.weights else "average"
        elif args.method == "slerp":
            t = 0.5 if args.t is None else args.t
            written = slerp_files(
                args.inputs, output, t=t, max_shard_size=args.max_shard_size, progress=bar
            )
            what = f"slerp (t={t:g})"
    finally:
        if bar is not None:
            bar.close()
    info = describe(written)
    seconds = time.perf_counter() - start
    total = info["total"]
    print(
        f"wrote {written}: {total['tensors']:,} tensors, {format_bytes(total['bytes'])}, "
        f"{what} of {len(args.inputs)} checkpoints in {seconds:.1f} s"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.out is not None:
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as err:
            reason = err.strerror or str(err)
            msg = f"--out: cannot make the directory {args.out!r}: {reason}"
            raise UsageError(msg) from None
    return demo.main(steps=args.steps, seed=args.seed, out=args.out)
