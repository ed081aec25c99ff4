"""Field discovery (`dinocell discover`): find every field (site) of a JUMP source and write the field manifest.

Two ways in, one manifest out (dinocell.jump.manifest: one row per field with batch, plate, well, site, split, the URI of
every requested channel and the plate's illumination files):

- **load_data mode (canonical).** Reads the `load_data.csv` / `load_data_with_illum.csv` files that index a JUMP source
  (`<source>/workspace/load_data_csv/<BATCH>/<BARCODE>/`). Channels are mapped by column name (`URL_Orig<Ch>`, or the
  older `FileName_Orig<Ch>` + `PathName_Orig<Ch>` pair), never by the `chN` in file names, because chN numbering differs
  between sources and acquisitions. Every column is read as a string (a plate called `00123` stays `00123`). Parsing
  is vectorised with pyarrow; per CSV only the distinct folders (about one per plate) are handled in Python
  (3M fields: about 50 s of CPU and 5.7 GB peak on the 2-core dev machine, see bench/bench_discovery.py).
- **listing mode.** Lists `<images_prefix>/<BATCH>/images/<PLATE_DIR>/Images/` (one parallel listing per plate folder),
  parses Phenix file names and groups them by (batch, plate, row, column, site), never by file name alone. chN is mapped
  to a channel with `channel_numbers` (default: CPJUMP1's, `layout.CPJUMP1_CHANNEL_NUMBERS`); other sources number
  channels differently, which is why load_data mode is the canonical one.
- **auto mode:** load_data mode when `cfg.load_data` names CSVs or prefixes; else load_data mode on the CSVs found under
  `<source_root>/workspace/load_data_csv/[<BATCH>/]` (source root derived from `cfg.images_prefix`; only the selected
  batches are searched); else listing mode. A selected batch without CSVs while others have some is an error (the
  modes are not mixed): select batches consistently or pass mode="listing".

CSV files: `load_data_with_illum.csv`, `load_data.csv` (or `.csv.gz`) found under the given prefixes, plus CSV URIs named
directly. A CSV whose folder (`load_data_csv/<BATCH>/<BARCODE>/`) is outside the batch / plate selection is not read at
all (listed in the summary under `inputs.csv_not_selected`); rows are filtered again by their own batch and plate.

Paths in load_data CSVs:
- an absolute URL / path is re-rooted onto `cfg.images_prefix` (when `cfg.reroot_urls`): the `images/<BATCH>/images/...`
  (or `images/<BATCH>/illum/...`) part of the path is grafted on the configured prefix, so CSVs written for another
  bucket or a local mount point at the configured copy. A URL already under the configured prefix is kept. A path
  without that part cannot be re-rooted: the row is excluded with reason "cannot re-root";
- a relative `PathName` is resolved under `cfg.images_prefix`;
- anything that would climb out of the prefix (`..`) is excluded with reason "path escapes the images prefix".
Load_data mode does not check that image objects exist (that would be millions of requests): the loaders count and
report missing objects when they read them.

Batch of a row: the CSV's location (`load_data_csv/<BATCH>/<BARCODE>/`), else a `Metadata_Batch` column, else the
`images/<BATCH>/` part of the first requested channel's path; none of these -> excluded ("no batch"). Plate:
`Metadata_Plate` (else the `<BARCODE>` folder); well: `Metadata_Well` (else `Metadata_Row` + `Metadata_Col`), written
as `A01`; site: `Metadata_Site` (an integer). When one folder holds both `load_data.csv` and `load_data_with_illum.csv`,
only the latter is read (it has the same rows plus the illumination columns); the other is listed in the summary.

Illumination files: the `URL_Illum<Ch>` / `FileName_Illum<Ch>` + `PathName_Illum<Ch>` columns when present. Otherwise
the layout's convention (`images/<BATCH>/illum/<PLATE>/<PLATE>_Illum<Ch>.npy`) is recorded only for the objects that
exist: the illum folder of each such plate is listed once. No illum file -> "" in the manifest.

A CSV without any column for a requested channel is an error naming the CSV and the channels it has (a mismatch of
input and config, not a field defect). Exclusions (nothing is dropped silently): a field whose path for a requested
channel is empty ("missing channel <Ch>"; in listing mode: no file for that channel), a later row for
an already seen (batch, plate, well, site) ("duplicate": the first row in input order is kept; input order is CSV files
sorted by URI, then row order; in listing mode plate folders sorted by name), "cannot re-root", "path escapes the images
prefix", "no plate", "bad well", "bad site", "no batch"; in listing mode also "unparsable name" (an image file whose
name is not a Phenix name), "stray file" (a non-image object), "unparsable plate folder". Each excluded entry records
its reason, its source (CSV URI and 1-based data row, the header not counted; or the object key) and a detail. Rows left
out by the batch / plate filters or by `max_fields` are not exclusions but are counted in the summary (`not_selected`).

`max_fields` (deterministic): fields are taken round-robin across plates (plate order: sorted (batch, plate)), and
within a plate in the order of a seeded hash of (batch, plate, well, site) with `cfg.split_seed`, so a small subset
spreads over every plate and over the wells of each plate instead of the first wells of the first plate. A plate's own
order does not depend on the other plates: the k fields picked from a plate are always the same k, whatever else is
discovered.

Train/val split: by plate with `assign_splits` over every plate that has fields after exclusions (before `max_fields`, so
a plate's split does not depend on the subset size).

Summary (`DiscoveryResult.summary`, written as JSON beside the manifest): mode, inputs (CSV files read / skipped / not
selected, or plate folders and keys listed), `rows_read` (CSV rows, or field groups found by listing), `fields`,
`fields_per_batch`, `fields_per_plate` ({batch: {plate: n}}), `fields_per_split`, `plates_per_split`, `not_selected`,
`illum_plates`, `excluded_total`, `excluded_by_reason` and `excluded` (every entry). In load_data mode
rows_read = fields + excluded_total + sum(not_selected).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import posixpath
import re
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dinocell import storage
from dinocell.config import DataConfig
from dinocell.jump import layout
from dinocell.jump.manifest import Manifest, assign_splits

__all__ = [
    "LOAD_DATA_NAMES",
    "DiscoveryError",
    "DiscoveryResult",
    "Exclusion",
    "csv_location",
    "discover_fields",
    "find_load_data_csvs",
    "format_summary",
    "reroot_path",
    "write_discovery",
]

Mode = Literal["auto", "load_data", "listing"]

# File names of load_data CSVs, best first: in one folder only the first one present is read.
LOAD_DATA_NAMES = ("load_data_with_illum.csv", "load_data_with_illum.csv.gz", "load_data.csv", "load_data.csv.gz")
IMAGE_EXTENSIONS = (".tif", ".tiff")

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


@dataclass
class DiscoveryResult:
    manifest: Manifest
    summary: dict
    exclusions: list[Exclusion] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.summary, indent=1, sort_keys=False)

    def format_summary(self, max_exclusions: int = 20) -> str:
        return format_summary(self.summary, max_exclusions=max_exclusions)


# =========================================================================== entry point


def discover_fields(
    cfg: DataConfig,
    *,
    mode: Mode = "auto",
    channel_numbers: Mapping[str, int] | None = None,
) -> DiscoveryResult:
    """Discover the fields selected by `cfg` and build the field manifest (see the module docstring).

    `channel_numbers` (listing mode only): channel name -> chN in file names; default CPJUMP1's mapping. It differs
    between sources, so prefer load_data mode wherever load_data CSVs exist.
    """
    if mode not in ("auto", "load_data", "listing"):
        raise ValueError(f"discovery mode must be auto, load_data or listing, got {mode!r}")
    channels = list(cfg.channels)
    if not channels:
        raise DiscoveryError("data.channels is empty: name at least one channel")
    if len(set(channels)) != len(channels):
        raise DiscoveryError(f"data.channels has duplicates: {channels}")
    if cfg.max_fields < 0:
        raise DiscoveryError(f"data.max_fields must be >= 0 (0 = no limit), got {cfg.max_fields}")

    csvs: list[str] = []
    skipped_csvs: list[dict] = []
    if mode in ("auto", "load_data"):
        if cfg.load_data:
            csvs, skipped_csvs = find_load_data_csvs(cfg.load_data)
        elif mode == "load_data" or _has_source_root(cfg.images_prefix):
            root = storage.join(layout.source_root_of_images_prefix(cfg.images_prefix), "workspace", "load_data_csv")
            where = [storage.join(root, b) + "/" for b in cfg.batches] if cfg.batches else [root + "/"]
            csvs, skipped_csvs = find_load_data_csvs(where, required=False, workers=cfg.list_workers)
            if not csvs and mode == "load_data":
                raise DiscoveryError(f"no load_data CSVs under {', '.join(where)} (and data.load_data is empty)")
        if csvs:
            mode = "load_data"
    if mode == "auto":
        mode = "listing"

    if mode == "load_data":
        gathered = _gather_load_data(cfg, channels, csvs)
        gathered.summary_inputs["csv_skipped"] = skipped_csvs
    else:
        numbers = dict(channel_numbers or layout.CPJUMP1_CHANNEL_NUMBERS)
        unknown = [c for c in channels if c not in numbers]
        if unknown:
            raise DiscoveryError(
                f"listing mode: channels {unknown} have no chN number in the channel mapping {numbers}"
            )
        if len({numbers[c] for c in channels}) != len(channels):
            raise DiscoveryError(f"listing mode: two requested channels share a chN number in {numbers}")
        gathered = _gather_listing(cfg, channels, numbers)
    return _finish(cfg, channels, mode, gathered)


def _has_source_root(images_prefix: str) -> bool:
    try:
        layout.source_root_of_images_prefix(images_prefix)
        return True
    except ValueError:
        return False


# =========================================================================== path resolution

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


# =========================================================================== load_data mode

_CSV_LOCATION = re.compile(r"load_data_csv/(?P<batch>[^/]+)/(?P<barcode>[^/]+)/[^/]+$")


def find_load_data_csvs(
    locations: Sequence[str], required: bool = True, workers: int | None = None
) -> tuple[list[str], list[dict]]:
    """CSV URIs from a list of CSV URIs and/or prefixes to search (recursively) for load_data CSVs.

    Returns (csvs sorted by URI, skipped) where skipped lists CSVs shadowed by a `load_data_with_illum.csv` in the same
    folder. With `required`, a location that yields no CSV is an error naming it.
    """
    files: list[str] = []
    prefixes: list[str] = []
    for loc in locations:
        loc = str(loc)
        (files if loc.lower().endswith((".csv", ".csv.gz")) else prefixes).append(loc)

    def search(prefix: str) -> list[str]:
        return [o.uri for o in storage.list_objects(prefix) if posixpath.basename(o.uri) in LOAD_DATA_NAMES]

    found = storage.map_parallel(search, prefixes, max_workers=workers) if prefixes else []
    for prefix, uris in zip(prefixes, found):
        if not uris and required:
            raise DiscoveryError(f"no load_data CSV ({', '.join(LOAD_DATA_NAMES)}) found under {prefix}")
        files.extend(uris)

    by_dir: dict[str, list[str]] = {}
    for uri in sorted(set(files)):
        by_dir.setdefault(posixpath.dirname(uri), []).append(uri)
    chosen: list[str] = []
    skipped: list[dict] = []
    for uris in by_dir.values():
        known = [u for u in uris if posixpath.basename(u) in LOAD_DATA_NAMES]
        others = [u for u in uris if u not in known]  # explicitly named CSVs with other names are all read
        chosen.extend(others)
        if known:
            best = min(known, key=lambda u: LOAD_DATA_NAMES.index(posixpath.basename(u)))
            chosen.append(best)
            for u in known:
                if u != best:
                    skipped.append({"uri": u, "reason": f"{posixpath.basename(best)} in the same folder is read"})
    return sorted(chosen), skipped


def csv_location(uri: str) -> tuple[str | None, str | None]:
    """`.../load_data_csv/<BATCH>/<BARCODE>/load_data.csv` -> (BATCH, BARCODE); (None, None) elsewhere."""
    m = _CSV_LOCATION.search(uri.replace("\\", "/"))
    return (m.group("batch"), m.group("barcode")) if m else (None, None)


def _read_csv(uri: str, data: bytes, wanted: set[str]) -> tuple[pa.Table, list[str]]:
    """Parse a load_data CSV keeping only the columns in `wanted`, every one as a string; also returns the header."""
    if uri.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except OSError as e:
            raise DiscoveryError(f"{uri}: not a gzip file: {e}") from e
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    first = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not first.strip():
        raise DiscoveryError(f"{uri}: empty CSV (no header line)")
    header = next(csv.reader([first.decode("utf-8", errors="replace")]))
    dupes = sorted(c for c, n in Counter(header).items() if n > 1)
    if dupes:
        raise DiscoveryError(f"{uri}: duplicate column names {dupes}")
    include = [c for c in header if c in wanted]
    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            # use_threads=False: pyarrow's thread pools can abort the interpreter at exit on some hosts.
            read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 24),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in include},  # no type inference: '00123' stays '00123'
                include_columns=include,
                strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DiscoveryError(f"{uri}: cannot parse CSV: {e}") from e
    return table, header


def _column_names(channels: Sequence[str]) -> set[str]:
    names = {"Metadata_Plate", "Metadata_Well", "Metadata_Row", "Metadata_Col", "Metadata_Site", "Metadata_Batch"}
    for ch in channels:
        for kind in ("Orig", "Illum"):
            names |= {f"URL_{kind}{ch}", f"FileName_{kind}{ch}", f"PathName_{kind}{ch}"}
    return names


class _Reasons:
    """First-failure-wins reason and detail per row, built check by check (vectorised)."""

    def __init__(self, n: int):
        self.reason = pa.nulls(n, pa.string())
        self.detail = pa.nulls(n, pa.string())

    def add(self, reason: pa.Array, detail: pa.Array | None = None) -> None:
        take = pc.and_(pc.is_null(self.reason), pc.is_valid(reason))
        self.reason = pc.if_else(take, reason, self.reason)
        if detail is not None:
            self.detail = pc.if_else(take, detail, self.detail)

    def add_mask(self, mask: pa.Array, reason: str, detail: pa.Array | None = None) -> None:
        self.add(pc.if_else(mask, pa.scalar(reason), pa.scalar(None, pa.string())), detail)


def _text(t: pa.Table, name: str) -> pa.Array | None:
    if name not in t.column_names:
        return None
    return pc.ascii_trim_whitespace(t.column(name).combine_chunks())


def _concat(a: pa.Array, b: pa.Array) -> pa.Array:
    """Element-wise a + b (null where either is null)."""
    return pc.binary_join_element_wise(a, b, "")


def _split_folder_name(full: pa.Array) -> tuple[pa.Array, pa.Array]:
    """`a/b/c.tiff` -> (`a/b`, `c.tiff`); no slash -> (``, whole)."""
    parts = pc.split_pattern(full, "/", max_splits=1, reverse=True)
    offsets = parts.offsets.to_numpy().astype(np.int64)
    values = parts.values
    has_folder = pa.array(np.diff(offsets) == 2)
    name = values.take(pa.array(offsets[1:] - 1))
    folder = pc.if_else(has_folder, values.take(pa.array(offsets[:-1])), pa.scalar(""))
    return folder, name


def _resolve_paths(
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
    uri = _concat(new_folder, name)
    return uri, reason, empty, pa.array(batches, pa.string()).take(idx)


def _channel_parts(t: pa.Table, kind: str, ch: str) -> tuple[pa.Array, pa.Array, pa.Array] | None:
    """(folder, file name, full path) of one channel from either column form; None when the CSV has neither."""
    url = _text(t, f"URL_{kind}{ch}")
    if url is not None:
        return (*_split_folder_name(url), url)
    fname, pname = _text(t, f"FileName_{kind}{ch}"), _text(t, f"PathName_{kind}{ch}")
    if fname is None or pname is None:
        return None
    pname = pc.replace_substring_regex(pname, pattern="/+$", replacement="")
    # An empty PathName means "directly under the images prefix"; an empty FileName stays empty (-> missing channel).
    slash = pc.if_else(pc.equal(pname, ""), pa.scalar(""), pa.scalar("/"))
    full = _concat(_concat(pname, slash), fname)
    if pc.any(pc.match_substring(fname, "/")).as_py():  # FileName with a folder part: split the joined path
        folder, name = _split_folder_name(full)
        return folder, pc.if_else(pc.equal(fname, ""), fname, name), full
    return pname, fname, full


def _normalise_wells(values: pa.Array) -> pa.Array:
    """`A1`, `a01`, `A01` -> `A01`; anything else -> null (distinct values resolved once)."""
    encoded = pc.dictionary_encode(values)
    out = []
    for w in encoded.dictionary.to_pylist():
        try:
            out.append(layout.well_name(*layout.well_row_col(w)))
        except ValueError:
            out.append(None)
    return pa.array(out, pa.string()).take(encoded.indices)


def _wells_from_row_col(rows: pa.Array, cols: pa.Array) -> pa.Array:
    combined = pc.binary_join_element_wise(rows, cols, ",")
    encoded = pc.dictionary_encode(combined)
    out = []
    for rc in encoded.dictionary.to_pylist():
        r, _, c = rc.partition(",")
        try:
            row = int(r) if r.isdigit() else (ord(r.upper()) - ord("A") + 1 if len(r) == 1 and r.isalpha() else -1)
            out.append(layout.well_name(row, int(c)) if c.isdigit() else None)
        except ValueError:
            out.append(None)
    return pa.array(out, pa.string()).take(encoded.indices)


@dataclass
class _Gathered:
    """Candidate fields (one Arrow table, before dedupe) plus what was left out on the way."""

    table: pa.Table  # batch, plate, well, site, src, row, uri_<Ch>..., illum_<Ch>...
    sources: list[str]  # src index -> CSV URI or plate folder
    exclusions: list[Exclusion]
    not_selected: Counter
    rows_read: int  # CSV data rows read, or field groups found by listing
    summary_inputs: dict


def _candidate_schema(channels: Sequence[str]) -> pa.Schema:
    fields = [
        ("batch", pa.string()),
        ("plate", pa.string()),
        ("well", pa.string()),
        ("site", pa.int32()),
        ("src", pa.int32()),
        ("row", pa.int32()),
    ]
    fields += [(f"uri_{c}", pa.string()) for c in channels]
    fields += [(f"illum_{c}", pa.string()) for c in channels]
    return pa.schema(fields)


def _process_csv(
    t: pa.Table, header: Sequence[str], uri: str, src: int, cfg: DataConfig, channels: Sequence[str]
) -> tuple[pa.Table, list[Exclusion], Counter]:
    """One parsed load_data CSV -> candidate rows, exclusions and not-selected counts (vectorised)."""
    n = t.num_rows
    loc_batch, loc_barcode = csv_location(uri)
    reasons = _Reasons(n)

    plate = _text(t, "Metadata_Plate")
    if plate is None:
        if loc_barcode is None:
            raise DiscoveryError(f"{uri}: no Metadata_Plate column and not under load_data_csv/<BATCH>/<BARCODE>/")
        plate = pa.array([loc_barcode] * n, pa.string())
    reasons.add_mask(pc.equal(plate, ""), NO_PLATE)

    well_raw = _text(t, "Metadata_Well")
    if well_raw is not None:
        well = _normalise_wells(well_raw)
    else:
        rows, cols = _text(t, "Metadata_Row"), _text(t, "Metadata_Col")
        if rows is None or cols is None:
            raise DiscoveryError(f"{uri}: no Metadata_Well column (nor Metadata_Row + Metadata_Col)")
        well_raw = pc.binary_join_element_wise(rows, cols, ",")
        well = _wells_from_row_col(rows, cols)
    reasons.add_mask(pc.is_null(well), BAD_WELL, well_raw)

    site_raw = _text(t, "Metadata_Site")
    if site_raw is None:
        raise DiscoveryError(f"{uri}: no Metadata_Site column")
    site_ok = pc.match_substring_regex(site_raw, r"^[0-9]{1,9}$")
    reasons.add_mask(pc.invert(site_ok), BAD_SITE, site_raw)
    site = pc.cast(pc.if_else(site_ok, site_raw, pa.scalar("0")), pa.int32())

    uris, illums, path_batch = {}, {}, None
    for ch in channels:
        parts = _channel_parts(t, "Orig", ch)
        if parts is None:
            # A whole column missing is an input/config mismatch, not a field defect: say so once, clearly.
            have = sorted({c.split("_Orig", 1)[1] for c in header if c.startswith(("URL_Orig", "FileName_Orig"))})
            raise DiscoveryError(
                f"{uri}: no column for channel {ch!r} (URL_Orig{ch}, or FileName_Orig{ch} + PathName_Orig{ch}); "
                f"this CSV has channels {have}: set data.channels or leave this CSV out"
            )
        folder, name, full = parts
        uri_arr, why, empty, batch_arr = _resolve_paths(folder, name, cfg.images_prefix, cfg.reroot_urls)
        reasons.add_mask(empty, missing_channel(ch))
        reasons.add(why, full)
        uris[ch] = uri_arr
        path_batch = batch_arr if path_batch is None else pc.coalesce(path_batch, batch_arr)
    for ch in channels:
        parts = _channel_parts(t, "Illum", ch)
        if parts is None:
            illums[ch] = pa.nulls(n, pa.string())
            continue
        folder, name, full = parts
        uri_arr, why, empty, _ = _resolve_paths(folder, name, cfg.images_prefix, cfg.reroot_urls, "illum ")
        reasons.add(why, full)
        illums[ch] = pc.if_else(empty, pa.scalar(None, pa.string()), uri_arr)

    candidates = []
    if loc_batch is not None:
        candidates.append(pa.array([loc_batch] * n, pa.string()))
    meta_batch = _text(t, "Metadata_Batch")
    if meta_batch is not None:
        candidates.append(pc.if_else(pc.equal(meta_batch, ""), pa.scalar(None, pa.string()), meta_batch))
    if path_batch is not None:
        candidates.append(path_batch)
    batch = pc.coalesce(*candidates) if candidates else pa.nulls(n, pa.string())
    reasons.add_mask(pc.is_null(batch), NO_BATCH)

    # Filters first: a row outside the selection is counted as not selected, whatever else is wrong with it.
    not_selected = Counter()
    selected = pa.array(np.ones(n, dtype=bool))
    if cfg.batches:
        in_batch = pc.or_(pc.is_in(batch, value_set=pa.array(cfg.batches, pa.string())), pc.is_null(batch))
        not_selected["batch filter"] += n - (pc.sum(in_batch).as_py() or 0)
        selected = pc.and_(selected, in_batch)
    if cfg.plates:
        in_plate = pc.is_in(plate, value_set=pa.array(cfg.plates, pa.string()))
        not_selected["plate filter"] += pc.sum(pc.and_(selected, pc.invert(in_plate))).as_py() or 0
        selected = pc.and_(selected, in_plate)

    row = pa.array(np.arange(1, n + 1, dtype=np.int32))
    bad = pc.and_(selected, pc.is_valid(reasons.reason))
    exclusions = []
    if n and pc.any(bad).as_py():
        bad_rows = pa.table({"row": row, "reason": reasons.reason, "detail": reasons.detail}).filter(bad)
        for r, why, det in zip(*(bad_rows.column(c).to_pylist() for c in ("row", "reason", "detail"))):
            exclusions.append(Exclusion(why, uri, r, det))
    keep = pc.and_(selected, pc.is_null(reasons.reason))
    cols = {
        "batch": batch,
        "plate": plate,
        "well": well,
        "site": site,
        "src": pa.array(np.full(n, src, dtype=np.int32)),
        "row": row,
    }
    cols.update({f"uri_{c}": uris[c] for c in channels})
    cols.update({f"illum_{c}": illums[c] for c in channels})
    table = pa.table(cols, schema=_candidate_schema(channels)).filter(keep)
    # Sort here, in parallel and cache-friendly, so that the global (batch, plate, well, site) order is usually the
    # concatenation order already (CSV files sorted by <BATCH>/<BARCODE>) and the final reordering of millions of
    # URIs can be skipped. "row" breaks ties: the first of repeated rows stays first.
    order = pc.sort_indices(table, sort_keys=[(k, "ascending") for k in ("batch", "plate", "well", "site", "row")])
    if not np.array_equal(order.to_numpy(), np.arange(table.num_rows)):
        table = table.take(order)
    return table, exclusions, not_selected


def _gather_load_data(cfg: DataConfig, channels: Sequence[str], csvs: Sequence[str]) -> _Gathered:
    not_selected = Counter()
    chosen: list[str] = []
    csv_not_selected: list[str] = []
    for uri in csvs:
        batch, barcode = csv_location(uri)
        # Skip whole CSVs whose location says they are outside the selection (cheap: they are never read).
        if (cfg.batches and batch is not None and batch not in cfg.batches) or (
            cfg.plates and barcode is not None and barcode not in cfg.plates
        ):
            csv_not_selected.append(uri)
            continue
        chosen.append(uri)
    if cfg.batches:
        located = {csv_location(u)[0] for u in csvs}
        if None not in located:
            missing = sorted(set(cfg.batches) - located)
            if missing:
                raise DiscoveryError(f"no load_data CSV for the selected batches {missing} among {len(csvs)} CSVs")
    wanted = _column_names(channels)

    # Fetches run on cfg.list_workers threads; parsing (CPU-bound, pyarrow releases the GIL) on at most one per core.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpu_slots = threading.BoundedSemaphore(max(1, cores))

    def one(args: tuple[int, str]):
        src, uri = args
        data = storage.read_bytes(uri)
        with cpu_slots:
            t, header = _read_csv(uri, data, wanted)
            del data
            table, excl, ns = _process_csv(t, header, uri, src, cfg, channels)
        return t.num_rows, table, excl, ns

    results = storage.map_parallel(one, list(enumerate(chosen)), max_workers=cfg.list_workers)
    tables, exclusions, rows_read = [], [], 0
    for n, table, excl, ns in results:
        rows_read += n
        tables.append(table)
        exclusions.extend(excl)
        not_selected.update(ns)
    schema = _candidate_schema(channels)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    inputs = {"csv_files": list(chosen), "csv_not_selected": csv_not_selected}
    return _Gathered(table, list(chosen), exclusions, not_selected, rows_read, inputs)


# =========================================================================== listing mode


def _probe_read_access(prefix: str, listings: Sequence[Sequence[str]]) -> None:
    """Check that one listed object can be read (HEAD): a bucket may allow listing but not reading (and S3-compatible
    servers differ in which of the two they refuse to anonymous clients); fail now with a clear error, not at training."""
    first = next((u for uris in listings for u in uris), None)
    if first is None:
        return
    try:
        storage.exists(first)
    except storage.StorageError as e:
        raise storage.StorageError(f"listing mode: {prefix} can be listed but its objects cannot be read: {e}") from e


def _gather_listing(cfg: DataConfig, channels: Sequence[str], numbers: Mapping[str, int]) -> _Gathered:
    prefix = cfg.images_prefix.rstrip("/") + "/"
    if cfg.batches:
        batches = list(cfg.batches)
    else:
        batches = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in storage.list_prefixes(prefix))
    if not batches:
        raise DiscoveryError(f"listing mode: no batch folders under {prefix}")

    plate_lists = storage.map_parallel(
        lambda b: storage.list_prefixes(storage.join(prefix, b, "images") + "/"), batches, max_workers=cfg.list_workers
    )
    exclusions: list[Exclusion] = []
    not_selected = Counter()
    plates: list[tuple[str, str, str]] = []  # (batch, barcode, plate folder URI ending in '/')
    for batch, dirs in zip(batches, plate_lists):
        if not dirs and cfg.batches:
            raise DiscoveryError(f"listing mode: no plate folders under {storage.join(prefix, batch, 'images')}/")
        for d in sorted(dirs):
            parsed = layout.parse_plate_dir(d.rstrip("/").rsplit("/", 1)[-1])
            if parsed is None:
                exclusions.append(
                    Exclusion(UNPARSABLE_PLATE_DIR, d, detail="expected <BARCODE>__<TIMESTAMP>-Measurement<N>")
                )
                continue
            if cfg.plates and parsed[0] not in cfg.plates:
                not_selected["plate filter (plate folders)"] += 1
                continue
            plates.append((batch, parsed[0], d))
    if not plates and not exclusions:
        raise DiscoveryError(f"listing mode: no plate folders under {prefix}<BATCH>/images/ for batches {batches}")

    images_dirs = [d + "Images/" for _, _, d in plates]
    listings = storage.map_parallel(
        lambda d: [o.uri for o in storage.list_objects(d)], images_dirs, max_workers=cfg.list_workers
    )
    _probe_read_access(prefix, listings)
    wanted_numbers = {numbers[c] for c in channels}
    cols: dict[str, list] = {k: [] for k in ("batch", "plate", "well", "site", "src", "row")}
    for c in channels:
        cols[f"uri_{c}"] = []
    ignored = Counter()
    keys_listed = 0
    field_groups = 0  # (plate folder, row, col, site) groups: the listing's equivalent of CSV rows
    for src, ((batch, barcode, _), images_dir, uris) in enumerate(zip(plates, images_dirs, listings)):
        keys_listed += len(uris)
        fields: dict[tuple[int, int, int], dict[int, str]] = {}
        for uri in sorted(uris):
            rel = uri[len(images_dir) :]
            if "/" in rel:
                exclusions.append(Exclusion(STRAY_FILE, uri, detail="nested below Images/"))
                continue
            parsed = layout.parse_image_filename(rel)
            if parsed is None:
                is_image = rel.lower().endswith(IMAGE_EXTENSIONS)
                exclusions.append(Exclusion(UNPARSABLE_NAME if is_image else STRAY_FILE, uri))
                continue
            if parsed.channel not in wanted_numbers:
                ignored["channel not requested"] += 1
                continue
            key = (parsed.row, parsed.col, parsed.site)
            chans = fields.setdefault(key, {})
            if parsed.channel in chans:
                exclusions.append(
                    Exclusion(DUPLICATE, uri, detail=f"same field and channel as {chans[parsed.channel]}")
                )
                continue
            chans[parsed.channel] = uri
        field_groups += len(fields)
        for (r, c, s), chans in sorted(fields.items()):
            stem = f"{images_dir}r{r:02d}c{c:02d}f{s:02d}"
            try:
                well = layout.well_name(r, c)
            except ValueError:
                exclusions.append(Exclusion(BAD_WELL, stem, detail=f"row {r} col {c}"))
                continue
            missing = [ch for ch in channels if numbers[ch] not in chans]
            if missing:
                exclusions.append(Exclusion(missing_channel(missing[0]), stem, detail=f"missing {missing}"))
                continue
            cols["batch"].append(batch)
            cols["plate"].append(barcode)
            cols["well"].append(well)
            cols["site"].append(s)
            cols["src"].append(src)
            cols["row"].append(len(cols["row"]))
            for ch in channels:
                cols[f"uri_{ch}"].append(chans[numbers[ch]])
    n = len(cols["batch"])
    for c in channels:
        cols[f"illum_{c}"] = pa.nulls(n, pa.string())
    table = pa.table(cols, schema=_candidate_schema(channels))
    inputs = {
        "batches": batches,
        "plate_folders": len(plates),
        "keys_listed": keys_listed,
        "ignored_files": dict(ignored),
        "channel_numbers": {c: numbers[c] for c in channels},
    }
    return _Gathered(table, images_dirs, exclusions, not_selected, field_groups, inputs)


# =========================================================================== common tail


def _arr(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _sorted_codes(values: pa.Array) -> tuple[np.ndarray, list]:
    """Per row, the rank of its value among the sorted distinct values (int64), and those values.

    Integer codes make sorting, grouping and counting millions of rows cheap: the strings are few (batches, plates,
    wells) and are hashed once by dictionary_encode.
    """
    enc = pc.dictionary_encode(_arr(values))
    distinct = enc.dictionary.to_pylist()
    order = sorted(range(len(distinct)), key=distinct.__getitem__)
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[order] = np.arange(len(distinct))
    return rank[enc.indices.to_numpy(zero_copy_only=False)], [distinct[i] for i in order]


@dataclass
class _Keys:
    """Integer keys of the candidate rows: (batch, plate) group, well and site, all in sorted-string order."""

    group: np.ndarray  # index into `plates`, ordered by (batch, plate)
    plates: list[tuple[str, str]]  # (batch, plate) per group
    well: np.ndarray  # index into `wells`
    wells: list[str]
    site: np.ndarray

    @classmethod
    def of(cls, table: pa.Table) -> _Keys:
        b, batches = _sorted_codes(table.column("batch"))
        p, plates = _sorted_codes(table.column("plate"))
        n_plates = max(len(plates), 1)
        pair, inverse = np.unique(b * n_plates + p, return_inverse=True)  # sorted by (batch, plate)
        pairs = [(batches[int(k) // n_plates], plates[int(k) % n_plates]) for k in pair]
        w, wells = _sorted_codes(table.column("well"))
        site = _arr(table.column("site")).to_numpy(zero_copy_only=False).astype(np.int64)
        return cls(inverse.reshape(-1).astype(np.int64), pairs, w, wells, site)

    def sort_key(self) -> np.ndarray:
        sites = int(self.site.max()) + 1 if len(self.site) else 1
        return (self.group * len(self.wells) + self.well) * sites + self.site


def _dedupe(table: pa.Table, keys: _Keys, sources: Sequence[str], mode: str) -> tuple[np.ndarray, list[Exclusion]]:
    """Indices of the rows kept, in (batch, plate, well, site) order, and a 'duplicate' exclusion per later repeat.

    The candidate table is in input order (CSV files by URI, then rows; plate folders by name), so a stable sort keeps
    the first occurrence of every field first.
    """
    n = table.num_rows
    if n == 0:
        return np.zeros(0, dtype=np.int64), []
    key = keys.sort_key()
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    same = np.zeros(n, dtype=bool)
    same[1:] = sorted_key[1:] == sorted_key[:-1]
    exclusions = []
    if same.any():
        group_start = np.maximum.accumulate(np.where(~same, np.arange(n), 0))
        dup_pos = np.flatnonzero(same)
        cols = ["src", "row", "batch", "plate", "well", "site"]
        dups = table.select(cols).take(pa.array(order[dup_pos])).to_pylist()
        firsts = table.select(["src", "row"]).take(pa.array(order[group_start[dup_pos]])).to_pylist()
        for d, f in zip(dups, firsts):
            field_key = f"{d['batch']}/{d['plate']}/{d['well']}/{d['site']}"
            if mode == "load_data":
                first, row = f"{sources[f['src']]}:row {f['row']}", d["row"]
            else:
                first, row = sources[f["src"]], None
            exclusions.append(Exclusion(DUPLICATE, sources[d["src"]], row, f"{field_key} already from {first}"))
    return order[~same], exclusions


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread 64-bit hash of 64-bit integers, vectorised."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _select_max_fields(keys: _Keys, rows: np.ndarray, max_fields: int, seed: int) -> np.ndarray:
    """Positions (ascending) into `rows` of `max_fields` fields: round-robin over plates, seeded hash order inside.

    The hash of a field depends only on its own (batch, plate, well, site) and the seed, so adding plates does not
    change which fields of the other plates are picked.
    """
    n = len(rows)
    group = keys.group[rows]
    plate_h = np.array([_stable_hash(f"{seed}:{b}/{p}") for b, p in keys.plates], dtype=np.uint64)
    well_h = np.array([_stable_hash(f"{seed}:{w}") for w in keys.wells], dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(plate_h[group] ^ _mix64(well_h[keys.well[rows]] + keys.site[rows].astype(np.uint64)))
    by_group = np.lexsort((h, group))
    sorted_group = group[by_group]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    first_of = np.zeros(n, dtype=np.int64)
    first_of[starts] = starts
    first_of = np.maximum.accumulate(first_of)
    rank = np.empty(n, dtype=np.int64)
    rank[by_group] = np.arange(n) - first_of
    picked = np.lexsort((group, rank))[:max_fields]
    return np.sort(picked)


def _layout_illum(cfg: DataConfig, plates: Sequence[tuple[str, str]], channels: Sequence[str]) -> dict:
    """(batch, plate) -> {channel: illum URI} for the layout's illum files that exist (one listing per plate)."""
    prefix = cfg.images_prefix

    def probe(bp: tuple[str, str]) -> dict[str, str]:
        batch, plate = bp
        folder = storage.join(prefix, batch, "illum", plate) + "/"
        present = {o.uri for o in storage.list_objects(folder)}
        out = {}
        for ch in channels:
            uri = layout.illum_uri(prefix, batch, plate, ch)
            if uri in present:
                out[ch] = uri
        return out

    found = storage.map_parallel(probe, list(plates), max_workers=cfg.list_workers) if plates else []
    return dict(zip(plates, found))


def _dictionary(codes: np.ndarray, values: Sequence[str]) -> pa.DictionaryArray:
    """A dictionary<string> column from integer codes, without hashing any string."""
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(list(values), pa.string()))


def _field_ids(keys: _Keys, rows: np.ndarray) -> pa.Array:
    """`batch/plate/well/site` per row, from the integer keys (two small dictionaries and one concatenation)."""
    prefixes = pa.array([f"{b}/{p}/" for b, p in keys.plates], pa.string())
    sites = int(keys.site.max()) + 1 if len(keys.site) else 1
    ws, inverse = np.unique(keys.well[rows] * sites + keys.site[rows], return_inverse=True)
    suffixes = pa.array([f"{keys.wells[int(k) // sites]}/{int(k) % sites}" for k in ws], pa.string())
    return _concat(prefixes.take(pa.array(keys.group[rows])), suffixes.take(pa.array(inverse.reshape(-1))))


def _finish(cfg: DataConfig, channels: Sequence[str], mode: str, g: _Gathered) -> DiscoveryResult:
    table = g.table
    keys = _Keys.of(table)
    kept, dup_exclusions = _dedupe(table, keys, g.sources, mode)
    exclusions = g.exclusions + dup_exclusions

    # Split over every plate with fields (before max_fields, so a plate's split does not depend on the subset size).
    present = np.unique(keys.group[kept])
    split_of = assign_splits(
        sorted({keys.plates[i][1] for i in present}), cfg.val_plates, cfg.val_fraction, cfg.split_seed
    )
    not_selected = Counter(g.not_selected)
    if cfg.max_fields and len(kept) > cfg.max_fields:
        picked = _select_max_fields(keys, kept, cfg.max_fields, cfg.split_seed)
        not_selected["max_fields"] += len(kept) - len(picked)
        kept = kept[picked]

    if len(kept) == table.num_rows and np.array_equal(kept, np.arange(len(kept))):
        final = table  # already in order with nothing removed: no copy
    else:
        final = table.take(pa.array(kept, pa.int64()))
    group = keys.group[kept]
    batch_names = sorted({b for b, _ in keys.plates})
    plate_names = sorted({p for _, p in keys.plates})
    batch_code = np.array([batch_names.index(b) for b, _ in keys.plates], dtype=np.int64)
    plate_code = np.array([plate_names.index(p) for _, p in keys.plates], dtype=np.int64)
    split_code = np.array([0 if split_of.get(p) == "train" else 1 for _, p in keys.plates], dtype=np.int64)

    # Illumination: where the CSV gave none, the layout's files that exist (one listing per plate).
    illum = {c: final.column(f"illum_{c}") for c in channels}  # left chunked: combining copies gigabytes at 3M
    need: set[int] = set()
    for c in channels:
        if illum[c].null_count:
            missing = _arr(pc.is_null(illum[c])).to_numpy(zero_copy_only=False)
            need |= set(np.unique(group[missing]).tolist())
    found = _layout_illum(cfg, [keys.plates[i] for i in sorted(need)], channels)
    for c in channels:
        if illum[c].null_count:
            fill = pa.array([found.get(bp, {}).get(c) for bp in keys.plates], pa.string()).take(pa.array(group))
            illum[c] = pc.coalesce(_arr(illum[c]), fill, pa.scalar(""))
    illum_status = Counter()
    for i in np.unique(group).tolist():
        bp = keys.plates[i]
        if bp not in found:
            illum_status["from CSV"] += 1
        elif len(found[bp]) == len(channels):
            illum_status["from layout"] += 1
        else:
            illum_status["partial" if found[bp] else "none"] += 1

    arrays = {
        "field_id": _field_ids(keys, kept),
        "batch": _dictionary(batch_code[group], batch_names),
        "plate": _dictionary(plate_code[group], plate_names),
        "well": final.column("well"),
        "site": final.column("site"),
        "split": _dictionary(split_code[group], ["train", "val"]),
    }
    arrays.update({f"uri_{c}": final.column(f"uri_{c}") for c in channels})
    # Illum URIs repeat per plate: dictionary-encode them (about 1.8 GB less memory at 3M fields).
    arrays.update({f"illum_{c}": pc.dictionary_encode(_arr(illum[c])) for c in channels})
    manifest = Manifest(pa.table(arrays), channels)
    per_group = np.bincount(group, minlength=len(keys.plates))
    per_plate: dict[str, dict[str, int]] = {}
    for (b, p), n in zip(keys.plates, per_group.tolist()):
        if n:
            per_plate.setdefault(b, {})[p] = n
    summary = _summary(cfg, channels, mode, g, manifest, per_plate, exclusions, not_selected, split_of, illum_status)
    return DiscoveryResult(manifest, summary, exclusions)


def _summary(
    cfg, channels, mode, g: _Gathered, manifest: Manifest, per_plate, exclusions, not_selected, split_of, illum_status
) -> dict:
    per_batch = {b: sum(v.values()) for b, v in per_plate.items()}
    per_split = {"train": 0, "val": 0}
    for plates in per_plate.values():
        for p, n in plates.items():
            per_split[split_of[p]] += n
    in_manifest = {p for plates in per_plate.values() for p in plates}
    plates_per_split = {
        s: sorted(p for p, sp in split_of.items() if sp == s and p in in_manifest) for s in ("train", "val")
    }
    by_reason = Counter(e.reason for e in exclusions)
    return {
        "mode": mode,
        "images_prefix": cfg.images_prefix,
        "channels": list(channels),
        "inputs": g.summary_inputs,
        "rows_read": g.rows_read,
        "fields": len(manifest),
        "fields_per_batch": per_batch,
        "fields_per_plate": per_plate,
        "fields_per_split": per_split,
        "plates_per_split": plates_per_split,
        "split": {"val_plates": list(cfg.val_plates), "val_fraction": cfg.val_fraction, "seed": cfg.split_seed},
        "filters": {"batches": list(cfg.batches), "plates": list(cfg.plates), "max_fields": cfg.max_fields},
        "not_selected": dict(not_selected),
        "illum_plates": dict(illum_status),
        "excluded_total": len(exclusions),
        "excluded_by_reason": dict(sorted(by_reason.items())),
        "excluded": [e.to_dict() for e in exclusions],
    }


# =========================================================================== output


def format_summary(summary: dict, max_exclusions: int = 20) -> str:
    """A readable table of a discovery summary (fields per batch/plate/split, exclusions by reason)."""
    lines = []
    inputs = summary.get("inputs", {})
    src = (
        f"{len(inputs.get('csv_files', []))} load_data CSV(s)"
        if summary["mode"] == "load_data"
        else f"{inputs.get('plate_folders', 0)} plate folder(s), {inputs.get('keys_listed', 0):,} keys"
    )
    lines.append(
        f"discovery ({summary['mode']} mode) from {src}: {summary['fields']:,} fields, "
        f"{summary['excluded_total']:,} excluded, channels {', '.join(summary['channels'])}"
    )
    split_of = {p: s for s, plates in summary["plates_per_split"].items() for p in plates}
    rows = [("batch", "plate", "fields", "split")]
    for b, plates in summary["fields_per_plate"].items():
        for p, n in plates.items():
            rows.append((b, p, f"{n:,}", split_of.get(p, "?")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        cells = (v.ljust(w) if i != 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
        lines.append(("  " + "  ".join(cells)).rstrip())
    for b, n in summary["fields_per_batch"].items():
        lines.append(f"  batch {b}: {n:,} fields")
    ps = summary["fields_per_split"]
    pp = summary["plates_per_split"]
    lines.append(
        f"split: train {ps.get('train', 0):,} fields ({len(pp['train'])} plate(s)), "
        f"val {ps.get('val', 0):,} fields ({len(pp['val'])} plate(s))"
    )
    if summary["not_selected"]:
        lines.append("not selected: " + ", ".join(f"{k} {v:,}" for k, v in summary["not_selected"].items()))
    if summary.get("illum_plates"):
        lines.append(
            "illumination files per plate: " + ", ".join(f"{k} {v}" for k, v in summary["illum_plates"].items())
        )
    if summary["excluded_by_reason"]:
        lines.append("excluded by reason:")
        width = max(len(k) for k in summary["excluded_by_reason"])
        for k, v in summary["excluded_by_reason"].items():
            lines.append(f"  {k.ljust(width)}  {v:,}")
        shown = summary["excluded"][:max_exclusions]
        lines.append(f"excluded entries (first {len(shown)} of {summary['excluded_total']:,}):")
        for e in shown:
            where = f"{e['source']}:row {e['row']}" if e.get("row") is not None else e["source"]
            lines.append(f"  {e['reason']}: {where}" + (f" ({e['detail']})" if e.get("detail") else ""))
    return "\n".join(lines)


def write_discovery(result: DiscoveryResult, manifest_uri: str, summary_uri: str | None = None) -> str:
    """Write the manifest (Parquet) and the summary JSON (default `<manifest>.summary.json`); returns the summary URI."""
    if not manifest_uri:
        raise ValueError("write_discovery: the manifest URI is empty (set data.manifest)")
    summary_uri = summary_uri or f"{manifest_uri}.summary.json"
    result.manifest.write(manifest_uri)
    storage.write_text(summary_uri, result.to_json() + "\n")
    return summary_uri
