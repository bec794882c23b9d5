"""Progress bars that suit where they are shown: the one place our bars are made (PPO's loop, and the
transformers Trainer's through `rlhf.stages.hf_trainer`).

- On a terminal: tqdm's bar, drawn from the first finished step on (an error in the first step is then the
  only line on the screen), and taken off the screen when its loop stops unfinished or before an error
  line is printed (`clear_bars`).
- Anywhere else (a log file, CI): a plain line at every tenth of the steps and at least every 30 s,
  instead of tqdm's carriage-return redraws (hundreds of them in a log file).
"""

from __future__ import annotations

import os
import sys
import time
import weakref

from tqdm import tqdm

PLAIN_FRACTION = 0.1  # a plain line at every 10% of the total ...
PLAIN_SECONDS = 30.0  # ... and at least this often while steps finish
_OPEN: weakref.WeakSet = weakref.WeakSet()  # bars that may be on the screen


def interactive(stream=None) -> bool:
    """Whether `stream` (stderr by default) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class _Discard:
    """Where tqdm's own drawing goes in plain mode: its '\\r' redraws, clears and final newline."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class Progress(tqdm):
    """tqdm, shown from the first update on, and in plain lines when its stream is not a terminal."""

    def __init__(self, *args, file=None, **kwargs):
        stream = sys.stderr if file is None else file
        self._plain = None if interactive(stream) else stream
        self._printed_n, self._printed_at, self._next_n = 0, time.monotonic(), 0
        # delay > 0: tqdm draws nothing when made, only at an update (a finished step) or a close after one
        # (1 ms: a smaller delay vanishes in start_t + delay, a float of about 1.7e9 seconds)
        kwargs.setdefault("delay", 1e-3)
        super().__init__(*args, file=_Discard() if self._plain is not None else stream, **kwargs)
        self._printed_n = self.n
        self._next_n = self._mark_after(self.n)
        _OPEN.add(self)

    def _mark_after(self, n: float) -> float:
        """The next multiple of PLAIN_FRACTION of the total above n (inf without a total)."""
        if not self.total:
            return float("inf")
        step = self.total * PLAIN_FRACTION
        return (int(n / step) + 1) * step

    def display(self, msg=None, pos=None):
        if self._plain is None:
            return super().display(msg, pos)
        if msg is not None or self.n <= self._printed_n:  # a clear, or nothing new since the last line
            return True
        now = time.monotonic()
        closing = self.disable  # tqdm.close() sets it before its last display
        if closing or self.n >= self._next_n or now - self._printed_at >= PLAIN_SECONDS:
            line = self.format_meter(**{**self.format_dict, "ncols": 0})  # no bar: "ppo:  40% 4/10 [...]"
            print(line, file=self._plain, flush=True)
            self._printed_n, self._printed_at, self._next_n = self.n, now, self._mark_after(self.n)
        return True


    def close(self):
        # An unfinished bar (its loop stopped by an error, or a break) is taken off the screen, not left on it
        # with a newline: the error line printed next then stands alone. Off a terminal no last line is added.
        if self.total is not None and self.n < self.total:
            self.leave = False
        super().close()


def clear_bars() -> None:
    """Take every open bar off the screen (plain lines already written stay), so that the error line
    printed next stands alone."""
    for bar in list(_OPEN):
        bar.leave = False
        bar.close()


def plain_library_bars() -> None:
    """Off a terminal, the libraries' own bars are off too (`datasets`: TRL's tokenising passes; the hub's:
    transformers' weight loading and saving): they redraw with carriage returns and are not made here."""
    if not interactive():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
