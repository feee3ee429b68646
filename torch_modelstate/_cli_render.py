"""The text of ``inspect``: a summary as PyTorch tools print one, a module table, a tensor list.

Counts have thousands separators (and a short form, ``1.2M``, when they are large), sizes
decimal units; parameters are counted apart from state (buffers), and the total of both
is the figure Axon's summary shows.
"""

from __future__ import annotations

from typing import Any, TextIO

from torch_modelstate._state import format_bytes

__all__ = ["count", "plural", "render_inspect", "render_tensors", "short_count"]


def plural(n: int, word: str) -> str:
    """``'1 tensor'``, ``'2 tensors'``, with thousands separators.

    >>> plural(1, "tensor"), plural(12345, "element")
    ('1 tensor', '12,345 elements')
    """
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def short_count(n: int) -> str:
    """``1.2K``, ``3.4M``, ``7.0B`` (as model cards write parameter counts).

    >>> short_count(999), short_count(124_439_808), short_count(6_738_415_616)
    ('999', '124.4M', '6.7B')
    """
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def count(n: int, nbytes: int) -> str:
    """``'156,544 (156.5K, 626.18 KB)'``; small counts without the short form.

    >>> count(22, 88), count(156_544, 626_176)
    ('22 (88 B)', '156,544 (156.5K, 626.18 KB)')
    """
    short = f"{short_count(n)}, " if n >= 10_000 else ""
    return f"{n:,} ({short}{format_bytes(nbytes)})"


def _origin(info: dict[str, Any]) -> str:
    files, shard = info["files"], info["shard"]
    writer = (
        f"written by torch_modelstate (metadata v{info['torch_modelstate']})"
        if info["torch_modelstate"]
        else "written by another tool (no torch_modelstate metadata)"
    )
    if shard is not None:
        where = f" ({shard['number']} of {shard['of']})" if shard["number"] else ""
        index = (
            f"listed by {shard['index']}"
            if shard["index"]
            else "with no index beside it: frozen flags and state keys are not known"
        )
        return (
            f"  one shard{where} of a sharded checkpoint, {writer}; {index}\n"
            "  shown as a file: its own tensors only (inspect the directory for the whole "
            "checkpoint)"
        )
    if info["index"]:
        return f"  a sharded checkpoint: an index and {plural(len(files), 'shard')}, {writer}"
    return f"  one safetensors file, {writer}"


def render_inspect(out: TextIO, info: dict[str, Any], depth: int | None = None) -> None:
    """The summary and the module table (down to `depth`) of `describe`'s `info`."""
    total, params, state = info["total"], info["parameters"], info["state"]
    out.write(f"{info['path']}\n{_origin(info)}\n\n")
    summary: list[tuple[str, int, int, str]] = []
    if info["frozen_known"]:
        summary += [
            ("Parameters:", params["elements"], params["bytes"], ""),
            ("  trainable", params["trainable_elements"], params["trainable_bytes"], ""),
            (
                "  frozen",
                params["elements"] - params["trainable_elements"],
                params["bytes"] - params["trainable_bytes"],
                "",
            ),
            ("State (buffers):", state["elements"], state["bytes"], ""),
            ("  trainable", state["trainable_elements"], state["trainable_bytes"], ""),
            ("Total:", total["elements"], total["bytes"], ": parameters and state, as Axon counts"),
        ]
    else:
        summary.append(("Total:", total["elements"], total["bytes"], ""))
    width = max(len(f"{n:,}") for _, n, _, _ in summary)
    for label, n, nbytes, note in summary:
        number, rest = count(n, nbytes).split(" ", 1)
        out.write(f"{label:<17} {number:>{width}} {rest}{note}\n")
    if not info["frozen_known"]:
        out.write(
            "  (no record of which tensors are state or frozen: every tensor counts as a "
            "parameter)\n"
        )
    out.write(
        f"Tensors:          {total['tensors']:,} stored, {len(info['ties']):,} tied "
        "(tie destinations are stored once, as their source)\n"
    )
    dtype_parts = [
        f"{name} ({plural(d['tensors'], 'tensor')}, {plural(d['elements'], 'element')}, "
        f"{format_bytes(d['bytes'])})"
        for name, d in info["dtypes"].items()
    ]
    out.write(f"Dtypes:           {', '.join(dtype_parts) or '-'}\n\n")
    rows = [r for r in info["modules"] if depth is None or r["depth"] <= depth]
    table = [["module", "tensors", "elements", "size", "frozen", "dtype", "ties"]]
    for row in rows:
        name = (
            "(top level)"
            if not row["name"]
            else "  " * (row["depth"] - 1) + row["name"].rsplit(".", 1)[-1]
        )
        table.append(
            [
                name,
                f"{row['tensors']:,}",
                f"{row['elements']:,}",
                format_bytes(row["bytes"]),
                _frozen_word(row["frozen_tensors"], row["tensors"]),
                ", ".join(row["dtypes"]) or "-",
                ", ".join(_tie_text(attr, tie) for attr, tie in row["ties"].items()),
            ]
        )
    _write_table(out, table, right={1, 2, 3})


def render_tensors(out: TextIO, info: dict[str, Any]) -> None:
    """Every tensor, in the file's key order: key, shape, dtype, kind, frozen; then ties."""
    table = [["key", "shape", "dtype", "kind", "frozen", "size"]]
    for t in info["tensors"]:
        frozen = "?" if t["frozen"] is None else ("yes" if t["frozen"] else "no")
        shape = "[" + ", ".join(map(str, t["shape"])) + "]"
        table.append([t["key"], shape, t["dtype"], t["kind"], frozen, format_bytes(t["bytes"])])
    _write_table(out, table, right={5})
    for dest, tie in info["ties"].items():
        out.write(f"{_tie_text(dest, tie)}  (tied: stored once, as its source)\n")


def _frozen_word(frozen: int | None, n: int) -> str:
    if frozen is None or n == 0:
        return "?" if frozen is None else "-"
    if frozen == 0:
        return "no"
    return "yes" if frozen == n else f"{frozen}/{n}"


def _tie_text(attr: str, tie: dict[str, Any]) -> str:
    source = tie["source"] if tie["transform"] is None else f"{tie['transform']}({tie['source']})"
    return f"{attr} = {source}"


def _write_table(out: TextIO, table: list[list[str]], right: set[int]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.write("  ".join(cells).rstrip() + "\n")
