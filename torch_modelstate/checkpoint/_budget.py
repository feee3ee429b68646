"""One byte-budget packer: consecutive groups of at most a number of bytes.

Used to stage tensors for one grouped copy (loading, saving, averaging) and to split a
save into shards. A group closes before an item that would take it past the budget; an
item larger than the budget gets a group of its own (as ``transformers`` does for shards).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

BUDGET = 64 << 20  # bytes staged per grouped copy when a tensor cannot be used in place


def pack(items: Iterable[T], nbytes: Callable[[T], int], budget: int) -> Iterator[list[T]]:
    """Consecutive groups of `items` of at most `budget` bytes each (or one larger item).

    >>> list(pack([3, 3, 5, 1, 9], lambda n: n, 6))
    [[3, 3], [5, 1], [9]]
    """
    group: list[T] = []
    used = 0
    for item in items:
        size = nbytes(item)
        if group and used + size > budget:
            yield group
            group, used = [], 0
        group.append(item)
        used += size
    if group:
        yield group
