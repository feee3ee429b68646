"""One progress bar for the command line (``merge``) and the demo's training loops.

On a terminal the bar is redrawn in place (``\\r``), at most ten times a second, with the
elapsed time and an estimate of the time left. On anything else (a log file, CI, a pipe)
it writes whole lines at a quarter, half, three quarters and the end — a few lines per
bar instead of hundreds.

>>> import io
>>> log = io.StringIO()
>>> bar = ProgressBar("merge", stream=log, unit="bytes")
>>> for done in range(0, 4001, 500):
...     bar(done, 4000)
>>> bar.close()
>>> len(log.getvalue().splitlines())
4
>>> log.getvalue().splitlines()[-1].startswith("merge [" + "#" * 30 + "] 100%")
True
"""

from __future__ import annotations

import sys
import time
from typing import Literal, TextIO

from torch_modelstate._state import format_bytes

__all__ = ["ProgressBar", "format_duration"]

Unit = Literal["bytes", "steps"]
_REDRAW_SECONDS = 0.1  # at most ten redraws a second on a terminal
_LOG_STEPS = 4  # lines written off a terminal: at 25%, 50%, 75% and 100%


def format_duration(seconds: float) -> str:
    """``'4.2 s'`` below a minute, ``'3:07'`` (minutes:seconds) up to an hour, then ``'1:02:03'``.

    >>> format_duration(4.25), format_duration(187), format_duration(3723)
    ('4.2 s', '3:07', '1:02:03')
    """
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """A one-line progress bar on stderr with the elapsed time and an ETA.

    Call it as ``bar(done, total)`` (the ``progress`` callback of ``merge``), or
    ``bar.update(done, note=...)`` when `total` was given up front; `note` is shown after
    the bar (the demo's smoothed loss). `unit` says how `done` and `total` are shown:
    ``"bytes"`` as sizes (``1.20 MB / 4.00 MB``), ``"steps"`` as counts (``120/300``).
    `close` ends the line on a terminal; it is safe to call twice.
    """

    def __init__(
        self,
        label: str,
        total: int = 0,
        *,
        unit: Unit = "steps",
        stream: TextIO | None = None,
        width: int = 30,
    ) -> None:
        self.label = label
        self.total = total
        self.unit: Unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False
        self.start = time.perf_counter()
        self._done = 0
        self._note = ""
        self._last_draw = -float("inf")
        self._logged_step = 0
        self._open_line = False  # a terminal line drawn and not ended yet
        self._drawn_len = 0
        self._closed = False

    def __call__(self, done: int, total: int) -> None:
        self.total = total
        self.update(done)

    def update(self, done: int, note: str = "") -> None:
        """Record progress `done` (of `total`) and redraw if it is time to."""
        self._done = done
        self._note = note
        finished = done >= self.total
        if self.tty:
            now = time.perf_counter()
            if finished or now - self._last_draw >= _REDRAW_SECONDS:
                self._last_draw = now
                self._redraw(end="")
            return
        step = _LOG_STEPS if self.total <= 0 else min(done * _LOG_STEPS // self.total, _LOG_STEPS)
        if step > self._logged_step:
            self._logged_step = step
            self._write(self.line(), end="\n")

    def line(self) -> str:
        """The current line: label, bar, percentage, amount, elapsed time and ETA."""
        total, done = self.total, self._done
        fraction = 1.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
        filled = round(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        if self.unit == "bytes":
            amount = f"{format_bytes(done)} / {format_bytes(total)}"
        else:
            amount = f"{done}/{total}"
        elapsed = time.perf_counter() - self.start
        if fraction >= 1.0:
            timing = format_duration(elapsed)
        elif done > 0:
            left = elapsed * (total - done) / done
            timing = f"{format_duration(elapsed)}, ETA {format_duration(left)}"
        else:
            timing = f"{format_duration(elapsed)}, ETA ?"
        note = f"  {self._note}" if self._note else ""
        return f"{self.label} [{bar}] {fraction * 100:3.0f}%  {amount}{note}  {timing}"

    def close(self) -> None:
        """End the bar's line on a terminal (drawing the final state first)."""
        if self._closed:
            return
        self._closed = True
        if self.tty and self._open_line:
            self._redraw(end="\n")

    def _redraw(self, end: str) -> None:
        # Pad to the last line's length so that a shorter line leaves no residue behind.
        line = self.line()
        self._write("\r" + line.ljust(self._drawn_len), end=end)
        self._drawn_len = 0 if end else len(line)
        self._open_line = not end

    def _write(self, text: str, end: str) -> None:
        self.stream.write(text + end)
        self.stream.flush()
