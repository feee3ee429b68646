"""What a demo run measured and checked, and the printed report of its checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Check", "Report", "all_equal", "clones", "count", "print_checks", "say"]


class Check(NamedTuple):
    """One check: what it shows, whether it passed, and the figures behind it."""

    what: str
    passed: bool
    detail: str


@dataclass
class Report:
    """What a run measured, for the printed report and for tests."""

    losses: dict[str, float] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    checkpoint_bytes: int = 0

    def check(self, what: str, passed: bool, detail: str = "") -> bool:
        self.checks.append(Check(what, bool(passed), detail))
        return bool(passed)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)


def say(text: str = "") -> None:
    """Print a line of the report to stdout now (the progress bars go to stderr)."""
    print(text, flush=True)


def count(tensors: Mapping[str, Tensor]) -> str:
    """``'1,234 in 5 tensors'``: elements and tensors of a group."""
    n = len(tensors)
    return f"{sum(t.numel() for t in tensors.values()):,} in {n} tensor{'' if n == 1 else 's'}"


def clones(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached copies, to compare with later."""
    return {key: t.detach().clone() for key, t in tensors.items()}


def all_equal(tensors: Mapping[str, Tensor], before: Mapping[str, Tensor]) -> bool:
    """The same keys with equal values."""
    return tensors.keys() == before.keys() and all(
        torch.equal(t, before[key]) for key, t in tensors.items()
    )


def print_checks(report: Report, seconds: float) -> None:
    """The PASS/FAIL line of every check, then the verdict."""
    say()
    say("Checks")
    for check in report.checks:
        detail = f" ({check.detail})" if check.detail else ""
        say(f"  {'PASS' if check.passed else 'FAIL'}  {check.what}{detail}")
    failed = [check.what for check in report.checks if not check.passed]
    if failed:
        say(f"{len(failed)} of {len(report.checks)} checks FAILED in {seconds:.1f} s:")
        for what in failed:
            say(f"  {what}")
    else:
        say(f"All {len(report.checks)} checks passed in {seconds:.1f} s")
