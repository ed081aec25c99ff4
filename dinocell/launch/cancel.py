"""Cancellation of a running launcher: SIGTERM (KFP terminating the run's pod, the kubelet stopping it) becomes
JobCancelled, which run_job catches to delete the job it created before the process exits 143 (128 + SIGTERM)."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)


class JobCancelled(SystemExit):
    """The launcher got a termination signal; exits 128 + signal number when not caught."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def cancel_on_signals(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[bool]:
    """While inside, the first of `signals` raises JobCancelled in the main thread; a repeat is ignored so that it
    cannot interrupt the cleanup. Yields False (and installs nothing) outside the main thread, where Python cannot
    take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return

    def handler(signum, frame):  # noqa: ARG001 - the signal module's signature
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise JobCancelled(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield True
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
