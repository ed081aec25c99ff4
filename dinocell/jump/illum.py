"""Illumination files of the kept fields: the CSV's `Illum` columns where given, else the layout's convention
(`images/<BATCH>/illum/<PLATE>/<PLATE>_Illum<Ch>.npy`), recorded only for the objects that exist (the illum folder of
each such plate is listed once). No illum file -> "" in the manifest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinocell import storage
from dinocell.config import DataConfig
from dinocell.jump import layout
from dinocell.jump.candidates import as_array
from dinocell.jump.field_keys import FieldKeys


def layout_illum(cfg: DataConfig, plates: Sequence[tuple[str, str]], channels: Sequence[str]) -> dict:
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


def fill_layout_illum(
    cfg: DataConfig, final: pa.Table, keys: FieldKeys, group: np.ndarray, channels: Sequence[str]
) -> tuple[dict, Counter]:
    """Illum URI column per channel for the kept rows (`final`, plate group per row in `group`), and plates per illum
    status: where the CSV gave none, the layout's files that exist (one listing per plate), else ""."""
    illum = {c: final.column(f"illum_{c}") for c in channels}  # left chunked: combining copies gigabytes at 3M
    need: set[int] = set()
    for c in channels:
        if illum[c].null_count:
            missing = as_array(pc.is_null(illum[c])).to_numpy(zero_copy_only=False)
            need |= set(np.unique(group[missing]).tolist())
    found = layout_illum(cfg, [keys.plates[i] for i in sorted(need)], channels)
    for c in channels:
        if illum[c].null_count:
            fill = pa.array([found.get(bp, {}).get(c) for bp in keys.plates], pa.string()).take(pa.array(group))
            illum[c] = pc.coalesce(as_array(illum[c]), fill, pa.scalar(""))
    illum_status = Counter()
    for i in np.unique(group).tolist():
        bp = keys.plates[i]
        if bp not in found:
            illum_status["from CSV"] += 1
        elif len(found[bp]) == len(channels):
            illum_status["from layout"] += 1
        else:
            illum_status["partial" if found[bp] else "none"] += 1
    return illum, illum_status
