"""Values that alias destinations: update and merge read every value before writing any.

``state_dict()`` values, ``.detach()`` and ``.data`` share storage with the parameters but
are neither the same objects nor views to torch; they were once read after being written.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from torch_modelstate import ModelState, _memory, merges


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


# ------------------------------------------------------------ memory torch did not allocate


def test_aliases_over_memory_torch_did_not_allocate_are_found_by_bytes() -> None:
    """A DLPack or frombuffer tensor has a storage of its own that may start inside another's
    memory: aliases are then found by byte ranges, not by equal start pointers."""
    w = torch.arange(8.0)
    inside = torch.from_dlpack(w[2:5])
    assert inside.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
    assert _memory.shared([w], [inside, torch.ones(3)]) == [[0], []]
    assert _memory.shared([torch.from_dlpack(w[:4])], [torch.from_dlpack(w[4:])]) is None
    raw = bytearray(32)
    a, b = torch.frombuffer(raw, dtype=torch.float32), torch.frombuffer(raw, dtype=torch.float32)
    assert _memory.shared([a[:4]], [b[4:]]) == [[0]]  # same buffer: one storage each, shared


def test_merge_swaps_dlpack_aliases_inside_one_buffer() -> None:
    """Packed, the weights live in one buffer, and a DLPack alias of one past the first
    starts inside it: merge(replace) from {"b": dlpack(c), "c": dlpack(b)} still reads
    both before writing either."""
    m = two()
    m.c = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.c.weight.fill_(3.0)
    ms = ModelState.new(m).pack()
    swapped = ModelState.new(
        {
            "b.weight": torch.from_dlpack(m.c.weight.detach()),
            "c.weight": torch.from_dlpack(m.b.weight.detach()),
        }
    )
    ms.merge(swapped, merges.replace())
    assert (m.a.weight.item(), m.b.weight.item(), m.c.weight.item()) == (1.0, 3.0, 2.0)


# ------------------------------------------------------------ storage freed under a tensor


@pytest.mark.parametrize("calls", [0, 3], ids=["cold", "warm"])
def test_a_destination_whose_storage_was_freed_is_refused_by_key(calls: int) -> None:
    """``untyped_storage().resize_(0)`` (what FSDP does to unsharded parameters) leaves a
    tensor whose shape reaches past its memory: refused by key, nothing written (torch's
    own copy_ would write freed memory)."""
    m = two()
    ms = ModelState.new(m)
    for _ in range(calls):
        ms.update({"a.weight": torch.zeros(1, 1), "b.weight": torch.zeros(1, 1)})
    m.b.weight.untyped_storage().resize_(0)
    before = m.a.weight.detach().clone()
    with pytest.raises(ValueError, match=r"(?s)`b\.weight` reaches past its memory.*holds 0 bytes"):
        ms.update({"a.weight": torch.full((1, 1), 5.0), "b.weight": torch.full((1, 1), 5.0)})
    assert torch.equal(m.a.weight.detach(), before)


def test_a_value_whose_storage_shrank_is_refused_by_key() -> None:
    m = nn.Linear(3, 3, bias=False)
    weight = m.weight.detach().clone()
    value = torch.randn(3, 3)
    value.untyped_storage().resize_(16)  # 4 of its 9 floats left
    with pytest.raises(ValueError, match=r"(?s)the value for `weight` reaches past"):
        ModelState.new(m).update({"weight": value})
    assert torch.equal(m.weight.detach(), weight)


def test_extents_follow_strides_not_element_counts() -> None:
    """An expanded value (stride 0) reaches one element; a strided slice reaches past its
    element count: neither is refused while its storage holds it."""
    m = nn.Linear(3, 3, bias=False)
    ModelState.new(m).update({"weight": torch.ones(1).expand(3, 3)})
    assert torch.equal(m.weight.detach(), torch.ones(3, 3))
    wide = torch.arange(30.0).reshape(3, 10)
    ModelState.new(m).update({"weight": wide[:, 7:]})
    assert torch.equal(m.weight.detach(), wide[:, 7:])
    corner = wide[:, 7:]  # elements 7..29: 120 bytes from the storage's start
    _memory.check_extents("update", ["w"], [corner], "")
    wide.untyped_storage().resize_(4 * 28)
    with pytest.raises(ValueError, match="needs 120"):
        _memory.check_extents("update", ["w"], [corner], "")
