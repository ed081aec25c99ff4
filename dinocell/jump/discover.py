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
`images/<BATCH>/` part of the first requested channel's path, else `data.default_batch`, else the name of the folder
holding the CSV (a user's own export outside the gallery layout: `exports/run1/load_data.csv` -> batch `run1`); the
summary counts rows per source (`inputs.batch_from`). Only a CSV with no folder at all is excluded ("no batch"). Plate:
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

Plate maps: the manifest's `perturbation`, `control_type` and `target` columns come from the gallery's plate maps
(`workspace/metadata/platemaps/<BATCH>/`, `external_metadata/`) or from the CSV `data.plate_metadata`
(dinocell.jump.platemaps, .plate_metadata); a plate without a map or a well without an entry keeps "" there and is
counted in the summary's `plate_maps`. Channels: load_data mode takes any channel names in `data.channels` (e.g.
Actin, Mito, Phase) from the `URL_Orig<Ch>` / `FileName_Orig<Ch>` columns; listing mode needs a chN for each.

Summary (`DiscoveryResult.summary`, written as JSON beside the manifest): mode, inputs (CSV files read / skipped / not
selected, or plate folders and keys listed), `rows_read` (CSV rows, or field groups found by listing), `fields`,
`fields_per_batch`, `fields_per_plate` ({batch: {plate: n}}), `fields_per_split`, `plates_per_split`, `not_selected`,
`illum_plates`, `plate_maps`, `excluded_total`, `excluded_by_reason` and `excluded` (every entry). In load_data mode
rows_read = fields + excluded_total + sum(not_selected).

Code: this module holds the entry points (`discover_fields`, `write_discovery`), the result type and the final
assembly of the manifest; the work is done in dinocell.jump.load_data_files (which CSVs), .load_data (parsing them),
.reroot (path resolution), .listing (listing mode), .candidates (the table both modes produce), .field_keys,
.selection (de-duplication, `max_fields`), .illum (layout illumination files), .summary and .exclusions (reasons,
`DiscoveryError`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinocell import storage
from dinocell.config import DataConfig
from dinocell.jump import layout
from dinocell.jump.candidates import Gathered, as_array
from dinocell.jump.exclusions import DiscoveryError, Exclusion
from dinocell.jump.field_keys import FieldKeys, dictionary_column, field_ids
from dinocell.jump.illum import fill_layout_illum
from dinocell.jump.listing import gather_listing
from dinocell.jump.load_data import gather_load_data
from dinocell.jump.load_data_files import LOAD_DATA_NAMES, csv_location, find_load_data_csvs
from dinocell.jump.manifest import Manifest, assign_splits
from dinocell.jump.plate_metadata import annotate_plate_maps
from dinocell.jump.reroot import reroot_path
from dinocell.jump.selection import dedupe, select_max_fields
from dinocell.jump.summary import build_summary, format_summary
from dinocell.log import get_logger

log = get_logger(__name__)

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

    optional: list[str] = []
    if mode == "load_data":
        optional = [c for c in dict.fromkeys(cfg.eval_channels) if c not in channels]
        gathered = gather_load_data(cfg, channels, csvs, optional)
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
        gathered = gather_listing(cfg, channels, numbers)
    return _finish(cfg, channels, mode, gathered, optional)


def _has_source_root(images_prefix: str) -> bool:
    try:
        layout.source_root_of_images_prefix(images_prefix)
        return True
    except ValueError:
        return False


def _finish(cfg: DataConfig, channels: Sequence[str], mode: str, g: Gathered,
            optional: Sequence[str] = ()) -> DiscoveryResult:
    table = g.table
    keys = FieldKeys.of(table)
    kept, dup_exclusions = dedupe(table, keys, g.sources, mode)
    exclusions = g.exclusions + dup_exclusions

    # Split over every plate with fields (before max_fields, so a plate's split does not depend on the subset size).
    present = np.unique(keys.group[kept])
    split_of = assign_splits(
        sorted({keys.plates[i][1] for i in present}), cfg.val_plates, cfg.val_fraction, cfg.split_seed
    )
    not_selected = Counter(g.not_selected)
    if cfg.max_fields and len(kept) > cfg.max_fields:
        picked = select_max_fields(keys, kept, cfg.max_fields, cfg.split_seed)
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

    # Evaluation-only channels stay when every kept field has them (a partly present channel would break its rows).
    eval_channels = {"kept": [], "dropped": {}}
    for c in optional:
        missing = final.column(f"uri_{c}").null_count
        if missing == 0 and final.num_rows:
            eval_channels["kept"].append(c)
        else:
            eval_channels["dropped"][c] = int(missing)
    if eval_channels["dropped"]:
        log.info("discover: evaluation channels not kept (fields without them): %s", eval_channels["dropped"])
    channels = [*channels, *eval_channels["kept"]]
    # Illumination: where the CSV gave none, the layout's files that exist (one listing per plate).
    illum, illum_status = fill_layout_illum(cfg, final, keys, group, channels)
    arrays = {
        "field_id": field_ids(keys, kept),
        "batch": dictionary_column(batch_code[group], batch_names),
        "plate": dictionary_column(plate_code[group], plate_names),
        "well": final.column("well"),
        "site": final.column("site"),
        "split": dictionary_column(split_code[group], ["train", "val"]),
    }
    arrays.update({f"uri_{c}": final.column(f"uri_{c}") for c in channels})
    # Illum URIs repeat per plate: dictionary-encode them (about 1.8 GB less memory at 3M fields).
    arrays.update({f"illum_{c}": pc.dictionary_encode(as_array(illum[c])) for c in channels})
    metadata, plate_maps = annotate_plate_maps(cfg, keys, kept, group, g.sources if mode == "load_data" else [])
    arrays.update(metadata)
    manifest = Manifest(pa.table(arrays), channels)
    per_group = np.bincount(group, minlength=len(keys.plates))
    per_plate: dict[str, dict[str, int]] = {}
    for (b, p), n in zip(keys.plates, per_group.tolist()):
        if n:
            per_plate.setdefault(b, {})[p] = n
    summary = build_summary(
        cfg, channels, mode, g, manifest, per_plate, exclusions, not_selected, split_of, illum_status, plate_maps
    )
    summary["eval_channels"] = eval_channels
    return DiscoveryResult(manifest, summary, exclusions)


def write_discovery(result: DiscoveryResult, manifest_uri: str, summary_uri: str | None = None) -> str:
    """Write the manifest (Parquet) and the summary JSON (default `<manifest>.summary.json`); returns the summary URI."""
    if not manifest_uri:
        raise ValueError("write_discovery: the manifest URI is empty (set data.manifest)")
    summary_uri = summary_uri or f"{manifest_uri}.summary.json"
    result.manifest.write(manifest_uri)
    storage.write_text(summary_uri, result.to_json() + "\n")
    return summary_uri
