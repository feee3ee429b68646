"""The notebooks: stored with their source's cells and outputs, and each runs in a fresh kernel."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _build()


def _stored(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_every_notebook_is_built_from_a_source() -> None:
    """Each stored notebook has a percent-format source and is in the build list."""
    stored = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert stored == sorted(build.NAMES)
    assert all((NOTEBOOKS / f"{name}.py").is_file() for name in build.NAMES)


@pytest.mark.parametrize("name", build.NAMES)
def test_stored_notebook_matches_its_source(name: str) -> None:
    """The stored cells are the source's cells: nobody edited one and forgot the other."""
    stored = [(c.cell_type, c.source) for c in _stored(name).cells]
    assert stored == build.cells((NOTEBOOKS / f"{name}.py").read_text())


@pytest.mark.parametrize("name", build.NAMES)
def test_stored_notebook_has_its_outputs_and_plots(name: str) -> None:
    """Stored executed, in order, with plots and no error: it renders on a code host."""
    code = [c for c in _stored(name).cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("name", build.NAMES)
def test_notebook_runs_top_to_bottom_in_a_fresh_kernel(name: str, tmp_path: Path) -> None:
    """The notebook runs without an error in a new kernel of this interpreter (each cell has
    `build.CELL_TIMEOUT_S`), in an empty working directory."""
    nb = build.notebook(name)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    build.execute(nb, tmp_path)  # raises CellExecutionError on the first failing cell
    assert nb.cells[-1].outputs[0].text.strip() == sys.executable
