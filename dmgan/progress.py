"""Progress of the phases that take more than a few seconds (DAMSM epochs, GAN steps, feature
extraction, generation), shown one way for all of them: :func:`progress`.

On a terminal it is a tqdm bar with the rate and an ETA. Anywhere else (a log file, a scheduler's
capture, ``nohup``) a bar would write every redraw into the log, so it is plain lines instead: one
at the start, one at each further tenth of the total (at most one per ``min_interval_s``) or after
``interval_s`` without a line, and one at the end with the elapsed time.

    >>> import io
    >>> log = io.StringIO()
    >>> with progress(range(3), desc="demo", file=log) as bar:
    ...     for _ in bar:
    ...         bar.set_postfix(loss=0.5)
    >>> print(log.getvalue(), end="")
    demo: 0/3 started
    demo: 3/3 done in 0s..., loss=0.5
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str,
    enabled: bool = True,
    initial: int = 0,
    file: IO[str] | None = None,
    interval_s: float = 120.0,
    min_interval_s: float = 10.0,
) -> tqdm | LineProgress:
    """A progress display over ``iterable`` (or updated by hand with ``update(n)``): a tqdm bar
    where ``file`` (default: stderr) is a terminal, else a :class:`LineProgress`; nothing at all
    without ``enabled`` (e.g. on ranks other than the first). Either one iterates, takes
    ``update(n)``, ``set_postfix(...)`` and ``close()``, and is a context manager. ``total``
    defaults to ``len(iterable)``; ``initial`` is where a resumed count starts."""
    total = _total(iterable, total)
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    stream = file if file is not None else sys.stderr
    if _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, initial=initial, file=stream, dynamic_ncols=True)
    return LineProgress(
        iterable,
        total=total,
        desc=desc,
        initial=initial,
        file=stream,
        interval_s=interval_s,
        min_interval_s=min_interval_s,
    )


def _total(iterable: Iterable[Any] | None, total: int | None) -> int | None:
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        return len(iterable)  # type: ignore[arg-type]
    return total


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """tqdm's interface (iteration, ``update``, ``set_postfix``, ``close``, ``with``) written as a
    few whole lines for logs: each with the count, and the elapsed time, rate and ETA so far."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str,
        initial: int = 0,
        file: IO[str] | None = None,
        interval_s: float = 120.0,
        min_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.iterable, self.total, self.desc, self.n = iterable, _total(iterable, total), desc, initial
        self.file = file if file is not None else sys.stderr
        self.interval_s, self.min_interval_s, self.clock = interval_s, min_interval_s, clock
        self.initial, self.postfix, self.closed = initial, "", False
        self.start = self.last_line = clock()
        self.last_tenth = self._tenth()
        self._write(f"{self._count()} started")

    def _tenth(self) -> int:
        return math.floor(10 * self.n / self.total) if self.total else 0

    def _count(self) -> str:
        return f"{self.n}/{self.total}" if self.total is not None else str(self.n)

    def _rate(self, elapsed: float) -> float | None:
        done = self.n - self.initial  # a resumed count's start was not done in this time
        return done / elapsed if done > 0 and elapsed > 0 else None

    def _write(self, text: str) -> None:
        print(f"{self.desc}: {text}{self.postfix}", file=self.file, flush=True)
        self.last_line = self.clock()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more; write a line when a further tenth is reached (and ``min_interval_s``
        have passed since the last line) or when ``interval_s`` have passed without one."""
        self.n += n
        now = self.clock()
        tenth, since = self._tenth(), now - self.last_line
        if self.total is not None and self.n >= self.total:
            return  # the end line says it, with the total time
        if (tenth > self.last_tenth and since >= self.min_interval_s) or since >= self.interval_s:
            self.last_tenth = tenth
            elapsed, rate = now - self.start, self._rate(now - self.start)
            text = f"{self._count()}"
            if self.total:
                text += f" ({100 * self.n // self.total}%)"
            text += f", {_duration(elapsed)} elapsed"
            if self.total and rate:
                text += f", ETA {_duration(max(self.total - self.n, 0) / rate)}"
            self._write(text + _rate_text(rate))

    def set_postfix(
        self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any
    ) -> None:
        """Values shown at the end of the next line (as tqdm shows them beside the bar)."""
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = "".join(
            f", {k}={v:.4g}" if isinstance(v, float) else f", {k}={v}" for k, v in values.items()
        )

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        """The last line: done, or where it stopped (a stop request, an error); once."""
        if self.closed:
            return
        self.closed = True
        elapsed = self.clock() - self.start
        finished = self.total is None or self.n >= self.total
        where = f"done in {_duration(elapsed)}" if finished else f"stopped after {_duration(elapsed)}"
        self._write(f"{self._count()} {where}{_rate_text(self._rate(elapsed))}")

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress has no iterable: count with update(n)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)  # after the body, as tqdm counts
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rate_text(rate: float | None) -> str:
    if rate is None:
        return ""
    return f", {rate:.3g} it/s" if rate >= 1 else f", {1 / rate:.3g} s/it"


def _duration(seconds: float) -> str:
    """``45s``, ``12m05s``, ``3h02m``, ``2d03h``: short and unambiguous in a log line."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
