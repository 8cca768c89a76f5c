"""Progress on stderr: the one place where the library makes progress bars.

Every step a person waits for (more than a couple of seconds) shows progress, one way:
    stderr a terminal      tqdm's bar, redrawn in place
    stderr a file or pipe  plain lines: one when the step starts, then at most one every
                           LINE_INTERVAL_S seconds, and one when it ends; each ends in a newline
                           and none holds a carriage return, so a log reads line by line
    enabled=False          nothing (the commands' --quiet)
"Only the CLI prints" has this one exception: progress goes to stderr while the library works,
because only the library knows how far it got.

    bar(iterable=None, *, desc, unit, total, enabled)   a tqdm to update() or to iterate over
    stage(desc, enabled)                                 a context: the elapsed time of one long call
                                                         (a t-SNE fit, a cross-validated search) that
                                                         reports nothing while it runs
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

from tqdm import tqdm as _tqdm

LINE_INTERVAL_S = 10.0  # plain lines: at most one per this many seconds between the first and the last
TICK_S = 1.0  # stage(): how often a terminal's elapsed time is redrawn


class _Lines(_tqdm):
    """tqdm for a stderr that is not a terminal: whole lines, never a carriage return."""

    def __init__(self, *args, **kwargs):
        self._line_at = None  # monotonic time of the last line written
        kwargs.update(leave=False, mininterval=LINE_INTERVAL_S, dynamic_ncols=False, ncols=None, ascii=True)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clears its line before a close or a write: there is no line to clear
            return False
        now = time.monotonic()
        if self._line_at is not None and now - self._line_at < LINE_INTERVAL_S:
            return True
        self._line(now)
        return True

    def _line(self, now: float) -> None:
        self._line_at = now
        self.fp.write(f"{self}\n")
        self.fp.flush()

    def clear(self, nolock=False):
        pass  # nothing to clear: each line is written whole

    def close(self):
        if not self.disable and hasattr(self, "last_print_t"):
            self._ema_dt = lambda: None  # the final line shows the overall rate, as tqdm's own does
            self._line(time.monotonic())
        super().close()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def bar(iterable=None, *, desc: str, unit: str = "it", total: int | None = None, enabled: bool = True, **kwargs):
    """A progress bar on stderr (see the module's docstring); iterate over it or call update(n)."""
    stream = sys.stderr  # looked up now: a test or a caller may have replaced it
    if _is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, unit=unit, total=total, disable=not enabled, file=stream,
                    dynamic_ncols=True, **kwargs)
    return _Lines(iterable, desc=desc, unit=unit, total=total, disable=not enabled, file=stream, **kwargs)


@contextlib.contextmanager
def stage(desc: str, enabled: bool = True):
    """The elapsed time of one long call that reports nothing while it runs: `desc 00:12`, redrawn
    every TICK_S on a terminal, a plain line every LINE_INTERVAL_S otherwise, the total at the end."""
    shown = bar(desc=desc, enabled=enabled, bar_format="{desc}: {elapsed}")
    done = threading.Event()

    def tick():
        while not done.wait(TICK_S):
            shown.refresh()

    ticker = threading.Thread(target=tick, daemon=True, name="embedder-progress")
    if enabled:
        ticker.start()
    try:
        yield shown
    finally:
        done.set()
        if enabled:
            ticker.join()
        shown.close()
