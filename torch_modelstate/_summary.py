"""How a `ModelState` sums itself up: its repr, sizes in decimal units, constructor guidance."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_bytes", "refuse_constructor_arguments", "summary"]


def summary(total: Sequence[int], params: Sequence[int], state: Sequence[int]) -> str:
    """The repr of a ModelState from ``(elements, bytes)`` of all, trainable params, state.

    >>> print(summary((10, 40), (6, 24), (0, 0)))
    ModelState<
      Parameters: 10 (40 B)
      Trainable Parameters: 6 (24 B)
      Trainable State: 0 (0 B)
    >
    """
    return (
        "ModelState<\n"
        f"  Parameters: {total[0]} ({format_bytes(total[1])})\n"
        f"  Trainable Parameters: {params[0]} ({format_bytes(params[1])})\n"
        f"  Trainable State: {state[0]} ({format_bytes(state[1])})\n"
        ">"
    )


def refuse_constructor_arguments(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    """The `TypeError` of ``ModelState(...)`` with arguments (`ModelState.new` builds one).

    >>> refuse_constructor_arguments((1,), {})
    Traceback (most recent call last):
    ...
    TypeError: `ModelState(...)` takes no arguments: build a ModelState with `ModelState.new`...
    """
    given = type(args[0]).__name__ if args else ", ".join(f"{k}=" for k in kwargs)
    msg = (
        "`ModelState(...)` takes no arguments: build a ModelState with `ModelState.new`.\n"
        f"  got: ModelState({given})\n"
        "  fix: `ModelState.new(model)` for a live view of an nn.Module (or of a dict of "
        "tensors); `ModelState.empty()` for an empty one"
    )
    raise TypeError(msg)


def format_bytes(n: int) -> str:
    """Decimal units with two decimals: ``4840 -> '4.84 KB'``.

    >>> format_bytes(999), format_bytes(4840), format_bytes(3 * 10**15)
    ('999 B', '4.84 KB', '3000.00 TB')
    """
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if round(value, 2) < 1000 or unit == "TB":
            return f"{value:.2f} {unit}"
    raise AssertionError  # unreachable
