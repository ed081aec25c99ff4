"""Resolving the paths of load_data CSVs against the configured images prefix.

An absolute URL / path is re-rooted onto the prefix by grafting its `images/<BATCH>/images|illum/...` part; a relative
path is resolved under the prefix; anything that would climb out of the prefix (`..`, odd file names) is refused with
`ESCAPES`, and an absolute path without that part with `CANNOT_REROOT` (see the dinocell.jump.discover docstring).
`reroot_path` handles one folder; `resolve_paths` applies it to a column, once per distinct folder.
"""

from __future__ import annotations

import posixpath
import re

import pyarrow as pa
import pyarrow.compute as pc

from dinocell import storage
from dinocell.jump.candidates import concat_strings
from dinocell.jump.exclusions import CANNOT_REROOT, ESCAPES

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def _is_absolute(path: str) -> bool:
    return bool(_SCHEME.match(path)) or path.startswith("/")


def _segments(path: str) -> list[str]:
    """Path segments after any `scheme://host` part."""
    m = _SCHEME.match(path)
    rest = path
    if m:
        rest = path[m.end() :]
        rest = rest.split("/", 1)[1] if "/" in rest else ""
    return [s for s in rest.split("/") if s]


def _batch_of_rel(rel: str) -> str | None:
    """`<BATCH>/images/...` or `<BATCH>/illum/...` relative to an images prefix -> BATCH."""
    parts = [p for p in rel.split("/") if p]
    if len(parts) >= 2 and parts[1] in ("images", "illum"):
        return parts[0]
    return None


def reroot_path(path: str, images_prefix: str, reroot: bool = True) -> tuple[str | None, str | None, str | None]:
    """Resolve one directory path from a load_data CSV against the configured images prefix.

    Returns (resolved, batch, reason): `resolved` is None when the path is refused, with `reason` saying why
    (CANNOT_REROOT or ESCAPES); `batch` is the `<BATCH>` the path names (None if it names none).
    """
    prefix = images_prefix.rstrip("/")
    if path == "":
        return prefix, None, None
    if not _is_absolute(path):
        try:
            return storage.safe_join(prefix, path).rstrip("/"), _batch_of_rel(posixpath.normpath(path)), None
        except ValueError:
            return None, None, ESCAPES
    if path.rstrip("/") == prefix:
        return prefix, None, None
    if path.startswith(prefix + "/"):
        rel = path[len(prefix) + 1 :]
        try:
            return storage.safe_join(prefix, rel).rstrip("/"), _batch_of_rel(posixpath.normpath(rel)), None
        except ValueError:
            return None, None, ESCAPES
    segs = _segments(path)
    if ".." in segs:  # refuse any climbing in an absolute path, even where re-rooting would drop that part
        return None, None, ESCAPES
    anchor = None
    for i in range(len(segs) - 2):
        if segs[i] == "images" and segs[i + 2] in ("images", "illum"):
            anchor = i  # the last `images/<BATCH>/images|illum` wins
    if not reroot:
        batch = segs[anchor + 1] if anchor is not None else None
        return path.rstrip("/"), batch, None
    if anchor is None:
        return None, None, CANNOT_REROOT
    rel = "/".join(segs[anchor + 1 :])
    try:
        return storage.safe_join(prefix, rel).rstrip("/"), _batch_of_rel(posixpath.normpath(rel)), None
    except ValueError:
        return None, None, ESCAPES


def resolve_paths(
    folder: pa.Array, name: pa.Array, images_prefix: str, reroot: bool, reason_prefix: str = ""
) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
    """Folders + file names (one per row) -> (uri, refusal reason, is-empty mask, batch named by the path), vectorised.

    Each distinct folder (typically one per plate) is resolved once, in Python; the rest is Arrow/numpy work.
    """
    encoded = pc.dictionary_encode(folder)
    resolved, batches, reasons = [], [], []
    for d in encoded.dictionary.to_pylist():
        r, b, why = reroot_path(d, images_prefix, reroot)
        resolved.append(None if r is None else r + "/")
        batches.append(b)
        reasons.append(None if why is None else reason_prefix + why)
    idx = encoded.indices
    new_folder = pa.array(resolved, pa.string()).take(idx)
    reason = pa.array(reasons, pa.string()).take(idx)
    empty = pc.equal(name, "")
    bad_name = pc.or_(
        pc.is_in(name, value_set=pa.array([".", ".."])),
        pc.or_(pc.match_substring(name, "\\"), pc.match_substring(name, "\x00")),
    )
    reason = pc.if_else(pc.and_(bad_name, pc.is_null(reason)), pa.scalar(reason_prefix + ESCAPES), reason)
    uri = concat_strings(new_folder, name)
    return uri, reason, empty, pa.array(batches, pa.string()).take(idx)
