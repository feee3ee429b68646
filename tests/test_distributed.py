"""ModelState over FSDP2 and DDP models on 2 CPU ranks (gloo), one spawn for all checks.

The checks live in `_dist_checks_state.py`; each becomes its own test here, passing when it
passed on every rank. Select with ``-m distributed``.
"""

from __future__ import annotations

from typing import Any

import _dist_checks_state
import pytest
from _dist_harness import check_names, run_selected

pytestmark = pytest.mark.distributed

CHECKS = _dist_checks_state
NAMES = check_names(CHECKS)
# Checks whose feature another engineer is landing (strict: they fail loudly once it lands).
PENDING: dict[str, str] = {}
PARAMS = [
    pytest.param(n, id=n.removeprefix("check_"), marks=[pytest.mark.xfail(reason=PENDING[n])])
    if n in PENDING
    else pytest.param(n, id=n.removeprefix("check_"))
    for n in NAMES
]


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Every selected distributed check of the session, run once on 2 ranks."""
    return run_selected(request, tmp_path_factory)


@pytest.mark.parametrize("name", PARAMS)
def test_check(results: dict[str, list[dict[str, Any]]], name: str) -> None:
    """The check passed on every rank (see its docstring in `_dist_checks_state`)."""
    failures = [r["error"] for r in results[f"{CHECKS.__name__}:{name}"] if not r["ok"]]
    assert not failures, "\n".join(failures)
