"""The profiling section of the evaluation report: copairs mAP per model, with the pixel baseline and deltas.

Reads `metrics["profiling"]` (dinocell.eval.profiling) and renders it for the printed table, summary.md,
report.html and the KFP scalars (`profiling.<model_id>.<metric>`, `profiling.delta_vs_pixels.<metric>`,
`profiling.delta_vs_init.<metric>`).
"""

from __future__ import annotations

import html

from dinocell.eval.profiling import CELLPROFILER_ID, headline

__all__ = ["profiling_html", "profiling_markdown", "profiling_scalars", "profiling_table"]

METRICS = (
    ("activity_map", "activity mAP"),
    ("activity_fraction_retrieved", "retrieved (activity)"),
    ("activity_null_map", "null mAP"),
    ("activity_map_same_position_included", "mAP incl. same position"),
    ("consistency_map", "consistency mAP"),
    ("consistency_fraction_retrieved", "retrieved (consistency)"),
    ("consistency_null_map", "null mAP (consistency)"),
)
_DELTA_METRICS = ("activity_map", "activity_fraction_retrieved", "consistency_map", "consistency_fraction_retrieved")
_INIT_IDS = ("initial_weights", "baseline")

EXPLANATION = (
    "Profiling, the JUMP consortium's standard: every field of whole held-out plates embedded (tiles of the view "
    "size, channels concatenated), averaged per well, normalised per plate against its negative-control wells, "
    "scored with copairs. Activity: each perturbation's replicate wells retrieved against negative controls "
    "(pairs in the same well position are excluded: plate layout would leak); retrieved = fraction of "
    "perturbations with corrected p < 0.05. Consistency: perturbations sharing a target retrieve each other. "
    "Null mAP: the expected mAP of a random ranking. The column 'incl. same position' shows the leaky variant."
)


def _section(metrics: dict) -> dict | None:
    sec = metrics.get("profiling")
    return sec if isinstance(sec, dict) else None


def _rows(metrics: dict) -> list[dict]:
    sec = _section(metrics)
    return headline(sec) if sec and "models" in sec else []


# The difference rows under the table: (key in _deltas, title in the printed table, title in the HTML report)
DELTA_ROWS = (
    ("delta_vs_pixels", "checkpoint - best pixels", "Δ checkpoint − best pixel baseline"),
    ("delta_vs_init", "checkpoint - init", "Δ checkpoint − initial weights"),
    ("delta_vs_cellprofiler", "checkpoint - CellProfiler", "Δ checkpoint − CellProfiler"),
)


def _deltas(rows: list[dict], models: dict) -> dict[str, dict[str, float | None]]:
    """Checkpoint minus the best pixel baseline / the initial weights / CellProfiler, per metric."""
    by_id = {r["model"]: r for r in rows}
    ck = by_id.get("checkpoint")
    out: dict[str, dict[str, float | None]] = {kind: {} for kind, _, _ in DELTA_ROWS}
    if ck is None:
        return out
    pixels = [r for mid, r in by_id.items() if mid.startswith("pixels_")]
    init = next((by_id[m] for m in _INIT_IDS if m in by_id), None)
    cp = by_id.get(CELLPROFILER_ID)
    for m in _DELTA_METRICS:
        if ck.get(m) is None:
            continue
        best = [r[m] for r in pixels if r.get(m) is not None]
        out["delta_vs_pixels"][m] = ck[m] - max(best) if best else None
        for kind, other in (("delta_vs_init", init), ("delta_vs_cellprofiler", cp)):
            out[kind][m] = ck[m] - other[m] if other is not None and other.get(m) is not None else None
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _label(metrics: dict, mid: str) -> str:
    return metrics.get("models", {}).get(mid, {}).get("label", mid)


def profiling_scalars(metrics: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    rows = _rows(metrics)
    for r in rows:
        for m, _ in METRICS:
            if r.get(m) is not None:
                out[f"profiling.{r['model']}.{m}"] = float(r[m])
    for kind, values in _deltas(rows, metrics.get("models", {})).items():
        for m, v in values.items():
            if v is not None:
                out[f"profiling.{kind}.{m}"] = float(v)
    return out


def _why_not(metrics: dict) -> str | None:
    sec = _section(metrics)
    if sec is None:
        return None
    if "not_scored" in sec:
        return f"Profiling not scored: {sec['not_scored']}."
    return None


def profiling_table(metrics: dict) -> str:
    """The printed table's profiling block ("" when the evaluation had no profiling section)."""
    if _why_not(metrics):
        return _why_not(metrics)
    rows = _rows(metrics)
    if not rows:
        return ""
    deltas = _deltas(rows, metrics.get("models", {}))
    head = ["model", *(t for _, t in METRICS)]
    cells = [head] + [[_label(metrics, r["model"]), *(_fmt(r.get(m)) for m, _ in METRICS)] for r in rows]
    for kind, title, _ in DELTA_ROWS:
        if any(v is not None for v in deltas[kind].values()):
            cells.append([title, *(_fmt(deltas[kind].get(m)) if m in _DELTA_METRICS else "" for m, _ in METRICS)])
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = ["copairs mAP of well profiles (" + _describe(metrics) + ")"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _describe(metrics: dict) -> str:
    sec = _section(metrics) or {}
    m = next(iter(sec.get("models", {}).values()), {})
    act = m.get("activity", {})
    return (f"{sec.get('n_fields')} fields, {m.get('n_wells')} wells on {len(sec.get('plates', []))} plates, "
            f"{act.get('n_perturbations')} perturbations, {act.get('n_negcon_wells')} negcon wells, "
            f"normalisation {m.get('normalisation')}")


def profiling_markdown(metrics: dict) -> list[str]:
    if _why_not(metrics):
        return ["", "## Profiling (copairs mAP)", "", _why_not(metrics)]
    text = profiling_table(metrics)
    if not text:
        return []
    return ["", "## Profiling (copairs mAP)", "", EXPLANATION, "", "```", text, "```", *_skips(metrics)]


def _skips(metrics: dict) -> list[str]:
    sec = _section(metrics) or {}
    out = []
    if sec.get("n_skipped_fields"):
        out.append(f"Profiling skipped {sec['n_skipped_fields']} fields that failed to load.")
    m = next(iter(sec.get("models", {}).values()), {})
    if m.get("skipped_plates"):
        out.append("Plates not normalised (no negative controls): "
                   + "; ".join(f"{p['plate']}: {p['reason']}" for p in m["skipped_plates"]))
    for part in ("activity", "consistency"):
        skipped = {k: v for k, v in (m.get(part, {}).get("skipped") or {}).items() if v}
        if skipped:
            out.append(f"Not scored in {part}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in skipped.items()))
    cp = sec.get("cellprofiler") or {}
    if cp.get("not_scored"):
        out.append(f"No CellProfiler row: {cp['not_scored']}.")
    elif cp.get("n_without_nuclei"):
        out.append(f"CellProfiler: {cp['n_without_nuclei']} fields without nuclei in {cp['segmentation_channel']} "
                   "were left out of its profiles.")
    return out


def profiling_html(metrics: dict) -> list[str]:
    if _why_not(metrics):
        return ["<h2>Profiling (copairs mAP)</h2>", f"<p class=warn>{html.escape(_why_not(metrics))}</p>"]
    rows = _rows(metrics)
    if not rows:
        return []
    deltas = _deltas(rows, metrics.get("models", {}))
    head = "".join(f"<th>{html.escape(t)}</th>" for t in ("model", *(t for _, t in METRICS)))
    body = []
    for r in rows:
        cls = " class=ck" if r["model"] == "checkpoint" else ""
        tds = "".join(f"<td class=num>{_fmt(r.get(m))}</td>" for m, _ in METRICS)
        body.append(f"<tr{cls}><td>{html.escape(_label(metrics, r['model']))}</td>{tds}</tr>")
    for kind, _, title in DELTA_ROWS:
        if any(v is not None for v in deltas[kind].values()):
            tds = "".join(f"<td class=num>{_fmt(deltas[kind].get(m)) if m in _DELTA_METRICS else ''}</td>"
                          for m, _ in METRICS)
            body.append(f"<tr><td><i>{html.escape(title)}</i></td>{tds}</tr>")
    notes = "".join(f"<p class=warn>{html.escape(s)}</p>" for s in _skips(metrics))
    return ["<h2>Profiling (copairs mAP)</h2>", f"<p>{html.escape(EXPLANATION)}</p>",
            f"<p>{html.escape(_describe(metrics))}</p>", f"<table><tr>{head}</tr>{''.join(body)}</table>", notes]
