"""What discovery refuses: `DiscoveryError` for a whole input, `Exclusion` (with its reason string) for one field.

A field that cannot go into the manifest is never dropped silently: it becomes an `Exclusion` with one of the reasons
below, its source (CSV URI and row, or object key) and a detail; the summary counts them by reason
(dinocell.jump.summary). An input that discovery cannot run on at all (no CSVs, a CSV without a required column...)
raises `DiscoveryError` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

# Exclusion reasons (with "missing channel <Ch>" built per channel).
DUPLICATE = "duplicate"
CANNOT_REROOT = "cannot re-root"
ESCAPES = "path escapes the images prefix"
NO_PLATE = "no plate"
BAD_WELL = "bad well"
BAD_SITE = "bad site"
NO_BATCH = "no batch"
UNPARSABLE_NAME = "unparsable name"
STRAY_FILE = "stray file"
UNPARSABLE_PLATE_DIR = "unparsable plate folder"


def missing_channel(ch: str) -> str:
    return f"missing channel {ch}"


class DiscoveryError(ValueError):
    """Discovery cannot run on this input (no CSVs, no plate folders, a CSV without a required column...)."""


@dataclass(frozen=True)
class Exclusion:
    reason: str
    source: str  # CSV URI, plate folder or object URI
    row: int | None = None  # 1-based data row of a CSV (header not counted)
    detail: str | None = None

    def to_dict(self) -> dict:
        return {"reason": self.reason, "source": self.source, "row": self.row, "detail": self.detail}

    def where(self) -> str:
        return f"{self.source}:row {self.row}" if self.row is not None else self.source
