"""What a release carries: license, metadata, one version, an sdist whose tests run, py.typed."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest

import torch_modelstate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel built from it, as `python -m build` makes them (no downloads)."""
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def _wheel_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = (n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(zf.read(name).decode())


def test_license_file_is_the_full_apache_2_text() -> None:
    """LICENSE holds the whole Apache License 2.0, terms and appendix included."""
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "APPENDIX: How to apply the Apache License to your work." in text
    assert len(text.splitlines()) > 200


def test_wheel_metadata_names_the_license_and_ships_its_file(dist: dict[str, Path]) -> None:
    """The wheel's metadata says Apache-2.0 (SPDX) and the LICENSE file travels with it."""
    meta = _wheel_metadata(dist["wheel"])
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    with zipfile.ZipFile(dist["wheel"]) as zf:
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in zf.namelist())


def test_version_is_defined_once_and_everyone_reports_it(dist: dict[str, Path]) -> None:
    """The wheel's version, `__version__` and `torch-modelstate --version` agree."""
    assert _wheel_metadata(dist["wheel"])["Version"] == torch_modelstate.__version__
    done = subprocess.run(
        [sys.executable, "-m", "torch_modelstate", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split()[-1] == torch_modelstate.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version\s*=\s*"', pyproject, re.M) is None, "a second, static version"


def test_project_urls_are_real_or_absent(dist: dict[str, Path]) -> None:
    """No placeholder URL reaches a package index: each one is https and names no stand-in."""
    urls = _wheel_metadata(dist["wheel"]).get_all("Project-URL") or []
    for entry in urls:
        url = entry.split(",", 1)[1].strip()
        assert url.startswith("https://"), entry
        assert not re.search(r"example\.(com|org)|your[-_]?(org|name)|TODO|XXX|<", url), entry


def test_long_description_has_only_absolute_links(dist: dict[str, Path]) -> None:
    """The page an index renders links nothing relative (it would point nowhere there)."""
    meta = _wheel_metadata(dist["wheel"])
    assert meta["Description-Content-Type"] == "text/markdown"
    body = meta.get_payload()
    assert isinstance(body, str) and "pip install torch-modelstate" in body
    targets = re.findall(r"\]\(([^)\s]+)", body) + re.findall(r'(?:href|src)="([^"]+)"', body)
    relative = [t for t in targets if not re.match(r"https?://|#", t)]
    assert relative == [], f"relative links in the long description: {relative}"


def test_sdist_carries_tests_with_their_helpers_and_the_notebooks(dist: dict[str, Path]) -> None:
    """The sdist has what its tests import (conftest, models, strategies) and the extras."""
    with tarfile.open(dist["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    needed = {
        "LICENSE",
        "README.md",
        "PYPI.md",
        "CONTRIBUTING.md",
        "pyproject.toml",
        "torch_modelstate/py.typed",
        "tests/conftest.py",
        "tests/models.py",
        "tests/strategies.py",
        "tests/test_paths.py",
        "examples/quickstart.py",
        "scripts/test",
        ".ci/run",
    }
    assert needed <= names, sorted(needed - names)
    tracked = {p.relative_to(ROOT).as_posix() for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert tracked <= names, sorted(tracked - names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_wheel_ships_py_typed_and_only_the_package(dist: dict[str, Path]) -> None:
    """The wheel has `py.typed` (type checkers use our hints) and no tests or notebooks."""
    with zipfile.ZipFile(dist["wheel"]) as zf:
        names = zf.namelist()
    assert "torch_modelstate/py.typed" in names
    top = {n.split("/", 1)[0] for n in names}
    assert all(t == "torch_modelstate" or t.endswith(".dist-info") for t in top), top
