"""The on-disk format of a shard set, shared by the writer (dinocell.data.shards) and the reader (shard_reader).

Layout under the output prefix:

    <out>/shard-000000.tar    fields, WebDataset style: the files of one field share a key
    <out>/shard-000000.json   sidecar written after the tar: sha256, bytes, n_fields, skipped fields, plan fingerprint
    ...
    <out>/index.json          written last, only when every shard is complete: the reader's entry point

Inside a tar, each field is two members (in this order, 512-byte aligned as tar requires):

    <key>.json   {"field_id", "batch", "plate", "well", "site", "channels", "shape": [C, H, W], "dtype": "uint8"}
    <key>.u8     the image as raw bytes, C-contiguous uint8 [C, H, W]

`<key>` is the field's 9-digit position in the shard plan (a field_id holds '/' and may hold '.', which WebDataset
would split on). Raw bytes rather than `.npy` or PNG: the reader reads a member straight into its final buffer and wraps
it as an array with no decode and no further copy (a numpy view over the read buffer -> `torch.from_numpy`); shards are
written once and read every epoch, so decode cost is what matters, not size. The tar bytes themselves are written and
parsed by dinocell.data.shard_tar.

This module holds the names, the constants, the index (`ShardIndex`, `ShardInfo`: what `index.json` holds; a
`ShardInfo` is made from the shard's sidecar), the per-field metadata member, the skip kinds, and the naming of the
temporary files of this project's writers (`temp_prefix`, `clean_stale_temps`: a writer killed mid-write leaves its
temp file behind; the next run removes the stale ones).

Skip kinds: every skipped field records why in one of three classes. "transient": a storage error that survived the
storage layer's retries (S3 5xx, timeouts, resets, access problems): the input may be fine, so a rerun rebuilds the
shard; "missing": the object does not exist; "corrupt": the object exists but cannot be used (bad TIFF, wrong
shape, channels or dtype). Missing and corrupt inputs stay skipped on reruns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dinocell import storage
from dinocell._version import __version__
from dinocell.log import get_logger

__all__ = [
    "INDEX_NAME",
    "KEY_DIGITS",
    "SHARD_FORMAT",
    "SHARD_FORMAT_VERSION",
    "SKIP_KINDS",
    "ShardBuildError",
    "ShardIndex",
    "ShardInfo",
    "field_key",
    "field_metadata",
    "clean_stale_temps",
    "parent_uri",
    "shard_name",
    "temp_prefix",
]

_log = get_logger(__name__)

SHARD_FORMAT = "dinocell-shards"
SHARD_FORMAT_VERSION = 1
INDEX_NAME = "index.json"
KEY_DIGITS = 9
SKIP_KINDS = ("transient", "missing", "corrupt")
TEMP_GRACE_S = 6 * 3600.0  # a temp file this old is stale whoever owns it (a 256 MB shard takes minutes, not hours)


class ShardBuildError(RuntimeError):
    """Some shards could not be built; the message lists them. Finished shards are kept: rerun to resume."""


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def field_key(plan_position: int) -> str:
    """The tar key of a field: its position in the shard plan, zero-padded."""
    return f"{plan_position:0{KEY_DIGITS}d}"


def field_metadata(fld, shape: Sequence[int]) -> dict[str, Any]:
    """The `<key>.json` member of a field."""
    return {
        "field_id": fld.field_id,
        "batch": fld.batch,
        "plate": fld.plate,
        "well": fld.well,
        "site": int(fld.site),
        "channels": list(fld.channels),
        "shape": [int(x) for x in shape],
        "dtype": "uint8",
    }


def parent_uri(uri: str) -> str:
    uri = str(uri)
    if storage.is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return str(storage.local_path(uri).parent)


# --------------------------------------------------------------------------- temp files of killed writers


def temp_prefix(what: str) -> str:
    """`dinocell-<what>-<pid>-`: the prefix of a writer's temp file (tempfile.mkstemp adds a random part). The pid
    lets the next run prove that the owner is dead (`clean_stale_temps`)."""
    return f"dinocell-{what}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:  # a zombie (killed, not reaped yet) writes nothing any more
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True


def clean_stale_temps(what: str, directory: str | None = None, grace_s: float = TEMP_GRACE_S,
                      dot_pattern: str | None = None) -> int:
    """Delete the temp files of killed writers of `what` (e.g. "shard-000003", "ckpt"; a regex) and return how many.

    In `directory` (default: the temp dir): `dinocell-<what>-<pid>-*` files whose owner pid is dead, or older than
    `grace_s` (a recycled pid looks alive; age still frees the file). `dot_pattern`: a regex of hidden temp files
    without a pid (the storage layer's `.<name>.*.tmp` siblings of an atomic local write): removed when older than
    `grace_s`. Counted and logged; a file that vanishes meanwhile (its writer finished) is not an error.
    """
    root = directory or tempfile.gettempdir()
    owned = re.compile(rf"^dinocell-(?:{what})-(?P<pid>\d+)-")
    hidden = re.compile(dot_pattern) if dot_pattern else None
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0
    now, removed = time.time(), []
    for name in names:
        m = owned.match(name)
        if not m and not (hidden and hidden.match(name)):
            continue
        path = os.path.join(root, name)
        try:
            age = now - os.stat(path).st_mtime
            if age > grace_s or (m and not _pid_alive(int(m["pid"]))):
                os.unlink(path)
                removed.append(name)
        except FileNotFoundError:
            continue
        except OSError as e:  # another user's file in a shared temp dir: not ours to remove
            _log.warning("cannot remove stale temp file %s: %s", path, e.strerror or e)
    if removed:
        _log.info("removed %d stale temp file(s) of killed writers in %s: %s", len(removed), root, sorted(removed))
    return len(removed)


# --------------------------------------------------------------------------- the index


@dataclass
class ShardInfo:
    name: str  # "shard-000000.tar", relative to the index (the reader resolves it there, so shard sets can move)
    uri: str  # where it was written
    n_fields: int
    bytes: int
    sha256: str
    split: str
    n_skipped: int = 0

    @classmethod
    def from_sidecar(cls, side: dict[str, Any]) -> ShardInfo:
        """The index entry of a shard, from the sidecar its builder wrote."""
        return cls(
            name=side["name"],
            uri=side["uri"],
            n_fields=side["n_fields"],
            bytes=side["bytes"],
            sha256=side["sha256"],
            split=side["split"],
            n_skipped=len(side["skipped"]),
        )


@dataclass
class ShardIndex:
    """What `index.json` holds; `written` / `reused` describe the run that returned it (not stored)."""

    uri: str
    split: str
    channels: list[str]
    field_shape: list[int]  # [C, H, W]
    preprocess: dict[str, Any]
    preprocess_signature: str
    target_bytes: int
    shards: list[ShardInfo]
    skipped: list[dict[str, str]]  # {"field_id", "reason", "kind" (SKIP_KINDS), "shard"}
    dtype: str = "uint8"
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    cleaned_temps: int = 0  # stale temp files of killed writers this run removed

    @property
    def n_fields(self) -> int:
        return sum(s.n_fields for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def totals(self) -> dict[str, int]:
        return {
            "shards": len(self.shards),
            "fields": self.n_fields,
            "bytes": self.total_bytes,
            "skipped": len(self.skipped),
            "planned": self.n_fields + len(self.skipped),
        }

    def skipped_by_kind(self) -> dict[str, int]:
        """Skipped fields per kind (SKIP_KINDS; "unclassified" for entries of an older writer)."""
        out = dict.fromkeys(SKIP_KINDS, 0)
        for s in self.skipped:
            kind = s.get("kind") or "unclassified"
            out[kind] = out.get(kind, 0) + 1
        return out

    def format_summary(self, max_skipped: int = 20) -> str:
        """A readable report: totals, what this run wrote or reused, and every skipped field with its reason."""
        t = self.totals()
        kinds = ", ".join(f"{n} {k}" for k, n in self.skipped_by_kind().items() if n)
        lines = [
            f"shards ({self.split} split) at {self.uri}: {t['shards']} shard(s), {t['fields']} fields "
            f"{'x'.join(map(str, self.field_shape))} {self.dtype}, {t['bytes'] / 1e6:.1f} MB; channels "
            f"{', '.join(self.channels)}",
            f"this run: {len(self.written)} shard(s) written, {len(self.reused)} reused (already complete)"
            + (f", {self.cleaned_temps} stale temp file(s) of killed writers removed" if self.cleaned_temps else ""),
            f"skipped fields: {t['skipped']} of {t['planned']} planned" + (f" ({kinds})" if kinds else ""),
        ]
        if self.skipped_by_kind()["transient"]:
            lines.append("  transient skips (storage errors after retries): rerun the shard step to rebuild their shards")
        for s in self.skipped[:max_skipped]:
            kind = f" [{s['kind']}]" if s.get("kind") else ""
            lines.append(f"  {s.get('field_id')}{kind}: {s.get('reason')}")
        if len(self.skipped) > max_skipped:
            lines.append(f"  ... {len(self.skipped) - max_skipped} more in {self.uri}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SHARD_FORMAT,
            "version": SHARD_FORMAT_VERSION,
            "created_by": f"dinocell {__version__}",
            "layout": "webdataset tar; per field <key>.json (metadata) + <key>.u8 (raw C-contiguous uint8 [C,H,W])",
            "split": self.split,
            "channels": list(self.channels),
            "field_shape": list(self.field_shape),
            "dtype": self.dtype,
            "preprocess": self.preprocess,
            "preprocess_signature": self.preprocess_signature,
            "target_bytes": self.target_bytes,
            "totals": self.totals(),
            "skipped_by_kind": self.skipped_by_kind(),
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "skipped": self.skipped,
        }

    def write(self, uri: str | None = None) -> None:
        storage.write_text(uri or self.uri, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], uri: str) -> ShardIndex:
        if not isinstance(d, dict) or d.get("format") != SHARD_FORMAT:
            raise ValueError(
                f"{uri} is not a dinocell shard index (format {d.get('format') if isinstance(d, dict) else d!r})"
            )
        if d.get("version") != SHARD_FORMAT_VERSION:
            raise ValueError(
                f"{uri}: shard index version {d.get('version')} is not supported (expected {SHARD_FORMAT_VERSION})"
            )
        try:
            shards = [ShardInfo(**s) for s in d["shards"]]
            return cls(
                uri=uri,
                split=d["split"],
                channels=list(d["channels"]),
                field_shape=[int(x) for x in d["field_shape"]],
                preprocess=dict(d["preprocess"]),
                preprocess_signature=d["preprocess_signature"],
                target_bytes=int(d["target_bytes"]),
                shards=shards,
                skipped=list(d["skipped"]),
                dtype=d.get("dtype", "uint8"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{uri}: malformed shard index: {type(e).__name__}: {e}") from e

    @classmethod
    def read(cls, uri: str) -> ShardIndex:
        uri = str(uri)
        try:
            d = json.loads(storage.read_text(uri))
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri}: shard index is not valid JSON: {e}") from e
        return cls.from_dict(d, uri)

    def shard_uri(self, shard: ShardInfo) -> str:
        """Where a shard lives now: next to the index."""
        return storage.join(parent_uri(self.uri), shard.name)
