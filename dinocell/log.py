"""One logger setup for every step: plain lines on stderr, rank-aware (only rank 0 speaks at INFO under torchrun)."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (test capture and redirection swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always follows sys.stderr
        pass


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root 'dinocell' logger once; non-zero ranks log warnings and above only."""
    level = level or os.environ.get("DINOCELL_LOG_LEVEL", "INFO")
    if rank() != 0 and logging.getLevelName(level) == logging.INFO:
        level = "WARNING"
    root = logging.getLogger("dinocell")
    if not root.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("dinocell") else f"dinocell.{name}")
