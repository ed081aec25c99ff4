"""Pointer files: what a KFP artifact carries between steps (the URI of the real data in object storage).

Object storage is the only channel between steps: training pods launched as a PyTorchJob get no KFP artifact
plumbing, so each component writes its data under the run's prefix and hands on a small JSON file (and the same URI
in the artifact's metadata) naming where it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dinocell.config.step_args import StepError

__all__ = ["POINTER_FORMAT", "read_pointer", "write_pointer"]

POINTER_FORMAT = "dinocell-pointer"


def write_pointer(path: str | os.PathLike, uri: str, **info: Any) -> dict:
    """Write a small JSON file naming where the real data lives; returns the metadata to put on the artifact."""
    meta = {"uri": uri, **info}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"format": POINTER_FORMAT, **meta}, indent=1, sort_keys=True) + "\n")
    return meta


def read_pointer(metadata: Mapping | None, path: str | os.PathLike | None = None, what: str = "artifact") -> str:
    """The URI an upstream artifact points at: its metadata `uri`, else the pointer file at `path`."""
    if metadata and metadata.get("uri"):
        return str(metadata["uri"])
    if path is not None and Path(path).is_file():
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StepError(f"{what}: {path} is not a dinocell pointer file: {e}") from None
        if isinstance(data, dict) and data.get("format") == POINTER_FORMAT and data.get("uri"):
            return str(data["uri"])
        raise StepError(f"{what}: {path} holds no 'uri' (format {data.get('format') if isinstance(data, dict) else '?'})")
    raise StepError(f"{what}: no 'uri' in its metadata and no pointer file at {path}")
