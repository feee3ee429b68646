"""Build the notebooks from their sources and execute them, so they are stored with outputs.

Each notebook is written as a plain Python file in the "percent" format (``# %%`` starts a code
cell, ``# %% [markdown]`` a Markdown cell whose lines are comments), which linters, formatters
and diffs read; this script turns it into ``<name>.ipynb``, runs it top to bottom in a fresh
``python3`` kernel (the interpreter that runs this script) and saves it with its outputs::

    python notebooks/build.py                            # every notebook
    python notebooks/build.py finetuning_with_freezing   # one
    python notebooks/build.py --no-execute               # cells only, outputs cleared

``tests/test_notebooks.py`` checks that each stored notebook has its source's cells and runs
without an error in a fresh kernel.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NAMES = ["finetuning_with_freezing", "tied_language_model", "ema_and_soups"]
CELL_TIMEOUT_S = 120
KERNEL = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def cells(source: str) -> list[tuple[str, str]]:
    """``(kind, text)`` for each cell of a percent-format source, kind "code" or "markdown"."""
    out: list[tuple[str, list[str]]] = []
    for line in source.splitlines():
        if line.startswith("# %%"):
            out.append(("markdown" if "[markdown]" in line else "code", []))
        elif out:
            out[-1][1].append(line)
    result = []
    for kind, lines in out:
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.removeprefix("#") for ln in lines]
        text = "\n".join(lines).strip("\n")
        if text:
            result.append((kind, text))
    return result


def notebook(name: str) -> nbformat.NotebookNode:
    """The notebook `name` built from ``notebooks/<name>.py``, without outputs."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNEL)
    nb.metadata["language_info"] = {"name": "python"}
    for kind, text in cells((HERE / f"{name}.py").read_text()):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(make(text))
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding changes only what changed
        cell["id"] = f"{name[:20]}-{i:02d}"
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    """Run `nb` top to bottom in a fresh kernel with `cwd` as its working directory."""
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=NAMES, help="notebooks to build (default: all)")
    parser.add_argument("--no-execute", action="store_true", help="write the cells only")
    args = parser.parse_args(argv)
    for name in args.names:
        nb = notebook(name)
        start = time.perf_counter()
        if not args.no_execute:
            execute(nb, HERE)
        nbformat.write(nb, HERE / f"{name}.ipynb")
        took = time.perf_counter() - start
        print(f"{name}.ipynb: {len(nb.cells)} cells, executed in {took:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
