"""The README and the package index page: every Python block runs as written, the rest holds.

Each ```python block runs alone in a fresh interpreter, in an empty temporary directory. A block
that cannot run on its own (a signature overview, a multi-process launch) is marked with a line
``<!-- not-run -->`` right above it. A ```text block that directly follows a Python block is that
block's output and is compared with what it prints.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import torch_modelstate as tms
from torch_modelstate import ModelState

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, ROOT / "PYPI.md"]
NOT_RUN = "<!-- not-run -->"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    """One fenced Python block of a page, where it is and what output is shown after it."""

    page: Path
    line: int
    heading: str
    code: str
    run: bool
    output: str | None

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{self.page.name}:{self.line}:{slug}"


def _prose(text: str) -> str:
    """The text with every fenced block blanked out, offsets kept: no `#` lines of code."""
    return FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def _blocks(page: Path) -> list[Block]:
    text = page.read_text()
    fences = list(FENCE.finditer(text))
    blocks = []
    for i, m in enumerate(fences):
        if m.group(1) != "python":
            continue
        before = text[: m.start()]
        headings = re.findall(r"^#+ (.+)$", _prose(before), re.M)
        previous = [ln for ln in before.splitlines() if ln.strip()]
        following = fences[i + 1] if i + 1 < len(fences) else None
        shown = None
        if (
            following is not None
            and following.group(1) == "text"
            and not text[m.end() : following.start()].strip()
        ):
            shown = following.group(2)
        blocks.append(
            Block(
                page=page,
                line=before.count("\n") + 1,
                heading=headings[-1] if headings else page.stem,
                code=m.group(2),
                run=not (previous and previous[-1].strip() == NOT_RUN),
                output=shown,
            )
        )
    return blocks


ALL = [b for page in PAGES for b in _blocks(page)]


def _section(page: Path, title: str) -> str:
    text = page.read_text()
    prose = _prose(text)
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", prose, re.S | re.M)
    assert m is not None, f"{page.name} has no '## {title}' section"
    return text[m.start(1) : m.end(1)]


@pytest.mark.parametrize("block", [b for b in ALL if b.run], ids=lambda b: b.id)
def test_python_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    """The block runs alone in a fresh interpreter and prints the output shown right after it."""
    done = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{block.id} failed:\n{done.stderr[-4000:]}"
    if block.output is not None:
        assert done.stdout.strip() == block.output.strip()


def test_only_a_few_blocks_are_exempt() -> None:
    """At most a few Python blocks are marked not-run, and every page has some that run."""
    exempt = [b.id for b in ALL if not b.run]
    assert len(exempt) <= 3, exempt
    for page in PAGES:
        assert any(b.run for b in ALL if b.page == page), page.name


def test_install_comes_first_and_names_the_cpu_wheel_index() -> None:
    """The first section is the user's install: a venv, CPU torch, the package, the demo."""
    first = re.search(r"^## (.+)$", _prose(README.read_text()), re.M)
    assert first is not None
    assert first.group(1) in {"Contents", "Install"}
    install = _section(README, "Install")
    for needed in (
        "python3 -m venv",
        "--index-url https://download.pytorch.org/whl/cpu",
        "pip install torch-modelstate",
        "torch-modelstate demo",
    ):
        assert needed in install, needed


def test_quick_start_has_exactly_the_two_commands_ci_runs() -> None:
    """The quick start is two commands, the demo and the test command `.ci/run` runs."""
    quick = _section(README, "Quick start")
    assert "venv" in quick, "the quick start must say to make a virtual environment first"
    (block,) = [m.group(2) for m in FENCE.finditer(quick) if m.group(1) == "bash"]
    commands = [ln.split("#", 1)[0].strip() for ln in block.splitlines()]
    commands = [c for c in commands if c]
    assert sorted(commands) == ["bash scripts/test", "torch-modelstate demo"]
    assert re.search(r"^step .*bash scripts/test$", (ROOT / ".ci/run").read_text(), re.M)


def test_contents_lists_every_section_in_order() -> None:
    """The table of contents links each `##` section, in the order they appear."""
    prose = _prose(README.read_text())
    sections = [h for h in re.findall(r"^## (.+)$", prose, re.M) if h != "Contents"]
    contents = _section(README, "Contents")
    listed = re.findall(r"^- \[([^\]]+)\]\(#([^)]+)\)", contents, re.M)
    assert [title for title, _ in listed] == sections
    for title, anchor in listed:
        expected = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        assert anchor == expected, (title, anchor, expected)


def test_links_to_files_exist_and_notebooks_are_linked() -> None:
    """Every relative link points at a file of the tree, and each notebook is linked."""
    targets = re.findall(r"\]\(([^)\s]+)\)", _prose(README.read_text()))
    relative = [t.split("#", 1)[0] for t in targets if not re.match(r"https?://|#|mailto:", t)]
    missing = [t for t in relative if not (ROOT / t).exists()]
    assert missing == []
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{notebook.name}" in relative, notebook.name


def test_no_internal_jargon() -> None:
    """Words only the team knows (its internal notes) do not appear on user-facing pages."""
    for page in PAGES:
        text = page.read_text()
        for word in ("ANCHORS", "DESIGN.md", "STYLE.md", "/work/", "/tmp/team"):
            assert word not in text, f"{page.name} mentions {word!r}"


def test_concepts_section_explains_the_four_ideas() -> None:
    """The Concepts section covers views, frozen buffers, the two kinds of tie and checkpoints."""
    concepts = _section(README, "Concepts").lower()
    for idea in (
        "live view",
        "standalone",
        "frozen",
        "buffer",
        "identity",
        "transform",
        "checkpoint",
    ):
        assert idea in concepts, idea


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_script_runs_without_a_warning(script: Path, tmp_path: Path) -> None:
    """Each script in examples/ runs (warnings are errors); the quickstart prints the tour's
    summary."""
    done = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    if script.name == "quickstart.py":
        (tour,) = [b for b in ALL if b.page == README and b.heading == "Thirty seconds"]
        assert tour.output is not None
        assert done.stdout.strip() == tour.output.strip()


def test_api_at_a_glance_names_every_public_name() -> None:
    """The overview names each public name and each public method of ModelState."""
    glance = _section(README, "The API at a glance")
    names = [n for n in tms.__all__ if n != "MaskLike"]  # a type alias, not something to call
    # ModelState's methods live on it and on its mixins (views, freezing, tying): walk the MRO.
    owners = [k for k in ModelState.__mro__ if k is not object]
    names += sorted({f".{n}" for k in owners for n in vars(k) if not n.startswith("_")})
    missing = [n for n in names if n not in glance]
    assert missing == [], f"not in 'The API at a glance': {missing}"
