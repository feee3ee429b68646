"""Destinations in read-only memory: update and merge refuse them before any write.

Writing into a ``torch.frombuffer`` view of an ``mmap`` opened with ``ACCESS_READ`` once
killed the process (SIGSEGV). Each case runs in a subprocess, so a regression cannot take
pytest down with it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from torch_modelstate._writable import check_destinations

SCRIPT = textwrap.dedent(
    """
    import mmap, sys, tempfile
    import torch
    from torch import nn
    from torch_modelstate import ModelState, merges

    with tempfile.TemporaryFile() as f:
        f.write(torch.arange(4, dtype=torch.float32).numpy().tobytes())
        f.flush()
        mm = mmap.mmap(f.fileno(), 16, access=mmap.ACCESS_READ)
        m = nn.Module()
        m.register_buffer("a", torch.zeros(4))
        m.register_buffer("b", torch.frombuffer(mm, dtype=torch.float32))
        ms = ModelState.new(m)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        ones = {"a": torch.ones(4), "b": torch.ones(4)}
        if sys.argv[1] == "update":
            call = lambda: ms.update(ones)
        else:
            call = lambda: ms.merge(ones, merges.lerp(0.5))
        try:
            call()
        except ValueError as err:
            assert "`b`" in str(err) and "read-only" in str(err) and "fix:" in str(err), err
            assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
            print("refused")
        else:
            print("wrote")
    """
)


@pytest.mark.parametrize("verb", ["update", "merge"])
def test_update_and_merge_refuse_a_read_only_memory_map(verb: str) -> None:
    """A read-only mmap destination gives a ValueError and leaves the model unchanged."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, verb], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "refused"


def test_torch_allocated_storage_skips_the_memory_map() -> None:
    """Parameters and buffers torch allocated are resizable: the /proc scan never runs."""
    model = nn.Linear(2, 2)
    tensors = [model.weight, model.bias, model.weight.data, model.bias.detach()]
    assert all(t.untyped_storage().resizable() for t in tensors)
    assert not torch.frombuffer(bytearray(8), dtype=torch.float32).untyped_storage().resizable()
    check_destinations("update", ["w", "b", "w2", "b2"], tensors)


def test_a_writable_foreign_buffer_is_accepted() -> None:
    """Memory torch did not allocate but may write (a bytearray) passes the scan."""
    t = torch.frombuffer(bytearray(8), dtype=torch.float32)
    check_destinations("update", ["t"], [t])
