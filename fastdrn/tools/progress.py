"""A dependency-free progress bar: one rewritten line on a terminal, periodic plain lines elsewhere."""
from __future__ import annotations

import sys
import time


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    h, r = divmod(s, 3600)
    m, s = divmod(r, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """On a terminal the bar is redrawn at most every ``min_interval`` seconds. Elsewhere (a log file)
    a line is written every ``every`` steps when that is given, else every ``interval`` seconds, so that
    a slow CPU run and a fast GPU run both give a readable log; the last step always gets a line."""

    def __init__(self, total: int, initial: int = 0, unit: str = "patch", stream=None,
                 enabled: bool = True, every: int | None = None, interval: float = 30.0,
                 min_interval: float = 0.2):
        self.total, self.step, self.unit = total, initial, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.min_interval = enabled, min_interval
        self.every = None if every is None else max(1, every)
        self.interval = interval
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.start_step = initial
        self.items = 0
        self._last = 0.0 if self.tty else self.t0
        self._width = 0

    def due(self, step: int) -> bool:
        """Whether :meth:`update` at ``step`` will print (so callers compute fields only then)."""
        if not self.enabled:
            return False
        if step >= self.total:
            return True
        if self.tty:
            return time.perf_counter() - self._last >= self.min_interval
        if self.every is not None:
            return step % self.every == 0
        return time.perf_counter() - self._last >= self.interval

    def update(self, step: int, items: int, **fields) -> None:
        """Record that ``step`` steps are done and ``items`` more samples went through; show ``fields``."""
        self.step = step
        self.items += items
        if not self.enabled:
            return
        if not self.due(step):
            return
        self._last = time.perf_counter()
        self._show(self.line(**fields))

    def line(self, **fields) -> str:
        el = time.perf_counter() - self.t0
        done = self.step - self.start_step
        rate = self.items / el if el > 0 else 0.0
        eta = (self.total - self.step) * el / done if done else 0.0
        frac = self.step / self.total if self.total else 1.0
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        return (f"[{bar}] {self.step}/{self.total} {extra} {rate:.1f} {self.unit}/s "
                f"{_fmt_time(el)}<{_fmt_time(eta)}")

    def _show(self, text: str) -> None:
        if self.tty:
            pad = " " * max(0, self._width - len(text))
            self.stream.write("\r" + text + pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the bar from its line, so that a message printed next starts a clean line."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
