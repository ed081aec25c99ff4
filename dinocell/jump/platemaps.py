"""Reading plate maps: what was put in each well, as (perturbation, control_type, target) per (batch, plate, well).

Two sources (dinocell.jump.plate_metadata puts the result into the manifest):

- **the gallery's maps** (cpg0000 JUMP-Target-1 layout), per batch under `<source_root>/workspace/metadata/`:
  `platemaps/<BATCH>/barcode_platemap.csv` (Assay_Plate_Barcode, Plate_Map_Name), `platemaps/<BATCH>/platemap/<NAME>.txt`
  (tab-separated: plate_map_name, well_position, broad_sample, solvent; pert_iname / target / control_type columns are
  used when a map has them) and, when present, every file in `external_metadata/` (tab-separated: broad_sample,
  pert_iname, target, pert_type, control_type), joined on broad_sample. A map's own metadata file
  (`<NAME>_metadata.tsv`, or `<NAME without _platemap>_metadata.tsv` as in cpg0000) is searched first, then the other
  files in URI order; the first row for a broad_sample wins.
- **a user CSV** (`data.plate_metadata`): columns plate (or Metadata_Plate), well (or Metadata_Well / well_position),
  perturbation, and optionally control_type, target, batch (or Metadata_Batch). Without a batch column a plate's
  entries apply in every batch. It replaces the gallery's maps.

Values: `perturbation` = pert_iname, else broad_sample; a solvent-only well (empty broad_sample, as DMSO wells are in the
real maps) without a metadata row is the solvent (e.g. "DMSO"). `control_type`: JUMP's values are folded into
"negcon" (negcon...), "poscon" (poscon_cp, poscon_diverse, ...) or "" (trt, empty); a well whose perturbation is the
solvent (or "DMSO") with no control_type given is "negcon". Other control_type values are counted (`unknown_control`)
in the gallery's files and an error in a user CSV. Delimiter: tab if the header line holds one, else comma; .gz files
are decompressed.

Errors (`DiscoveryError`, naming the file, the column and the row): a missing required column, a bad well name, two
different entries for one well, a plate with two maps. A batch without maps is not an error: its plates stay unmapped
with a reason, and the summary counts them.
"""

from __future__ import annotations

import csv
import gzip
import io
import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dinocell import storage
from dinocell.jump import layout
from dinocell.jump.exclusions import DiscoveryError

__all__ = [
    "PlateMaps",
    "normalise_control_type",
    "read_gallery_maps",
    "read_table",
    "read_user_metadata",
]

Entry = tuple[str, str, str]  # (perturbation, control_type, target)
DEFAULT_SOLVENT = "DMSO"


@dataclass
class PlateMaps:
    """Entries per plate; `plates` keys are (batch, plate), batch None for a user CSV without a batch column."""

    source: str  # "gallery" or "data.plate_metadata"
    plates: dict[tuple[str | None, str], dict[str, Entry]] = field(default_factory=dict)
    reasons: dict[tuple[str, str | None], str] = field(default_factory=dict)  # why a (batch, plate|None) has no map
    files: list[str] = field(default_factory=list)
    unknown_control: Counter = field(default_factory=Counter)
    listing_errors: list[str] = field(default_factory=list)  # prefixes the store refused to list, with the error

    def entries(self, batch: str, plate: str) -> dict[str, Entry] | None:
        found = self.plates.get((batch, plate))
        return found if found is not None else self.plates.get((None, plate))

    def reason(self, batch: str, plate: str) -> str:
        return self.reasons.get((batch, plate)) or self.reasons.get((batch, None)) or f"plate not in {self.source}"


# --------------------------------------------------------------------------- parsing


def read_table(uri: str, data: bytes | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a small delimited text file; every value a stripped string."""
    data = storage.read_bytes(uri) if data is None else data
    if uri.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except OSError as e:
            raise DiscoveryError(f"{uri}: not a gzip file: {e}") from e
    text = data.decode("utf-8-sig", errors="replace")
    first = text.split("\n", 1)[0]
    if not first.strip():
        raise DiscoveryError(f"{uri}: empty file (no header line)")
    reader = csv.reader(io.StringIO(text), delimiter="\t" if "\t" in first else ",")
    header = [h.strip() for h in next(reader)]
    dupes = sorted(h for h, n in Counter(header).items() if n > 1)
    if dupes:
        raise DiscoveryError(f"{uri}: duplicate column names {dupes}")
    rows = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue  # blank line
        if len(values) > len(header):
            raise DiscoveryError(f"{uri}: row {len(rows) + 1} has {len(values)} values for {len(header)} columns")
        rows.append({h: (values[i].strip() if i < len(values) else "") for i, h in enumerate(header)})
    return header, rows


def _column(uri: str, header: Sequence[str], names: Sequence[str], required: bool = True) -> str | None:
    for n in names:
        if n in header:
            return n
    if required:
        want = " or ".join(repr(n) for n in names)
        raise DiscoveryError(f"{uri}: no column {want} (columns: {list(header)})")
    return None


def _well(uri: str, row: int, column: str, value: str) -> str:
    try:
        return layout.well_name(*layout.well_row_col(value))
    except ValueError:
        raise DiscoveryError(f"{uri}: row {row}: column {column}: {value!r} is not a well name (e.g. A01)") from None


def normalise_control_type(value: str) -> str | None:
    """JUMP's control_type -> "negcon" / "poscon" / ""; None when it is none of these."""
    v = value.strip().lower()
    if v.startswith("negcon"):
        return "negcon"
    if v.startswith("poscon"):
        return "poscon"
    return "" if v in ("", "trt", "treatment") else None


def _put(wells: dict[str, Entry], uri: str, row: int, well: str, entry: Entry) -> None:
    old = wells.get(well)
    if old is not None and old != entry:
        raise DiscoveryError(f"{uri}: row {row}: well {well} listed twice with different entries ({old} and {entry})")
    wells[well] = entry


# --------------------------------------------------------------------------- the gallery's maps


def _read_external(uris: Sequence[str]) -> dict[str, dict[str, dict[str, str]]]:
    """uri -> broad_sample -> {pert_iname, target, control_type}."""
    out = {}
    for uri in uris:
        header, rows = read_table(uri)
        key = _column(uri, header, ["broad_sample"])
        table: dict[str, dict[str, str]] = {}
        for i, r in enumerate(rows, 1):
            value = {k: r.get(k, "") for k in ("pert_iname", "target", "control_type")}
            old = table.setdefault(r[key], value)
            if old != value:
                raise DiscoveryError(f"{uri}: row {i}: broad_sample {r[key]!r} listed twice with different metadata")
        out[uri] = table
    return out


def _metadata_order(name: str, uris: Sequence[str]) -> list[str]:
    """The external metadata files for plate map `name`: its own file(s) first, then the others in URI order."""
    stems = {f"{name}_metadata", f"{name.removesuffix('_platemap')}_metadata"}
    own = [u for u in uris if posixpath.basename(u).split(".", 1)[0] in stems]
    return own + [u for u in sorted(uris) if u not in own]


def _resolve(row: dict[str, str], broad: str, meta: dict[str, str] | None, unknown: Counter) -> Entry:
    meta = meta or {}
    solvent = row.get("solvent", "")
    pert = row.get("pert_iname") or meta.get("pert_iname") or broad or solvent
    target = row.get("target") or meta.get("target") or ""
    raw = row.get("control_type") or meta.get("control_type") or ""
    ctrl = normalise_control_type(raw)
    if ctrl is None:
        unknown[raw] += 1
        ctrl = ""
    if not raw and pert and pert.upper() in {(solvent or DEFAULT_SOLVENT).upper(), DEFAULT_SOLVENT}:
        ctrl = "negcon"  # a well holding only the solvent is a negative control
    return pert, ctrl, target


def _read_platemap(uri: str, externals: Sequence[dict], unknown: Counter) -> dict[str, Entry]:
    header, rows = read_table(uri)
    wcol = _column(uri, header, ["well_position"])
    bcol = _column(uri, header, ["broad_sample"])
    wells: dict[str, Entry] = {}
    for i, r in enumerate(rows, 1):
        well = _well(uri, i, wcol, r[wcol])
        broad = r[bcol]
        meta = next((t[broad] for t in externals if broad in t), None)
        _put(wells, uri, i, well, _resolve(r, broad, meta, unknown))
    return wells


def _listing(prefix: str, maps: PlateMaps, batch: str | None = None) -> set[str]:
    """The objects under `prefix`; a listing refused by the store leaves the batch unmapped with the error as reason."""
    try:
        return {o.uri for o in storage.list_objects(prefix)}
    except storage.StorageError as e:
        maps.listing_errors.append(f"{prefix}: {e}")
        return set()


def _gallery_batch(root: str, batch: str, meta_uris: Sequence[str], read_external, maps: PlateMaps) -> bool:
    """Read one batch's maps under `root` into `maps`; False when that root has no barcode_platemap.csv for it."""
    folder = storage.join(root, "workspace", "metadata", "platemaps", batch)
    present = _listing(folder + "/", maps, batch)
    barcode_uri = storage.join(folder, "barcode_platemap.csv")
    if barcode_uri not in present:
        return False
    header, rows = read_table(barcode_uri)
    pcol = _column(barcode_uri, header, ["Assay_Plate_Barcode"])
    ncol = _column(barcode_uri, header, ["Plate_Map_Name"])
    maps.files.append(barcode_uri)
    map_of: dict[str, str] = {}
    for i, r in enumerate(rows, 1):
        plate, name = r[pcol], r[ncol]
        if not plate or not name:
            raise DiscoveryError(f"{barcode_uri}: row {i}: empty {pcol if not plate else ncol}")
        if map_of.setdefault(plate, name) != name:
            raise DiscoveryError(f"{barcode_uri}: row {i}: plate {plate} has two plate maps ({map_of[plate]}, {name})")
    parsed: dict[str, dict[str, Entry] | None] = {}
    for name in sorted(set(map_of.values())):
        uri = storage.join(folder, "platemap", f"{name}.txt")
        if uri not in present:
            parsed[name] = None
            continue
        externals = [read_external(u) for u in _metadata_order(name, meta_uris)]
        parsed[name] = _read_platemap(uri, externals, maps.unknown_control)
        maps.files.append(uri)
    for plate, name in map_of.items():
        if parsed[name] is None:
            maps.reasons[(batch, plate)] = f"plate map {storage.join(folder, 'platemap', name + '.txt')} not found"
        else:
            maps.plates[(batch, plate)] = parsed[name]
    maps.reasons[(batch, None)] = f"plate not in {barcode_uri}"
    return True


def read_gallery_maps(roots: Sequence[str], batches: Iterable[str]) -> PlateMaps:
    """The gallery's maps of `batches`; for each batch the first source root (in order) that has them is used."""
    maps = PlateMaps("gallery")
    meta_files: dict[str, list[str]] = {}
    cache: dict[str, dict] = {}

    def read_external(uri: str) -> dict:
        if uri not in cache:
            cache[uri] = _read_external([uri])[uri]
            maps.files.append(uri)
        return cache[uri]

    for batch in sorted(set(batches)):
        for root in roots:
            if root not in meta_files:
                prefix = storage.join(root, "workspace", "metadata", "external_metadata") + "/"
                meta_files[root] = sorted(u for u in _listing(prefix, maps) if u.lower().endswith((".tsv", ".txt", ".csv")))
            if _gallery_batch(root, batch, meta_files[root], read_external, maps):
                break
        else:
            where = " or ".join(storage.join(r, "workspace", "metadata", "platemaps", batch) for r in roots)
            errors = f" (listing failed: {'; '.join(maps.listing_errors)})" if maps.listing_errors else ""
            maps.reasons[(batch, None)] = f"no barcode_platemap.csv under {where or '(no source root)'}{errors}"
    return maps


# --------------------------------------------------------------------------- a user CSV


def read_user_metadata(uri: str) -> PlateMaps:
    """`data.plate_metadata`: entries per (batch or None, plate) (see the module docstring)."""
    header, rows = read_table(uri)
    pcol = _column(uri, header, ["plate", "Metadata_Plate"])
    wcol = _column(uri, header, ["well", "Metadata_Well", "well_position"])
    pert_col = _column(uri, header, ["perturbation", "Metadata_perturbation"])
    ccol = _column(uri, header, ["control_type", "Metadata_control_type"], required=False)
    tcol = _column(uri, header, ["target", "Metadata_target"], required=False)
    bcol = _column(uri, header, ["batch", "Metadata_Batch"], required=False)
    maps = PlateMaps("data.plate_metadata", files=[uri])
    for i, r in enumerate(rows, 1):
        if not r[pcol]:
            raise DiscoveryError(f"{uri}: row {i}: column {pcol} is empty")
        well = _well(uri, i, wcol, r[wcol])
        raw = r[ccol] if ccol else ""
        ctrl = normalise_control_type(raw)
        if ctrl is None:
            raise DiscoveryError(
                f"{uri}: row {i}: column {ccol}: {raw!r} is not a control type (negcon, poscon or empty)"
            )
        batch = (r[bcol] or None) if bcol else None
        _put(maps.plates.setdefault((batch, r[pcol]), {}), uri, i, well, (r[pert_col], ctrl, r[tcol] if tcol else ""))
    return maps
