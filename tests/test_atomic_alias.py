"""Values that alias destinations: update and merge read every value before writing any.

``state_dict()`` values, ``.detach()`` and ``.data`` share storage with the parameters but
are neither the same objects nor views to torch; they were once read after being written.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from torch_modelstate import ModelState, merges


def two() -> nn.Module:
    """Two 1x1 linears, a.weight = 1 and b.weight = 2."""
    m = nn.Module()
    m.a = nn.Linear(1, 1, bias=False)
    m.b = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.a.weight.fill_(1.0)
        m.b.weight.fill_(2.0)
    return m


ALIASES: dict[str, Callable[[nn.Module, str], Tensor]] = {
    "state_dict": lambda m, k: m.state_dict()[k],
    "detach": lambda m, k: m.get_parameter(k).detach(),
    "data": lambda m, k: m.get_parameter(k).data,
}


@pytest.mark.parametrize("how", sorted(ALIASES))
def test_update_swaps_weights_given_as_aliases(how: str) -> None:
    """update({"a": b, "b": a}) with aliasing values swaps: (2, 1), not (2, 2)."""
    m = two()
    ms = ModelState.new(m)
    alias = ALIASES[how]
    ms.update({"a.weight": alias(m, "b.weight"), "b.weight": alias(m, "a.weight")})
    assert (m.a.weight.item(), m.b.weight.item()) == (2.0, 1.0)


@pytest.mark.parametrize("how", sorted(ALIASES))
def test_merge_reads_aliasing_values_before_writing(how: str) -> None:
    """merge(lerp(1.0)) with swapped aliasing values swaps too."""
    m = two()
    ms = ModelState.new(m)
    alias = ALIASES[how]
    rhs = {"a.weight": alias(m, "b.weight"), "b.weight": alias(m, "a.weight")}
    ms.merge(rhs, merges.lerp(1.0))
    assert (m.a.weight.item(), m.b.weight.item()) == (2.0, 1.0)


def test_update_with_its_own_state_dict_is_a_no_op() -> None:
    """Writing each tensor's own state_dict value into it changes nothing."""
    m = two()
    ModelState.new(m).update(m.state_dict())
    assert (m.a.weight.item(), m.b.weight.item()) == (1.0, 2.0)


def test_update_with_a_transposed_view_of_itself() -> None:
    """update({"w": w.t()}) writes the transpose, not a half-overwritten mix."""
    m = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    ModelState.new(m).update({"weight": m.weight.detach().t()})
    assert torch.equal(m.weight.detach(), torch.tensor([[1.0, 3.0], [2.0, 4.0]]))
