"""Key globs and strictness: the string side of masks (`torch_modelstate._masks`).

A glob names keys by dotted segments: ``*`` and ``?`` match within one segment, ``**`` any
number of whole segments. `glob_to_regex` translates one into a group-free, flag-free regex
(so any number of them join into one alternation); `no_match_error` words the error of a
strict mask whose string matches no key.
"""

from __future__ import annotations

import re

from torch_modelstate._errors import KeyNotFoundError

__all__ = ["glob_to_regex", "no_match_error"]


def no_match_error(verb: str, text: str, hint: str) -> KeyNotFoundError:
    """The `KeyError` of a strict mask whose string `text` matches no key (`hint`: a
    "did you mean" line, or "").

    >>> no_match_error("freeze", "fc.wieght", "").args[0].splitlines()[0][:40]
    "freeze: the mask 'fc.wieght' matches no "
    """
    msg = (
        f"{verb}: the mask {text!r} matches no key of the model; every key or glob "
        f"in a strict mask must match at least one key.{hint}\n"
        "  fix: correct the key or glob, or pass strict=False to allow strings that "
        "match nothing"
    )
    return KeyNotFoundError(msg)


def glob_to_regex(glob: str) -> str:
    """Translate a key glob: ``*``/``?`` stay in one segment, ``**`` spans whole segments.

    >>> import re
    >>> bool(re.fullmatch(glob_to_regex("blocks.**.bias"), "blocks.0.attn.bias"))
    True
    >>> bool(re.fullmatch(glob_to_regex("blocks.*"), "blocks.0.bias"))
    False
    """
    if not glob:
        msg = "A glob mask must not be empty.\n  fix: use None to select every leaf"
        raise ValueError(msg)
    segments = glob.split(".")
    # `**.**` means the same as `**`; collapsing keeps the translation below simple.
    segments = [
        s for i, s in enumerate(segments) if not (s == "**" and i and segments[i - 1] == "**")
    ]
    out = ""
    for i, segment in enumerate(segments):
        if segment == "**":
            if len(segments) == 1:
                return r"[^.]+(?:\.[^.]+)*"
            # Zero or more whole segments, with the dots that join them.
            out += r"(?:[^.]+\.)*" if i == 0 else r"(?:\.[^.]+)*"
            continue
        if not segment:
            msg = f"Glob {glob!r} has an empty segment.\n  fix: separate segments by single dots"
            raise ValueError(msg)
        if "**" in segment:
            msg = (
                f"Glob {glob!r}: `**` must be a whole segment, as in 'blocks.**.bias'.\n"
                f"  got: the segment {segment!r}\n"
                "  fix: use `*` to match within a segment"
            )
            raise ValueError(msg)
        if i > 0 and not (i == 1 and segments[0] == "**"):
            out += r"\."
        out += "".join(
            "[^.]*" if ch == "*" else "[^.]" if ch == "?" else re.escape(ch) for ch in segment
        )
    return out
