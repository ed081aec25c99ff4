"""Progress of a long step (discover, shard, pretrain, evaluate): a tqdm bar on a terminal, a status line elsewhere.

`Progress(desc, total)` is a context manager with a thread-safe `update(n)`; `track(iterable, desc)` wraps an iterable
and `Progress.counted(fn)` wraps a function (each call that returns counts one unit: for `storage.map_parallel` or a
pool whose results arrive in the parent).

Where it goes (the mode):
- "bar": a tqdm bar on the stream (stderr by default);
- "log": on pods, CI and log files a bar's carriage returns make the log unreadable, so instead one line through the
  dinocell logger at most every `every` seconds (done/total, percent, rate, ETA, elapsed), and a final line on close;
- "off": nothing (the counts are still kept);
- "auto" (the default): "bar" when the stream is a terminal, else "log". True means "bar", False "off" (the values of
  `train.progress`).
Only rank 0 reports under torchrun (`RANK`), unless `rank0_only=False`.

The environment wins over the caller's arguments, so an operator can change a running deployment without touching
configs: `DINOCELL_PROGRESS` = 0 / off / false / no (nothing), 1 / on / true / yes / auto, bar or log;
`DINOCELL_PROGRESS_EVERY` = seconds between status lines (default 30). A total of None (unknown) gives no percent
and no ETA.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from dinocell.log import get_logger, rank

__all__ = ["ENV_EVERY", "ENV_MODE", "Progress", "format_duration", "resolve_every", "resolve_mode", "track"]

ENV_MODE = "DINOCELL_PROGRESS"
ENV_EVERY = "DINOCELL_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0

_ALIASES = {
    "0": "off", "off": "off", "false": "off", "no": "off", "none": "off",
    "1": "auto", "on": "auto", "true": "auto", "yes": "auto", "auto": "auto",
    "bar": "bar", "tqdm": "bar", "log": "log", "lines": "log",
}

T = TypeVar("T")


def resolve_mode(mode: str | bool | None = "auto", stream=None, rank0_only: bool = True) -> str:
    """"bar", "log" or "off": $DINOCELL_PROGRESS over `mode`; "auto" looks at the stream; non-zero ranks: "off"."""
    env = os.environ.get(ENV_MODE, "").strip().lower()
    if env:
        if env not in _ALIASES:
            raise ValueError(f"{ENV_MODE}={env!r} is not one of {sorted(_ALIASES)}")
        chosen = _ALIASES[env]
    elif mode is None or mode is True or mode is False:
        chosen = {None: "auto", True: "bar", False: "off"}[mode]
    elif isinstance(mode, str) and mode.strip().lower() in _ALIASES:
        chosen = _ALIASES[mode.strip().lower()]
    else:
        raise ValueError(f"progress mode must be auto, bar, log, off, True or False, got {mode!r}")
    if chosen == "off" or (rank0_only and rank() != 0):
        return "off"
    if chosen == "auto":
        stream = sys.stderr if stream is None else stream
        isatty = getattr(stream, "isatty", None)
        chosen = "bar" if callable(isatty) and isatty() else "log"
    return chosen


def resolve_every(every: float | None = None) -> float:
    """Seconds between status lines: $DINOCELL_PROGRESS_EVERY over `every`, default 30."""
    env = os.environ.get(ENV_EVERY, "").strip()
    where = ENV_EVERY if env else "progress every"
    raw = env if env else (DEFAULT_EVERY_S if every is None else every)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}={raw!r} must be a finite number of seconds >= 0")
    return value


def format_duration(seconds: float) -> str:
    """12s, 4m05s, 3h02m (whole seconds; "?" for an unknown duration)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Progress of one step; see the module docstring. Use it as a context manager (or call close())."""

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        *,
        unit: str = "it",
        initial: int = 0,
        mode: str | bool | None = "auto",
        every: float | None = None,
        rank0_only: bool = True,
        stream=None,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ):
        if total is not None and total < 0:
            raise ValueError(f"Progress({desc!r}): total must be >= 0 or None, got {total}")
        self.desc = desc
        self.total = None if total is None else int(total)
        self.unit = unit
        self.initial = self.done = int(initial)
        self.mode = resolve_mode(mode, stream, rank0_only)
        self.every = resolve_every(every)
        self.lines = 0  # status lines written (log mode)
        self._clock = clock
        self._log = logger or get_logger("progress")
        self._lock = threading.Lock()
        self._postfix: dict[str, object] = {}
        self._closed = False
        self._t0 = self._last = clock()
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=unit, dynamic_ncols=True,
                             file=sys.stderr if stream is None else stream)

    # ------------------------------------------------------------------ counting
    def update(self, n: int = 1) -> None:
        """Count n more units done (safe from any thread)."""
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            elif self.mode == "log" and not self._closed:
                now = self._clock()
                if now - self._last >= self.every:
                    self._emit(now)

    def set_postfix(self, **values) -> None:
        """Values shown after the counts (e.g. loss=0.123), on the bar or in the next status line."""
        with self._lock:
            self._postfix.update(values)
            if self._bar is not None:
                self._bar.set_postfix({k: str(v) for k, v in self._postfix.items()}, refresh=False)

    def counted(self, fn: Callable[..., T]) -> Callable[..., T]:
        """fn, counting one unit each time a call returns (a call that raises is not counted as done)."""

        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.update(1)
            return out

        return wrapper

    def iter(self, iterable: Iterable[T]) -> Iterator[T]:
        """The items of iterable, one unit each once the consumer comes back for the next one."""
        for item in iterable:
            yield item
            self.update(1)

    # ------------------------------------------------------------------ the status line
    def status(self, now: float | None = None, state: str = "") -> str:
        """The status line: 'desc: [state, ]37/120 shards (30.8%), 0.52 shards/s, ETA 2m40s, elapsed 1m11s'."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._t0, 0.0)
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        if self.total is not None:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            parts = [f"{self.done}/{self.total} {self.unit} ({pct:.1f}%)"]
        else:
            parts = [f"{self.done} {self.unit}"]
        if state:
            parts.insert(0, state)
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total is not None and self.done < self.total:
            parts.append("ETA " + (format_duration((self.total - self.done) / rate) if rate > 0 else "?"))
        parts.append(f"elapsed {format_duration(elapsed)}")
        line = f"{self.desc}: " + ", ".join(parts)
        if self._postfix:
            line += "  " + " ".join(f"{k}={v}" for k, v in self._postfix.items())
        return line

    def _emit(self, now: float, state: str = "") -> None:
        self._log.info("%s", self.status(now, state))
        self.lines += 1
        self._last = now

    # ------------------------------------------------------------------ the end
    def close(self, failed: bool = False) -> None:
        """Close the bar, or write the final status line ('stopped' when short of the total or failed)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            elif self.mode == "log":
                short = self.total is not None and self.done < self.total
                self._emit(self._clock(), "stopped" if failed or short else "done")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def track(iterable: Iterable[T], desc: str, total: int | None = None, **kwargs) -> Iterator[T]:
    """Iterate with progress: `for rec in track(records, "evaluate: fields", unit="field"): ...`.

    total defaults to len(iterable) when it has one; the final line is written when the loop ends or is left.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    progress = Progress(desc, total, **kwargs)
    try:
        yield from progress.iter(iterable)
    except (Exception, KeyboardInterrupt):  # not GeneratorExit: a consumer leaving the loop early is no failure
        progress.close(failed=True)
        raise
    finally:
        progress.close()
