"""Listing mode: discovery by parallel, paginated listing of the image folders, keys grouped into fields.

Lists `<images_prefix>/<BATCH>/images/<PLATE_DIR>/Images/` (one parallel listing per plate folder), parses Phenix
file names and groups them by (batch, plate, row, column, site), never by file name alone. chN is mapped to a channel
with the given channel numbers (they differ between sources: load_data mode is the canonical one).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import pyarrow as pa

from dinocell import storage
from dinocell.config import DataConfig
from dinocell.jump import layout
from dinocell.jump.candidates import Gathered, candidate_schema
from dinocell.jump.exclusions import (
    BAD_WELL,
    DUPLICATE,
    STRAY_FILE,
    UNPARSABLE_NAME,
    UNPARSABLE_PLATE_DIR,
    DiscoveryError,
    Exclusion,
    missing_channel,
)
from dinocell.progress import Progress

IMAGE_EXTENSIONS = (".tif", ".tiff")


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


def gather_listing(cfg: DataConfig, channels: Sequence[str], numbers: Mapping[str, int]) -> Gathered:
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
    with Progress("discover: plate listings", total=len(images_dirs), unit="plate") as bar:
        listings = storage.map_parallel(bar.counted(lambda d: [o.uri for o in storage.list_objects(d)]),
                                        images_dirs, max_workers=cfg.list_workers)
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
    table = pa.table(cols, schema=candidate_schema(channels))
    inputs = {
        "batches": batches,
        "plate_folders": len(plates),
        "keys_listed": keys_listed,
        "ignored_files": dict(ignored),
        "channel_numbers": {c: numbers[c] for c in channels},
    }
    return Gathered(table, images_dirs, exclusions, not_selected, field_groups, inputs)
