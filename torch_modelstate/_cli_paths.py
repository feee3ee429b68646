"""Checks of the command line's arguments that argparse cannot make, before any file is read.

``merge``'s output must be a place it can write (its directory exists, a file name ends
in ``.safetensors``, a directory for shards) and must not be one of its inputs, whatever
the spelling (`os.path.samefile`), nor inside an input directory, unless ``--force``.
The messages name the flags as the user typed them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["UsageError", "check_merge_output", "check_weights"]

_INDEX_SUFFIX = ".safetensors.index.json"


class UsageError(ValueError):
    """A command-line argument that cannot work; the command exits with status 2."""


def check_weights(weights: Sequence[float] | None, n_inputs: int) -> None:
    """``--weights``: one finite number per input, with a non-zero sum.

    >>> check_weights([1.0], 2)
    Traceback (most recent call last):
    torch_modelstate._cli_paths.UsageError: --weights: give one weight per input.
      expected: 2 weights (one per IN)
      got: 1 (1)
    """
    if weights is None:
        return
    if len(weights) != n_inputs:
        shown = " ".join(f"{w:g}" for w in weights)
        msg = (
            "--weights: give one weight per input.\n"
            f"  expected: {n_inputs} weights (one per IN)\n"
            f"  got: {len(weights)} ({shown})"
        )
        raise UsageError(msg)
    if not all(math.isfinite(w) for w in weights) or math.fsum(weights) == 0:
        shown = " ".join(f"{w:g}" for w in weights)
        msg = (
            "--weights: the weights must be finite numbers with a non-zero sum "
            f"(they are normalised to sum to 1).\n  got: {shown}"
        )
        raise UsageError(msg)


def check_merge_output(
    inputs: Sequence[str], output: str, *, sharded: bool, force: bool = False
) -> str:
    """Check ``-o/--output`` of ``merge`` and return the path to write (see the module doc).

    A name without an extension, or ending in ``/``, is a directory (made when the merge
    writes it) that gets ``model.safetensors``, or the shards with ``--max-shard-size``.

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> soup = os.path.join(d, "soup")
    >>> check_merge_output(["a.safetensors"], soup, sharded=False) == soup + os.sep
    True
    """
    out = Path(output)
    is_dir = _output_is_dir(out, output, sharded)
    place = out if is_dir and out.is_dir() else out.parent
    if not os.access(place, os.W_OK | os.X_OK):
        msg = f"-o/--output: cannot write into the directory `{place}` (permission denied)."
        raise UsageError(msg)
    if not force:
        for name in inputs:
            _refuse_overlap(Path(name), name, out, output, is_dir)
    return str(out) + os.sep if is_dir and not out.exists() else output


def _output_is_dir(out: Path, output: str, sharded: bool) -> bool:
    """Whether `output` names a directory to write into, after checking that it can be one."""
    fix_dir = f"-o {out.with_suffix('')}{os.sep}"
    if out.exists():
        if out.is_dir():
            return True
        if not out.is_file():
            msg = f"-o/--output: `{output}` exists and is not a regular file or a directory."
            raise UsageError(msg)
        if sharded:
            msg = (
                "-o/--output: with --max-shard-size, OUT is the directory to write the shards "
                f"into; `{output}` is a file.\n  fix: {fix_dir}"
            )
            raise UsageError(msg)
        if out.suffix != ".safetensors":
            msg = (
                f"-o/--output: `{output}` exists and is not a .safetensors file; "
                "merge replaces only checkpoints.\n  fix: choose a name ending in .safetensors"
            )
            raise UsageError(msg)
        return False
    if not out.parent.is_dir():
        msg = (
            f"-o/--output: the directory `{out.parent}` does not exist.\n"
            f"  fix: create it first (mkdir -p {out.parent}), or choose another OUT"
        )
        raise UsageError(msg)
    if output.endswith(("/", os.sep)) or out.suffix == "":
        return True
    if sharded and out.suffix == ".safetensors":
        msg = (
            "-o/--output: with --max-shard-size, OUT is the directory to write the shards "
            f"into, not a file name; got `{output}`.\n  fix: {fix_dir}"
        )
        raise UsageError(msg)
    if sharded:
        return True
    if out.suffix != ".safetensors":
        msg = (
            f"-o/--output: a checkpoint file name ends in .safetensors; got `{output}`.\n"
            f"  fix: -o {out.with_suffix('.safetensors')}, or -o {out}{os.sep} for a directory"
        )
        raise UsageError(msg)
    return False


def _refuse_overlap(given: Path, name: str, out: Path, output: str, is_dir: bool) -> None:
    """Refuse an output that would replace (or sit inside) the input `given`."""
    if not given.exists():
        return  # reading it reports that it is missing
    # An index stands for its directory: the shards beside it are the input.
    source_dir = given if given.is_dir() else given.parent
    source_is_dir = given.is_dir() or given.name.endswith(_INDEX_SUFFIX)
    if is_dir:
        if out.exists() and (_same(given, out) or _same(given.parent, out)):
            _refuse(name, output, "is, or is inside, the output directory")
        return
    if given.is_file() and _same(given, out):
        _refuse(name, output, "is the output file")
    if source_is_dir and _same(source_dir, out.parent):
        _refuse(name, output, "is a checkpoint directory that would hold the output")


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _refuse(name: str, output: str, why: str) -> None:
    msg = (
        f"-o/--output: `{output}` would replace an input: the input `{name}` {why}; "
        "merging reads the inputs while it writes.\n"
        "  fix: choose another OUT, or pass --force to replace it"
    )
    raise UsageError(msg)
