"""Load_data mode: reading load_data CSVs into candidate fields, vectorised with pyarrow.

Both column forms (`URL_Orig<Ch>`, or `FileName_Orig<Ch>` + `PathName_Orig<Ch>`), every column read as a string (a
plate called `00123` stays `00123`), channels mapped by column name (never by the `chN` in file names), paths
re-rooted onto the images prefix (dinocell.jump.reroot), metadata checked (plate, well, site, batch) and the batch /
plate filters applied. Per CSV only the distinct folders and wells are handled in Python. Which CSVs to read is
decided by dinocell.jump.load_data_files; the rules are in the dinocell.jump.discover docstring.
"""

from __future__ import annotations

import csv
import gzip
import os
import posixpath
import threading
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dinocell import storage
from dinocell.config import DataConfig
from dinocell.jump import layout
from dinocell.jump.candidates import Gathered, candidate_schema, concat_strings
from dinocell.jump.exclusions import (
    BAD_SITE,
    BAD_WELL,
    NO_BATCH,
    NO_PLATE,
    DiscoveryError,
    Exclusion,
    missing_channel,
)
from dinocell.jump.load_data_files import csv_location
from dinocell.jump.reroot import resolve_paths
from dinocell.progress import Progress


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


def _split_folder_name(full: pa.Array) -> tuple[pa.Array, pa.Array]:
    """`a/b/c.tiff` -> (`a/b`, `c.tiff`); no slash -> (``, whole)."""
    parts = pc.split_pattern(full, "/", max_splits=1, reverse=True)
    offsets = parts.offsets.to_numpy().astype(np.int64)
    values = parts.values
    has_folder = pa.array(np.diff(offsets) == 2)
    name = values.take(pa.array(offsets[1:] - 1))
    folder = pc.if_else(has_folder, values.take(pa.array(offsets[:-1])), pa.scalar(""))
    return folder, name


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
    full = concat_strings(concat_strings(pname, slash), fname)
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


def _batch_column(t: pa.Table, uri: str, n: int, loc_batch, path_batch, default_batch: str):
    """Each row's batch, from the first of: the CSV's `load_data_csv/<BATCH>/` folder, `Metadata_Batch`, the
    `images/<BATCH>/` part of the first channel's path, `data.default_batch`, the CSV's parent folder name; and how
    many rows each of these named (a user's own export names none of the first three)."""
    candidates: list[tuple[str, pa.Array]] = []
    if loc_batch is not None:
        candidates.append(("load_data_csv folder", pa.array([loc_batch] * n, pa.string())))
    meta_batch = _text(t, "Metadata_Batch")
    if meta_batch is not None:
        named = pc.if_else(pc.equal(meta_batch, ""), pa.scalar(None, pa.string()), meta_batch)
        candidates.append(("Metadata_Batch", named))
    if path_batch is not None:
        candidates.append(("images path", path_batch))
    parent = posixpath.basename(posixpath.dirname(uri.replace("\\", "/").rstrip("/")))
    if default_batch:
        candidates.append(("data.default_batch", pa.array([default_batch] * n, pa.string())))
    elif parent:
        candidates.append(("CSV folder name", pa.array([parent] * n, pa.string())))
    batch = pa.nulls(n, pa.string())
    counts = Counter()
    for label, values in candidates:
        fills = pc.and_(pc.is_null(batch), pc.is_valid(values))
        filled = pc.sum(fills).as_py() or 0
        if filled:
            counts[label] += filled
        batch = pc.coalesce(batch, values)
    return batch, counts


def _process_csv(
    t: pa.Table, header: Sequence[str], uri: str, src: int, cfg: DataConfig, channels: Sequence[str],
    optional: Sequence[str] = (),
) -> tuple[pa.Table, list[Exclusion], Counter, Counter]:
    """One parsed load_data CSV -> candidate rows, exclusions, not-selected counts and rows per batch source.

    `optional` channels (data.eval_channels) are recorded where the CSV has them and null elsewhere; they never
    exclude a field (discovery keeps them only when every field has them)."""
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
        uri_arr, why, empty, batch_arr = resolve_paths(folder, name, cfg.images_prefix, cfg.reroot_urls)
        reasons.add_mask(empty, missing_channel(ch))
        reasons.add(why, full)
        uris[ch] = uri_arr
        path_batch = batch_arr if path_batch is None else pc.coalesce(path_batch, batch_arr)
    for ch in optional:
        parts = _channel_parts(t, "Orig", ch)
        if parts is None:
            uris[ch] = pa.nulls(n, pa.string())
            continue
        folder, name, _ = parts
        uri_arr, why, empty, _ = resolve_paths(folder, name, cfg.images_prefix, cfg.reroot_urls)
        uris[ch] = pc.if_else(pc.or_(empty, pc.is_valid(why)), pa.scalar(None, pa.string()), uri_arr)
    for ch in [*channels, *optional]:
        parts = _channel_parts(t, "Illum", ch)
        if parts is None:
            illums[ch] = pa.nulls(n, pa.string())
            continue
        folder, name, full = parts
        uri_arr, why, empty, _ = resolve_paths(folder, name, cfg.images_prefix, cfg.reroot_urls, "illum ")
        reasons.add(why, full)
        illums[ch] = pc.if_else(empty, pa.scalar(None, pa.string()), uri_arr)

    batch, batch_from = _batch_column(t, uri, n, loc_batch, path_batch, cfg.default_batch)
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
    every = [*channels, *optional]
    cols.update({f"uri_{c}": uris[c] for c in every})
    cols.update({f"illum_{c}": illums[c] for c in every})
    table = pa.table(cols, schema=candidate_schema(every)).filter(keep)
    # Sort here, in parallel and cache-friendly, so that the global (batch, plate, well, site) order is usually the
    # concatenation order already (CSV files sorted by <BATCH>/<BARCODE>) and the final reordering of millions of
    # URIs can be skipped. "row" breaks ties: the first of repeated rows stays first.
    order = pc.sort_indices(table, sort_keys=[(k, "ascending") for k in ("batch", "plate", "well", "site", "row")])
    if not np.array_equal(order.to_numpy(), np.arange(table.num_rows)):
        table = table.take(order)
    return table, exclusions, not_selected, batch_from


def gather_load_data(cfg: DataConfig, channels: Sequence[str], csvs: Sequence[str],
                     optional: Sequence[str] = ()) -> Gathered:
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
    wanted = _column_names([*channels, *optional])

    # Fetches run on cfg.list_workers threads; parsing (CPU-bound, pyarrow releases the GIL) on at most one per core.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpu_slots = threading.BoundedSemaphore(max(1, cores))

    def one(args: tuple[int, str]):
        src, uri = args
        data = storage.read_bytes(uri)
        with cpu_slots:
            t, header = _read_csv(uri, data, wanted)
            del data
            table, excl, ns, batch_from = _process_csv(t, header, uri, src, cfg, channels, optional)
        return t.num_rows, table, excl, ns, batch_from

    with Progress("discover: load_data CSVs", total=len(chosen), unit="csv") as bar:
        results = storage.map_parallel(bar.counted(one), list(enumerate(chosen)), max_workers=cfg.list_workers)
    tables, exclusions, rows_read = [], [], 0
    batch_from = Counter()
    for n, table, excl, ns, bf in results:
        batch_from.update(bf)
        rows_read += n
        tables.append(table)
        exclusions.extend(excl)
        not_selected.update(ns)
    schema = candidate_schema([*channels, *optional])
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    # rows read per source of their batch (see _batch_column)
    inputs = {"csv_files": list(chosen), "csv_not_selected": csv_not_selected, "batch_from": dict(batch_from)}
    return Gathered(table, list(chosen), exclusions, not_selected, rows_read, inputs)
