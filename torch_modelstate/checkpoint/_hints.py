"""Mismatch messages that say what would fix the load: a rename, a re-tie, or strict=False.

A hint is given only where it helps: `rename=` when the keys differ by a prefix (wrappers
such as ``torch.compile`` add ``_orig_mod.``, DDP ``module.``, a Lightning module ``model.``),
a re-tie when the target split a tie that the file stores once (``to_empty`` and
``load_state_dict(assign=True)`` make a tied tensor two), and ``strict=False`` only when it
would load at least one key and no tie would be left as uninitialised memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from torch_modelstate._index import Index
from torch_modelstate.checkpoint._rename import prefix_fix


def some(keys: Sequence[str], n: int = 5) -> str:
    """The first `n` keys, and how many more."""
    shown = ", ".join(keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def declared_ties(module: nn.Module | None) -> dict[str, str]:
    """Ties a model declares, ``{dest: source}`` (transformers' ``all_tied_weights_keys``)."""
    declared = getattr(module, "all_tied_weights_keys", None) if module is not None else None
    if not isinstance(declared, Mapping):
        return {}
    return {d: s for d, s in declared.items() if isinstance(d, str) and isinstance(s, str)}


def broken_ties(
    module: nn.Module | None, index: Index, missing: Sequence[str], stored: Mapping[str, object]
) -> list[tuple[str, str]]:
    """``(destination, source)`` of declared ties the target split and the file stores once."""
    gone = set(missing)
    found: list[tuple[str, str]] = []
    for dest, source in declared_ties(module).items():
        d, s = index.by_key.get(dest), index.by_key.get(source)
        if dest in gone and source in stored and d is not None and s is not None and d is not s:
            found.append((dest, source))
    return found


def broken_ties_message(file: Path, broken: Sequence[tuple[str, str]]) -> str:
    dests = ", ".join(f"`{d}`" for d, _ in broken)
    retie = "; ".join(f"ms.tie({d!r}, {s!r})".replace("'", '"') for d, s in broken)
    return (
        f"{file}: the file stores {dests} once, under {', '.join(f'`{s}`' for _, s in broken)}, "
        "because the model ties them; in the target they are separate tensors now "
        "(to_empty() and load_state_dict(assign=True) split ties), and loading would leave "
        f"{dests} uninitialised.\n"
        f"  fix: re-tie before loading: ms = ModelState.new(model); {retie}"
    )


def keys_message(
    file: Path,
    missing: Sequence[str],
    unexpected: Sequence[str],
    shared: int,
    file_keys: Sequence[str],
    target_keys: Sequence[str],
) -> str:
    """The strict mismatch: what differs, and the fix that would load something useful."""
    msg = (
        f"{file}: the checkpoint's keys do not match the target "
        f"({len(missing)} missing from the file, {len(unexpected)} not in the target).\n"
        + (f"  missing from the file: {some(missing)}\n" if missing else "")
        + (f"  not in the target: {some(unexpected)}\n" if unexpected else "")
    )
    fix = prefix_fix(file_keys, target_keys)
    if fix is not None:
        text, matched = fix
        return msg + (
            f"  the keys differ by a prefix; this matches {matched} of the file's "
            f"{len(file_keys)} keys to the target's:\n"
            f"  fix: pass {text}"
        )
    if shared == 0:
        return msg + (
            "  the file and the target have no key in common: this checkpoint was saved from "
            "another model.\n"
            "  fix: load into the model it was saved from, or map its keys with rename="
        )
    return msg + (
        "  fix: load into the model the checkpoint was saved from, or pass strict=False to "
        f"load the {shared} keys both have (the target's other keys keep their values)"
    )
