"""Progress reports that read well both on a terminal and in a SLURM log file.

On a terminal (``stream.isatty()``) :func:`progress` is a tqdm bar. Anywhere else (a SLURM ``sout/``
file, a pipe) it writes a plain line at most once every ``interval`` seconds (default 60, or the
environment variable ``SSLSKY_PROGRESS_INTERVAL``) and one final line at :meth:`Progress.close`::

    pack (rank 0 of 4): 1200/5000 cutout (24%), 35.2 cutout/s, elapsed 0:00:34, ETA 0:01:48
    pack (rank 0 of 4): done 5000 cutout in 0:02:22, 35.2 cutout/s

:func:`track` wraps an iterable the same way. ``enabled=False`` writes nothing. This module imports
nothing from sslsky.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Any, TextIO, TypeVar

INTERVAL_ENV = "SSLSKY_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 60.0
T = TypeVar("T")


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def _interval(interval: float | None, stream: TextIO) -> float:
    if interval is not None:
        return interval
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        return float(raw) if raw.strip() else DEFAULT_INTERVAL
    except ValueError:
        print(f"progress: ignoring {INTERVAL_ENV}={raw!r} (not a number of seconds), using {DEFAULT_INTERVAL:g}",
              file=stream, flush=True)
        return DEFAULT_INTERVAL


class Progress:
    """A tqdm bar on a terminal, a line every ``interval`` seconds elsewhere; see :func:`progress`."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit, self.n, self.initial = total, desc, unit, initial, initial
        self.stream = sys.stderr if stream is None else stream
        self.enabled, self.closed = enabled, False
        self.interval, self.clock = _interval(interval, self.stream), clock
        self.postfix: dict[str, Any] = {}
        self.start = self.last = clock()
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and not self.closed and (now := self.clock()) - self.last >= self.interval:
            self.last = now
            self._write(self._line(now))

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            elapsed = self.clock() - self.start
            if self.total is None or self.n >= self.total:
                what = f"done {self.n} {self.unit} in"
            else:
                what = f"stopped at {self.n}/{self.total} {self.unit} after"
            self._write(f"{self.desc}: {what} {_duration(elapsed)}, {self._rate(elapsed)}")

    def _rate(self, elapsed: float) -> str:
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        if 0 < rate < 1:
            return f"{1 / rate:.1f} s/{self.unit}"
        return f"{rate:.1f} {self.unit}/s"

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        line = f"{self.desc}: {self.n}"
        if self.total:
            line += f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            line += f" {self.unit}"
        line += f", {self._rate(elapsed)}, elapsed {_duration(elapsed)}"
        done = self.n - self.initial
        if self.total and done > 0 and elapsed > 0:
            line += f", ETA {_duration((self.total - self.n) * elapsed / done)}"
        if self.postfix:
            line += ", " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return line

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", *, initial: int = 0, enabled: bool = True,
             stream: TextIO | None = None, interval: float | None = None,
             clock: Callable[[], float] = time.monotonic) -> Progress:
    """A progress report over ``total`` units: ``update(n)``, ``set_postfix(**kw)``, ``close()`` (or ``with``).

    ``stream`` defaults to ``sys.stderr``; ``interval`` (seconds between lines when ``stream`` is not a
    terminal) to ``$SSLSKY_PROGRESS_INTERVAL`` or 60; ``clock`` is injectable for tests.
    """
    return Progress(total, desc, unit, initial=initial, enabled=enabled, stream=stream, interval=interval, clock=clock)


def track(iterable: Iterable[T], desc: str, unit: str = "it", *, total: int | None = None, enabled: bool = True,
          stream: TextIO | None = None, interval: float | None = None,
          clock: Callable[[], float] = time.monotonic) -> Generator[T, None, None]:
    """Yield from ``iterable``, reporting progress as :func:`progress` does; ``total`` defaults to ``len()``."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with progress(total, desc, unit, enabled=enabled, stream=stream, interval=interval, clock=clock) as bar:
        for item in iterable:
            yield item
            bar.update(1)
