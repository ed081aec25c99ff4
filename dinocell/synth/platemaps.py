"""The plate-map metadata of a synthetic bucket, in the cpg0000 JUMP-Target-1 layout:

    workspace/metadata/platemaps/<BATCH>/barcode_platemap.csv      Assay_Plate_Barcode,Plate_Map_Name
    workspace/metadata/platemaps/<BATCH>/platemap/<NAME>.txt       plate_map_name, well_position, broad_sample, solvent
    workspace/metadata/external_metadata/<NAME>_metadata.tsv       broad_sample, pert_iname, target, pert_type,
                                                                   control_type

(tab-separated except barcode_platemap.csv). As in the real files, DMSO wells have an empty broad_sample and the
metadata's row with an empty broad_sample names them (pert_iname DMSO, pert_type control, control_type negcon).
"""

from __future__ import annotations

from dinocell import storage
from dinocell.jump import layout
from dinocell.synth.plan import SynthPlan

__all__ = ["PLATEMAP_NAME", "SOLVENT", "external_metadata_object", "platemap_objects"]

PLATEMAP_NAME = "SYNTH-PLATEMAP-1"
SOLVENT = "DMSO"


def _tsv(header: list[str], rows: list[list[str]]) -> bytes:
    for r in rows:  # a tab or newline in a value would shift columns: the plan never makes one
        if any("\t" in v or "\n" in v for v in r):
            raise ValueError(f"synth: plate-map value with a tab or newline: {r}")
    return ("\n".join("\t".join(r) for r in [header, *rows]) + "\n").encode()


def platemap_objects(plan: SynthPlan, batch: str, source_root: str) -> list[tuple[str, bytes]]:
    """A batch's barcode_platemap.csv and its plate map, as (uri, bytes)."""
    pm_root = storage.join(source_root, "workspace", "metadata", "platemaps", batch)
    barcodes = [p.barcode for p in plan.plates if p.batch == batch]
    text = "Assay_Plate_Barcode,Plate_Map_Name\n" + "".join(f"{b},{PLATEMAP_NAME}\n" for b in barcodes)
    rows = []
    for r, c in sorted(plan.wells):
        well = layout.well_name(r, c)
        rows.append([PLATEMAP_NAME, well, plan.perturbation(well).broad_sample, SOLVENT])
    txt = _tsv(["plate_map_name", "well_position", "broad_sample", "solvent"], rows)
    return [
        (storage.join(pm_root, "barcode_platemap.csv"), text.encode()),
        (storage.join(pm_root, "platemap", f"{PLATEMAP_NAME}.txt"), txt),
    ]


def external_metadata_object(plan: SynthPlan, source_root: str) -> tuple[str, bytes]:
    """The perturbation metadata of the plate map (one row per perturbation, DMSO first), as (uri, bytes)."""
    uri = storage.join(source_root, "workspace", "metadata", "external_metadata", f"{PLATEMAP_NAME}_metadata.tsv")
    rows = [[p.broad_sample, p.name, p.target, p.pert_type, p.control_type] for p in plan.layout.perturbations]
    return uri, _tsv(["broad_sample", "pert_iname", "target", "pert_type", "control_type"], rows)
