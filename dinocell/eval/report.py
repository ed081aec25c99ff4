"""The evaluation report: PNG figures, one self-contained HTML page, metrics.json, scalars.json, summary.md, a table.

Written into a local directory (evaluate uploads it when the destination is s3://):

    report.html      everything below in one file (PNGs embedded as base64 data URIs): open it anywhere
    metrics.json     the full metrics (matrices, summaries, view records, per-field skips, models, data)
    scalars.json     flat {name: float} for KFP Metrics: "<sampling>.<model id>.<embedding>.<views>.<metric>",
                     "delta_vs_pixels.*" (checkpoint minus the best pixel baseline), "delta_vs_init.*",
                     "layout_solvable.*" (1: a pixel baseline retrieves fields there), "data.*"
    summary.md       the headline and the table, for the KFP UI's Markdown viewer
    figures/*.png    side-by-side matrices, PCA scatters, attention maps and PCA-RGB patch maps (report_figures)

The printed table (`format_table`) shows metrics.json's "table" rows to 4 decimals, one block per sampling x
embedding x view group, the checkpoint's row with its deltas against the best pixel baseline.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from dinocell import storage
from dinocell.eval.report_figures import SAMPLING_TITLES, build_figures
from dinocell.eval.report_profiling import profiling_html, profiling_markdown, profiling_scalars, profiling_table
from dinocell.eval.scoring import HEADLINE_METRICS
from dinocell.monitor.run_log import encode_png

__all__ = [
    "TABLE_COLUMNS",
    "build_figures",
    "format_table",
    "render_html",
    "scalars_from_metrics",
    "summary_markdown",
    "write_report",
]

TABLE_COLUMNS = ("sampling", "embedding", "views", "model", "same_field", "different_field", "gap", "top1", "mrr",
                 "chance_top1")
DELTA_COLUMNS = tuple(f"delta_{m}" for m in HEADLINE_METRICS)  # checkpoint minus the best pixel baseline
_TEXT_COLUMNS = ("sampling", "embedding", "views", "model")
_HEADERS = {"same_field": "same-field", "different_field": "different-field", "top1": "top-1", "mrr": "MRR",
            "chance_top1": "chance top-1", "gap": "gap", **{d: f"Δ{d[6:]} vs pixels" for d in DELTA_COLUMNS},
            "note": "note"}
_VIEW_TITLES = {"fluorescent": "fluorescent channel pairs", "channels": "channel pairs",
                "mean-channel": "mean view vs channel", "brightfield-fluorescent": "brightfield vs fluorescent"}
NOT_EVIDENCE = "layout-solvable: not evidence of learning"
_SECTIONS_TEXT = (
    "<b>same-field</b>: mean cosine between different views of one field (the seed's single number); "
    "<b>different-field</b>: the same between different fields (a collapsed model scores high on both); <b>gap</b>: "
    "their difference; <b>top-1 / MRR</b>: a field's view in one channel retrieved among all fields' views in another "
    "(ties count against the model). <b>Independent views</b>: every view has its own random crop, flip and turn, so "
    "only content links two views of a field; <b>aligned views</b>: whole fields in one orientation, which the cells' "
    "positions alone solve. <b>pixels 8x8 / 16x16</b>: the view average-pooled, no learning; <b>positions only</b>: a "
    "binary cell mask through a fixed random filter. <b>Δ vs pixels</b>: checkpoint minus the best pixel baseline.")


# ----------------------------------------------------------------------------------------------- numbers


def _deltas(metrics: dict) -> dict[tuple, dict]:
    """(sampling, embedding, views) -> {"delta_<metric>": value, "layout_solvable": bool}."""
    out: dict[tuple, dict] = {}
    for c in metrics.get("comparison", []):
        d = out.setdefault((c["sampling"], c["embedding"], c["views"]), {"layout_solvable": c["layout_solvable"]})
        d[f"delta_{c['metric']}"] = c["delta_vs_pixels"]
    return out


def _display_rows(metrics: dict) -> list[dict]:
    """metrics["table"] with the delta and note columns filled on the checkpoint's rows."""
    deltas = _deltas(metrics)
    rows = []
    for r in metrics["table"]:
        d = deltas.get((r["sampling"], r["embedding"], r["views"]), {})
        row = {**r, "note": NOT_EVIDENCE if d.get("layout_solvable") and r["model_id"] == "checkpoint" else ""}
        for c in DELTA_COLUMNS:
            row[c] = d.get(c) if r["model_id"] == "checkpoint" else None
        rows.append(row)
    return rows


def _cell(row: dict, c: str) -> str:
    v = row.get(c)
    if c == "sampling":
        return SAMPLING_TITLES.get(v, str(v))
    if c in _TEXT_COLUMNS or c == "note":
        return str(v if v is not None else "")
    return "" if v is None else f"{v:+.4f}" if c.startswith("delta_") else f"{v:.4f}"


def _columns(rows: list[dict]) -> list[str]:
    extra = [c for c in DELTA_COLUMNS if any(r.get(c) is not None for r in rows)]
    return [*TABLE_COLUMNS, *extra, "note"]


def format_table(metrics_or_rows) -> str:
    """Fixed-width text table, a blank line between groups (sampling x embedding x views), numbers to 4 decimals."""
    rows = _display_rows(metrics_or_rows) if isinstance(metrics_or_rows, dict) else list(metrics_or_rows)
    cols = _columns(rows)
    cells = [[_HEADERS.get(c, c) for c in cols]] + [[_cell(r, c) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines, previous = [], None
    for k, row in enumerate(cells):
        group = None if k == 0 else tuple(rows[k - 1][c] for c in ("sampling", "embedding", "views"))
        if k > 1 and group != previous:
            lines.append("")
        previous = group
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def scalars_from_metrics(metrics: dict) -> dict[str, float]:
    """Flat name -> float for KFP Metrics (see the module docstring)."""
    out: dict[str, float] = {}
    for r in metrics["table"]:
        prefix = f"{r['sampling']}.{r['model_id']}.{r['embedding']}.{r['views']}"
        for c in ("same_field", "different_field", "gap", "top1", "mrr", "chance_top1"):
            out[f"{prefix}.{c}"] = float(r[c])
    for c in metrics.get("comparison", []):
        group = f"{c['sampling']}.{c['embedding']}.{c['views']}"
        for name in ("delta_vs_pixels", "delta_vs_init"):
            if c[name] is not None:
                out[f"{name}.{group}.{c['metric']}"] = float(c[name])
        out[f"layout_solvable.{group}"] = float(c["layout_solvable"])
    data = metrics["data"]
    for k in ("n_fields", "n_skipped", "n_plates"):
        out[f"data.{k}"] = float(data[k])
    out.update(profiling_scalars(metrics))
    return out


def _display_path(uri: str) -> str:
    """A URI as a reader should see it: temporary local paths (a test's or kfp.local's) reduced to their name.

    Only absolute paths qualify: a label such as "pretrained weights s3://..." is not a path, and resolving it
    against the working directory would call it temporary whenever the run happens to work under /tmp."""
    uri = str(uri)
    tmp = os.path.abspath(tempfile.gettempdir()) + os.sep
    if not storage.is_s3(uri) and os.path.isabs(uri) and os.path.abspath(uri).startswith(tmp):
        return f"{os.path.basename(uri)} (a temporary local file)"
    return uri


def headline_lines(metrics: dict) -> list[str]:
    """One sentence per embedding: the checkpoint against the best pixel baseline on the headline group."""
    lines = []
    for c in metrics.get("comparison", []):
        if c["metric"] != "top1" or c["views"] not in ("fluorescent", "channels"):
            continue
        v = c["values"]
        best = c["best_pixel"]
        label = metrics["models"]
        text = (f"{SAMPLING_TITLES[c['sampling']]}, {c['embedding']}, {_VIEW_TITLES[c['views']]}: checkpoint top-1 "
                f"{v['checkpoint']:.3f}")
        if c["delta_vs_init"] is not None:
            init = next(m for m in ("initial_weights", "baseline") if m in v)
            text += f", {label[init]['label']} {v[init]:.3f}"
        if best is not None:
            text += f", best pixel baseline ({label[best]['label']}) {v[best]:.3f}, Δ {c['delta_vs_pixels']:+.3f}"
        text += f"; chance {c['chance']:.3f}"
        if c["layout_solvable"]:
            text += f" ({NOT_EVIDENCE})"
        lines.append(text)
    return lines


def summary_markdown(metrics: dict) -> str:
    data = metrics["data"]
    ck = metrics["checkpoint"]
    vs = metrics.get("view_sampling", {})
    rows = _display_rows(metrics)
    cols = _columns(rows)
    lines = [
        "# Channel-consistency evaluation",
        "",
        f"Checkpoint `{_display_path(ck['source'])}` ({ck['kind']}, iteration {ck['iteration']}, patch "
        f"{ck['patch_size']}); models: " + ", ".join(m["label"] for m in metrics["models"].values()) + ".",
        (f"{data['n_fields']} fields of split `{data['split']}` ({data['n_plates']} plates; {data['n_skipped']} "
         f"skipped), views {', '.join(data['views'])}, {data['size']} px; view sampling "
         f"{', '.join(vs.get('modes', []))}, seed {vs.get('seed')}, crop area {vs.get('scale')}."),
        "",
        *[f"- {t}" for t in headline_lines(metrics)],
        "",
        html.unescape(_SECTIONS_TEXT.replace("<b>", "*").replace("</b>", "*")),
        "",
        "| " + " | ".join(_HEADERS.get(c, c) for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, c) for c in cols) + " |")
    lines += profiling_markdown(metrics)
    if data["preprocess_differs_from_training"]:
        lines += ["", "Preprocessing differs from training: " + "; ".join(data["preprocess_differs_from_training"])]
    if data["skipped"]:
        lines += ["", f"Skipped fields ({data['n_skipped']}): "
                  + "; ".join(f"{s['field_id']}: {s['reason']}" for s in data["skipped"][:10])
                  + (" ..." if data["n_skipped"] > 10 else "")]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- HTML


def _file_name(fig_name: str) -> str:
    return "figures/" + fig_name.replace("/", "_") + ".png"


def _html_table(rows: list[dict]) -> str:
    cols = [c for c in _columns(rows) if c != "sampling"]  # one table per sampling, under its own heading
    head = "".join(f"<th>{html.escape(_HEADERS.get(c, c))}</th>" for c in cols)
    body = []
    for r in rows:
        cls = " class=ck" if r["model_id"] == "checkpoint" else (" class=ref" if not r.get("learned", True) else "")
        tds = "".join(f"<td>{html.escape(_cell(r, c))}</td>" if c in _TEXT_COLUMNS or c == "note"
                      else f"<td class=num>{_cell(r, c)}</td>" for c in cols)
        body.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _kv_table(pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs)
    return f"<table class=kv>{rows}</table>"


_CSS = """
body{font-family:sans-serif;margin:2em;max-width:1500px} table{border-collapse:collapse;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left} td.num{text-align:right;
font-family:monospace} table.kv th{background:#f4f4f4;font-weight:normal} tr.ck td{background:#eef5ff;font-weight:bold}
.figs{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0} figcaption{font-size:12px;color:#444}
img{max-width:100%;border:1px solid #ddd} pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto}
.headline li{font-size:15px;margin:4px 0} .warn{color:#a40}
"""
_INFO = (("source", "weights"), ("kind", "kind"), ("section", "checkpoint section"), ("arch", "architecture"),
         ("patch_size", "patch size"), ("embed_dim", "width"), ("depth", "blocks"), ("num_heads", "heads"),
         ("iteration", "iteration"), ("pretrained", "started from"), ("channels", "trained on channels"),
         ("cls_space", "CLS output"))
_FIGURE_SECTIONS = (
    ("matrices", "Same-field, different-field and retrieval matrices, all models side by side"),
    ("pca", "PCA of the embeddings"),
    ("attention", "Attention maps (last block, CLS to patches)"),
    ("pca_rgb", "Patch features (first 3 principal components as RGB)"),
)


def _model_section(metrics: dict) -> list[str]:
    ck = metrics["checkpoint"]
    described = [(m["label"], m["description"].replace(str(ck["source"]), _display_path(ck["source"])))
                 for m in metrics["models"].values()]
    parts = ["<h2>Models</h2>", _kv_table(described)]
    for key, title in (("checkpoint", "checkpoint"), ("baseline", "baseline")):
        info = metrics.get(key)
        if info:
            shown = [(label, _display_path(info[k]) if k in ("source", "pretrained") and info[k]
                      else ", ".join(info[k]) if isinstance(info[k], list) else info[k])
                     for k, label in _INFO if info.get(k) not in (None, "")]
            parts += [f"<h3>{title}</h3>", _kv_table(shown)]
    return parts


def render_html(metrics: dict, figures_png: dict[str, bytes], table: str) -> str:
    """One self-contained page: every figure embedded as a data URI."""
    data = metrics["data"]
    vs = metrics.get("view_sampling", {})
    rows = _display_rows(metrics)
    learned = {mid: m.get("learned", True) for mid, m in metrics["models"].items()}
    for r in rows:
        r["learned"] = learned.get(r["model_id"], True)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>dinocell channel-consistency evaluation</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Channel-consistency evaluation</h1>",
        "<ul class=headline>" + "".join(f"<li>{html.escape(t)}</li>" for t in headline_lines(metrics)) + "</ul>",
        f"<p>{_SECTIONS_TEXT}</p>",
    ]
    for sampling in vs.get("modes", []):
        part = [r for r in rows if r["sampling"] == sampling]
        parts += [f"<h2>{html.escape(SAMPLING_TITLES[sampling].capitalize())}</h2>", _html_table(part)]
    parts += profiling_html(metrics)
    parts += ["<h2>Data</h2>", _kv_table([
        ("manifest", _display_path(data["manifest"])), ("split", data["split"]),
        ("channels", ", ".join(data["channels"])), ("views", ", ".join(data["views"])),
        ("fields evaluated", f"{data['n_fields']} of {data['n_selected']} selected ({data['n_available']} in the "
                             f"split, {data['n_skipped']} skipped)"),
        ("plates", f"{data['n_plates']}: " + ", ".join(data["plates"])), ("batches", ", ".join(data["batches"])),
        ("field sizes (px)", ", ".join("x".join(map(str, hw)) for hw in data["field_sizes"])),
        ("view size (px)", data["size"]),
        ("view sampling", f"{', '.join(vs.get('modes', []))}; seed {vs.get('seed')}, crop area {vs.get('scale')} of "
                          f"the field, aspect ratio {[round(x, 3) for x in vs.get('ratio', [])]}, random flip and "
                          "quarter turn per view (every view's box is recorded in metrics.json)"),
        ("preprocessing differs from training", "; ".join(data["preprocess_differs_from_training"]) or "no"),
    ])]
    if data["skipped"]:
        items = "".join(f"<li>{html.escape(s['field_id'])}: {html.escape(s['reason'])}</li>" for s in data["skipped"])
        parts.append(f"<h3 class=warn>Skipped fields ({data['n_skipped']})</h3><ul>{items}</ul>")
    parts += _model_section(metrics)
    for prefix, title in _FIGURE_SECTIONS:
        figs = [n for n in figures_png if n.split("/", 1)[0] == prefix]
        if not figs:
            continue
        parts.append(f"<h2>{html.escape(title)}</h2><div class=figs>")
        for name in figs:
            uri = "data:image/png;base64," + base64.b64encode(figures_png[name]).decode()
            parts.append(f"<figure><img src='{uri}' alt='{html.escape(name)}'></figure>")
        parts.append("</div>")
    parts += ["<h2>Printed table</h2>", f"<pre>{html.escape(table)}</pre>", "</body></html>"]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- writing


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _finite_or_string(obj):
    """Strict JSON has no NaN/inf: write them as strings so nothing silently disappears."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite_or_string(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_string(v) for v in obj]
    return obj


def write_report(out_dir: Path, metrics: dict, figures: dict[str, np.ndarray]) -> tuple[list[str], dict, str]:
    """Write every report file under the local `out_dir`; returns (relative file names, scalars, table text)."""
    out_dir = Path(out_dir)
    table = format_table(metrics)
    if profiling_table(metrics):
        table += "\n\n" + profiling_table(metrics)
    scalars = scalars_from_metrics(metrics)
    pngs = {name: encode_png(rgb) for name, rgb in figures.items()}
    files: dict[str, bytes] = {_file_name(name): data for name, data in pngs.items()}
    files["metrics.json"] = json.dumps(_finite_or_string(metrics), indent=1, default=_json_default).encode()
    files["scalars.json"] = json.dumps(_finite_or_string(scalars), indent=1).encode()
    files["summary.md"] = summary_markdown(metrics).encode()
    files["report.html"] = render_html(metrics, pngs, table).encode()
    for rel, data in files.items():
        storage.write_bytes(str(out_dir / rel), data)
    return sorted(files), scalars, table
