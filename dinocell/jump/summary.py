"""The discovery summary: fields per batch / plate / split, not-selected counts, exclusions counted by reason and
listed, as a JSON-ready dict (`build_summary`) and as a readable text table (`format_summary`).
"""

from __future__ import annotations

from collections import Counter

from dinocell.jump.candidates import Gathered
from dinocell.jump.manifest import Manifest


def build_summary(
    cfg, channels, mode, g: Gathered, manifest: Manifest, per_plate, exclusions, not_selected, split_of, illum_status,
    plate_maps=None,
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
        "plate_maps": plate_maps or {},
        "excluded_total": len(exclusions),
        "excluded_by_reason": dict(sorted(by_reason.items())),
        "excluded": [e.to_dict() for e in exclusions],
    }


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
    pm = summary.get("plate_maps")
    if pm:
        per = pm["fields_per_control_type"]
        lines.append(
            f"plate maps ({pm['source']}): {pm['plates_with_map']} of {pm['plates']} plate(s) mapped, "
            f"{pm['perturbations']} perturbation(s); fields: {per['negcon']:,} negcon, {per['poscon']:,} poscon, "
            f"{per['treatment']:,} treatment, {per['unannotated']:,} without an entry"
        )
        for plate, why in list(pm["plates_without_map_reasons"].items())[:max_exclusions]:
            lines.append(f"  no plate map for {plate}: {why}")
        if pm["wells_without_entry"]:
            shown = ", ".join(pm["wells_without_entry_examples"])
            lines.append(f"  {pm['wells_without_entry']:,} well(s) missing from their plate map: {shown}")
        if pm["unknown_control_types"]:
            lines.append(f"  control_type values not understood (left empty): {pm['unknown_control_types']}")
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
