"""Shared fixtures, the `cuda` skip and the hypothesis profiles.

Hypothesis profiles (choose with ``HYPOTHESIS_PROFILE=name pytest``):

- ``ci`` (the default): few examples per law, no deadline, so the whole suite stays within a
  few minutes on a 2-core CI machine;
- ``dev``: even fewer, for a quick loop while editing;
- ``thorough``: many examples, for a run before a release or after touching the core.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, settings
from strategies import Stat
from torch import nn

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=25, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile("thorough", max_examples=500, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `cuda` when no CUDA GPU is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def mlp() -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU -> Linear: parameters, float state and an int counter."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


@pytest.fixture
def nested() -> nn.ModuleDict:
    """A tree of every container kind, keys with digits, and a custom module with buffers."""
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "encoder": nn.ModuleList(
                [nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)) for _ in range(2)]
            ),
            "heads": nn.ModuleDict({"cls": nn.Linear(2, 3), "reg1": nn.Linear(2, 1, bias=False)}),
            "stat": Stat(2),
        }
    )


@pytest.fixture
def stat() -> Stat:
    """A custom module whose forward updates persistent and non-persistent buffers."""
    return Stat(3)


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group (file:// rendezvous, no ports), destroyed afterwards."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
