"""Param groups and gradual unfreezing over FSDP2 models on 2 CPU ranks (gloo), one spawn.

The checks live in `_optim_dist_checks.py`; each becomes its own test here, passing when it
passed on every rank. Select with ``-m distributed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _optim_dist_checks
import pytest
from _dist_harness import check_names, run_selected

pytestmark = pytest.mark.distributed

NAMES = check_names(_optim_dist_checks)


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Every selected check of this module, run once on 2 ranks."""
    return run_selected(request, _optim_dist_checks, Path(tmp_path_factory.mktemp("dist")))


@pytest.mark.parametrize("name", NAMES, ids=[n.removeprefix("check_") for n in NAMES])
def test_check(results: dict[str, list[dict[str, Any]]], name: str) -> None:
    """The check passed on every rank (see its docstring in `_optim_dist_checks`)."""
    failures = [r["error"] for r in results[name] if not r["ok"]]
    assert not failures, "\n".join(failures)
