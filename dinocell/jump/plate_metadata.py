"""The manifest's plate-map columns (`perturbation`, `control_type`, `target`) for the kept fields, and what could not be
annotated, for the discovery summary.

Where the maps come from (dinocell.jump.platemaps): `data.plate_metadata` when set, else the gallery's maps of every
batch in the manifest, searched under the source root of `data.images_prefix` and then under the source root of each
load_data CSV (the part before `workspace/load_data_csv/`). A plate without a map or a well without an entry keeps ""
in the three columns and is counted: `plate_maps` in the summary lists the plates with the reason and counts the
wells and fields without an entry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from dinocell.config import DataConfig
from dinocell.jump import layout
from dinocell.jump.field_keys import FieldKeys
from dinocell.jump.manifest import METADATA_COLUMNS
from dinocell.jump.platemaps import PlateMaps, read_gallery_maps, read_user_metadata

__all__ = ["annotate_plate_maps", "source_roots"]

_EXAMPLES = 20  # wells without an entry listed by name in the summary


def source_roots(images_prefix: str, csv_uris: Sequence[str]) -> list[str]:
    """Where `workspace/metadata/` may be: the images prefix's source root, then each load_data CSV's (in order)."""
    roots = []
    try:
        roots.append(layout.source_root_of_images_prefix(images_prefix))
    except ValueError:
        pass
    for uri in csv_uris:
        head, sep, _ = uri.replace("\\", "/").partition("/workspace/load_data_csv/")
        if sep and head not in roots:
            roots.append(head)
    return roots


def annotate_plate_maps(
    cfg: DataConfig, keys: FieldKeys, kept: np.ndarray, group: np.ndarray, csv_uris: Sequence[str]
) -> tuple[dict[str, pa.Array], dict]:
    """The three metadata columns for the kept rows (dictionary-encoded) and the summary's `plate_maps` entry.

    `kept`: row indices into the candidate table; `group`: their (batch, plate) group (`keys.group[kept]`).
    """
    groups = np.unique(group).tolist()
    if cfg.plate_metadata:
        maps = read_user_metadata(cfg.plate_metadata)
    else:
        maps = read_gallery_maps(source_roots(cfg.images_prefix, csv_uris), {keys.plates[i][0] for i in groups})
    n_wells = max(len(keys.wells), 1)
    well_code = {w: i for i, w in enumerate(keys.wells)}
    values = {c: {"": 0} for c in METADATA_COLUMNS}
    slot = {c: np.zeros(len(keys.plates) * n_wells, dtype=np.int32) for c in METADATA_COLUMNS}
    has_entry = np.zeros(len(keys.plates) * n_wells, dtype=bool)
    no_map: dict[str, str] = {}
    for g in groups:
        batch, plate = keys.plates[g]
        entries = maps.entries(batch, plate)
        if entries is None:
            no_map[f"{batch}/{plate}"] = maps.reason(batch, plate)
            continue
        for well, entry in entries.items():
            w = well_code.get(well)
            if w is None:
                continue  # no field of this well was discovered
            has_entry[g * n_wells + w] = True
            for c, v in zip(METADATA_COLUMNS, entry):
                slot[c][g * n_wells + w] = values[c].setdefault(v, len(values[c]))
    row_slot = group * n_wells + keys.well[kept]
    columns = {
        c: pa.DictionaryArray.from_arrays(pa.array(slot[c][row_slot]), pa.array(list(values[c]), pa.string()))
        for c in METADATA_COLUMNS
    }
    summary = _summary(maps, keys, group, row_slot, has_entry, no_map, columns, n_wells)
    return columns, summary


def _summary(maps: PlateMaps, keys, group, row_slot, has_entry, no_map, columns, n_wells) -> dict:
    unmapped_groups = {i for i, (b, p) in enumerate(keys.plates) if f"{b}/{p}" in no_map}
    in_mapped = ~np.isin(group, list(unmapped_groups)) if unmapped_groups else np.ones(len(group), dtype=bool)
    missing = in_mapped & ~has_entry[row_slot]
    missing_slots = np.unique(row_slot[missing])
    examples = []
    for s in missing_slots[:_EXAMPLES].tolist():
        b, p = keys.plates[s // n_wells]
        examples.append(f"{b}/{p}/{keys.wells[s % n_wells]}")
    annotated = in_mapped & ~missing
    ctrl = columns["control_type"]
    codes = ctrl.indices.to_numpy()[annotated]
    counts = Counter({v: int(np.count_nonzero(codes == i)) for i, v in enumerate(ctrl.dictionary.to_pylist())})
    pert = columns["perturbation"]
    used = np.unique(pert.indices.to_numpy()[annotated]).tolist()
    names = pert.dictionary.to_pylist()
    return {
        "source": maps.source,
        "files": list(maps.files),
        "plates": int(len(np.unique(group))),
        "plates_with_map": int(len(np.unique(group))) - len(no_map),
        "plates_without_map": len(no_map),
        "plates_without_map_reasons": dict(sorted(no_map.items())),
        "wells_without_entry": int(len(missing_slots)),
        "fields_without_entry": int(np.count_nonzero(missing)),
        "wells_without_entry_examples": examples,
        "fields_per_control_type": {
            "negcon": counts["negcon"], "poscon": counts["poscon"], "treatment": counts[""],
            "unannotated": int(len(group) - np.count_nonzero(annotated)),
        },  # fmt: skip
        "perturbations": len([i for i in used if names[i]]),
        "unknown_control_types": dict(maps.unknown_control),
        "listing_errors": list(maps.listing_errors),
    }
