"""Key globs (`_globs`), split out of `_masks` to keep both modules under the size limit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from torch_modelstate import _globs, _masks
from torch_modelstate._globs import glob_to_regex, no_match_error


@pytest.mark.parametrize(
    ("glob", "key", "hit"),
    [
        ("**", "a.b.c", True),
        ("blocks.**.bias", "blocks.bias", True),
        ("blocks.**.bias", "blocks.0.attn.bias", True),
        ("blocks.*", "blocks.0.bias", False),
        ("fc.w?ight", "fc.weight", True),
        ("**.**.bias", "x.bias", True),
    ],
)
def test_glob_to_regex_matches_by_whole_segments(glob: str, key: str, hit: bool) -> None:
    """`*`/`?` stay within a segment, `**` spans any number of whole segments."""
    assert (re.fullmatch(glob_to_regex(glob), key) is not None) is hit


def test_no_match_error_is_a_key_error_with_the_fix() -> None:
    """The strict-mask error is a KeyError naming the string, the hint and the fix."""
    err = no_match_error("freeze", "fc.wieght", "\n  did you mean: fc.weight")
    assert isinstance(err, KeyError)
    assert "fc.wieght" in str(err) and "did you mean: fc.weight" in str(err) and "fix:" in str(err)


def test_mask_modules_stay_near_the_size_limit() -> None:
    """_masks.py and _globs.py are each at most ~400 lines."""
    for module in (_masks, _globs):
        assert len(Path(str(module.__file__)).read_text().splitlines()) <= 405, module.__name__
