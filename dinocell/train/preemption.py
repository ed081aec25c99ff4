"""Preemption: SIGTERM -> checkpoint the current iteration -> exit with status 143 for the restarted pod to resume.

Kubernetes sends SIGTERM to a pod it preempts or drains (torchrun forwards it to its worker processes), then waits
the pod's grace period before SIGKILL. `SigtermFlag` (a context manager around the training loop, main thread only)
turns the signal into a flag and puts the previous handler back when training ends. The loop (dinocell.train.loop)
shares the flag with the other ranks inside the finite-check all-reduce that every iteration already makes (a MAX:
one rank's SIGTERM stops them all at the same iteration; no extra collective, no extra host sync), then, at the end
of that iteration, writes the usual full checkpoint and raises `Preempted`: a SystemExit with status 143
(128 + SIGTERM), so a PyTorchJob with restartPolicy OnFailure restarts the pod, which resumes from `latest`.
A SIGTERM is acted on at the end of the iteration whose all-reduce saw it: at most one iteration after it arrived.
"""

from __future__ import annotations

import os
import signal
import threading

from dinocell.log import get_logger

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "SigtermFlag"]

log = get_logger(__name__)

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143: what a process killed by SIGTERM reports, and a failure to restart


class Preempted(SystemExit):
    """Training stopped on SIGTERM after checkpointing `iteration`; exits the process with status 143."""

    def __init__(self, iteration: int, checkpoint: str | None):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.iteration = iteration
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return f"SIGTERM: checkpointed iteration {self.iteration} ({self.checkpoint}), exiting for restart"


class SigtermFlag:
    """`with SigtermFlag() as flag:` (or install() ... restore()): `flag.requested` turns True once SIGTERM arrived.

    Installed only from the main thread (Python's rule for signal handlers; elsewhere SIGTERM keeps its handler and
    the flag stays False). A process forked while it is installed (a DataLoader worker) does not inherit the flag:
    there the handler restores the default action and re-raises the signal, so the worker ends as it would have.
    """

    def __init__(self):
        self.requested = False
        self.installed = False
        self._previous = None
        self._pid = os.getpid()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child: behave as if no handler had been installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True  # nothing else here: no logging, no I/O inside a signal handler

    def install(self) -> None:
        if self.installed:
            return
        if threading.current_thread() is not threading.main_thread():
            log.info("training outside the main thread: no SIGTERM handler (no checkpoint on preemption)")
            return
        self._pid = os.getpid()
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self.installed = True

    def restore(self) -> None:
        """Put the handler that was there before `install()` back."""
        if self.installed:
            # None: the previous handler was not set from Python; the default action is the closest equivalent
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self.installed = False

    def __enter__(self) -> SigtermFlag:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
