"""The evaluation report: PNG figures, one self-contained HTML page, metrics.json, scalars.json, summary.md, a table.

Written into a local directory (evaluate uploads it when the destination is s3://):

    report.html      everything below in one file (PNGs embedded as base64 data URIs): open it anywhere
    metrics.json     the full metrics (matrices, summaries, per-field skips, model and data descriptions)
    scalars.json     flat {name: float} for KFP Metrics: "<model>.<embedding>.<views>.<metric>", "delta.*", "data.*"
    summary.md       the table and the headline comparison, for the KFP UI's Markdown viewer
    figures/*.png    heatmaps (same-field, different-field, retrieval top-1 / MRR), PCA scatters (by channel, plate,
                     batch), attention maps and PCA-RGB patch maps

The printed table (`format_table`) shows the same numbers as metrics.json's "table" rows, to 4 decimals.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np
import torch

from dinocell import storage
from dinocell.monitor import consistency
from dinocell.monitor.figures import attention_maps_image, matrix_image, pca_rgb_image
from dinocell.monitor.run_log import encode_png

__all__ = [
    "TABLE_COLUMNS",
    "build_figures",
    "format_table",
    "pca_scatter_image",
    "render_html",
    "scalars_from_metrics",
    "summary_markdown",
    "write_report",
]

TABLE_COLUMNS = ("model", "embedding", "views", "same_field", "different_field", "gap", "top1", "mrr", "chance_top1")
_TEXT_COLUMNS = ("model", "embedding", "views")
_MATRICES = (
    ("same_field", "same-field cosine", ".2f"),
    ("different_field", "different-field cosine", ".2f"),
    ("retrieval_top1", "retrieval top-1 (row: query view, column: gallery view)", ".2f"),
    ("retrieval_mrr", "retrieval MRR (row: query view, column: gallery view)", ".2f"),
)


# ----------------------------------------------------------------------------------------------- numbers


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table: one header line, then one line per row, numbers to 4 decimals."""
    cells = [list(TABLE_COLUMNS)]
    for r in rows:
        cells.append([str(r[c]) if c in _TEXT_COLUMNS else f"{r[c]:.4f}" for c in TABLE_COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells)


def scalars_from_metrics(metrics: dict) -> dict[str, float]:
    """Flat name -> float for KFP Metrics (see the module docstring)."""
    out: dict[str, float] = {}
    by_key = {}
    for r in metrics["table"]:
        prefix = f"{r['model']}.{r['embedding']}.{r['views']}"
        by_key[(r["model"], r["embedding"], r["views"])] = r
        for c in TABLE_COLUMNS:
            if c not in _TEXT_COLUMNS:
                out[f"{prefix}.{c}"] = float(r[c])
    for (model, emb, views), r in by_key.items():
        base = by_key.get(("baseline", emb, views))
        if model == "checkpoint" and base is not None:
            for c in ("same_field", "gap", "top1", "mrr"):
                out[f"delta.{emb}.{views}.{c}"] = float(r[c]) - float(base[c])
    data = metrics["data"]
    for k in ("n_fields", "n_skipped", "n_plates"):
        out[f"data.{k}"] = float(data[k])
    return out


def summary_markdown(metrics: dict) -> str:
    data = metrics["data"]
    ck = metrics["checkpoint"]
    lines = [
        "# Channel-consistency evaluation",
        "",
        f"Checkpoint `{ck['source']}` ({ck['kind']}, {ck['section']}, iteration {ck['iteration']}, "
        f"patch {ck['patch_size']}); baseline: "
        + (f"`{metrics['baseline']['source']}`" if metrics.get("baseline") else "none") + ".",
        (f"{data['n_fields']} fields of split `{data['split']}` ({data['n_plates']} plates; {data['n_skipped']} "
         f"skipped), views {', '.join(data['views'])}, {data['size']} px."),
        "",
        ("*same_field*: mean cosine between different views of one field (the seed's single number); "
         "*different_field*: the same between different fields; *gap* = their difference (about 0 for a collapsed "
         "model); *top1* / *mrr*: cross-channel field retrieval, averaged over channel pairs; *chance_top1* = "
         "1/fields."),
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|",
    ]
    for r in metrics["table"]:
        lines.append("| " + " | ".join(str(r[c]) if c in _TEXT_COLUMNS else f"{r[c]:.4f}" for c in TABLE_COLUMNS)
                     + " |")
    if data["preprocess_differs_from_training"]:
        lines += ["", "Preprocessing differs from training: " + "; ".join(data["preprocess_differs_from_training"])]
    if data["skipped"]:
        lines += ["", f"Skipped fields ({data['n_skipped']}): "
                  + "; ".join(f"{s['field_id']}: {s['reason']}" for s in data["skipped"][:10])
                  + (" ..." if data["n_skipped"] > 10 else "")]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- figures


def _pca2(x: torch.Tensor) -> np.ndarray:
    """First two principal components of the rows of x (signs fixed: largest loading positive)."""
    x = x.double()
    x = x - x.mean(dim=0, keepdim=True)
    _, vecs = torch.linalg.eigh(x.T @ x)
    vecs = vecs[:, -2:].flip(1)
    signs = torch.sign(vecs.gather(0, vecs.abs().argmax(dim=0, keepdim=True)))
    signs[signs == 0] = 1
    return (x @ (vecs * signs)).numpy()


def pca_scatter_image(embs: dict, key: str, plates: list[str], batches: list[str], title: str) -> np.ndarray:
    """Embeddings of every view of every field, projected on their first 2 PCs, coloured by view, plate, batch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    views = list(embs)
    n = embs[views[0]][key].shape[0]
    pts = _pca2(torch.cat([torch.as_tensor(embs[v][key]) for v in views]))
    colourings = (
        ("view (channel)", [v for v in views for _ in range(n)]),
        ("plate", list(plates) * len(views)),
        ("batch", list(batches) * len(views)),
    )
    fig = Figure(figsize=(15, 4.8), dpi=90)
    canvas = FigureCanvasAgg(fig)
    for k, (name, labels) in enumerate(colourings):
        ax = fig.add_subplot(1, 3, k + 1)
        groups = list(dict.fromkeys(labels))
        palette = _palette(len(groups))
        for g, colour in zip(groups, palette):
            idx = [i for i, lab in enumerate(labels) if lab == g]
            ax.scatter(pts[idx, 0], pts[idx, 1], s=9, color=colour, label=g, alpha=0.75, linewidths=0)
        if len(groups) <= 16:
            ax.legend(fontsize=7, markerscale=1.5, loc="best")
        else:
            ax.text(0.01, 0.99, f"{len(groups)} {name}s (legend omitted)", transform=ax.transAxes, va="top",
                    fontsize=8)
        ax.set_title(f"coloured by {name}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    fig.suptitle(title)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _palette(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    if n <= 20:
        return [cmap(i % cmap.N) for i in range(n)]
    return [matplotlib.colormaps["hsv"](i / n) for i in range(n)]


@torch.no_grad()
def _patch_figures(model, info, fields, size: int, device, n_vis: int) -> dict[str, np.ndarray]:
    """Attention maps and PCA-RGB patch maps: the mean view of the first n_vis fields, and every view of field 0."""
    n = min(n_vis, len(fields.images))
    per_field = [consistency.field_views(torch.from_numpy(fields.images[i])[None], fields.channels, size,
                                         info.norm_mean, info.norm_std) for i in range(n)]
    views = list(per_field[0])
    first_view = views[0]  # "mean" when there is a fluorescent channel
    sets = {
        f"{first_view}_view": torch.cat([pf[first_view] for pf in per_field]),
        "all_views_field0": torch.cat([per_field[0][v] for v in views]),
    }
    grid = (size // info.patch_size, size // info.patch_size)
    was_training = model.training
    model.eval()
    out = {}
    try:
        for name, x in sets.items():
            xd = x.to(device)
            attn = model.get_last_self_attention(xd).float().cpu()
            tokens = model.forward_features(xd)["x_norm_patchtokens"].float().cpu()
            out[f"attention_{name}"] = attention_maps_image(attn, grid, x, max_images=x.shape[0])
            out[f"pca_rgb_{name}"] = pca_rgb_image(tokens, grid, x, max_images=x.shape[0])
    finally:
        model.train(was_training)
    return out


def build_figures(models: dict, embeddings: dict, analyses: dict, fields, size: int, device, n_vis: int = 4) -> dict:
    """name -> RGB uint8 image, names "<model>/<figure>" in display order."""
    figures: dict[str, np.ndarray] = {}
    for model_name, analysis in analyses.items():
        for key, a in analysis.items():
            for matrix, title, fmt in _MATRICES:
                vmin, vmax = (0.0, 1.0) if matrix.startswith("retrieval") else (None, None)
                figures[f"{model_name}/{matrix}_{key}"] = matrix_image(
                    np.asarray(a[matrix]), a["labels"], f"{model_name} {key}: {title}", fmt=fmt, vmin=vmin, vmax=vmax
                )
    for model_name, embs in embeddings.items():
        for key in ("cls", "patch_mean"):
            figures[f"{model_name}/pca_scatter_{key}"] = pca_scatter_image(
                embs, key, fields.plates, fields.batches, f"{model_name}: {key} embeddings, PCA over all views")
    for model_name, (model, info) in models.items():
        for name, rgb in _patch_figures(model, info, fields, size, device, n_vis).items():
            figures[f"{model_name}/{name}"] = rgb
    return figures


# ----------------------------------------------------------------------------------------------- HTML


def _file_name(fig_name: str) -> str:
    return "figures/" + fig_name.replace("/", "_") + ".png"


def _html_table(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    body = []
    for r in rows:
        tds = "".join(
            f"<td>{html.escape(str(r[c]))}</td>" if c in _TEXT_COLUMNS else f"<td class=num>{r[c]:.4f}</td>"
            for c in TABLE_COLUMNS
        )
        body.append(f"<tr>{tds}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _kv_table(d: dict, keys: list[str]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(d.get(k)))}</td></tr>" for k in keys)
    return f"<table class=kv>{rows}</table>"


_CSS = """
body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left} td.num{text-align:right;
font-family:monospace} table.kv th{background:#f4f4f4} .figs{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0} figcaption{font-size:12px;color:#444;max-width:640px} img{max-width:640px;border:1px solid #ddd}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto}
"""


def render_html(metrics: dict, figures_png: dict[str, bytes], table: str) -> str:
    """One self-contained page: every figure embedded as a data URI."""
    data = metrics["data"]
    info_keys = ["source", "kind", "section", "arch", "patch_size", "in_chans", "stored_in_chans", "embed_dim",
                 "depth", "num_heads", "n_storage_tokens", "iteration", "norm_mean", "norm_std", "norm_source",
                 "pretrained", "channels"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>dinocell channel-consistency evaluation</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Channel-consistency evaluation</h1>",
        ("<p>Every channel of a held-out field is embedded on its own, plus the mean of the fluorescent channels. "
         "<b>same_field</b>: mean cosine between different views of one field (the seed's single number); "
         "<b>different_field</b>: the same between different fields (a collapsed model scores high on both); "
         "<b>gap</b>: their difference; <b>top1 / mrr</b>: a field's view in one channel retrieved among all "
         "fields' views in another channel, averaged over channel pairs (ties count against the model); "
         "<b>chance_top1</b> = 1 / fields.</p>"),
        _html_table(metrics["table"]),
        "<h2>Data</h2>",
        _kv_table({**data, "plates": ", ".join(data["plates"]), "batches": ", ".join(data["batches"])},
                  ["manifest", "split", "channels", "views", "n_available", "n_selected", "n_fields", "n_skipped",
                   "n_plates", "plates", "batches", "field_sizes", "size", "preprocess_differs_from_training"]),
    ]
    if data["skipped"]:
        items = "".join(f"<li>{html.escape(s['field_id'])}: {html.escape(s['reason'])}</li>" for s in data["skipped"])
        parts.append(f"<h3>Skipped fields ({data['n_skipped']})</h3><ul>{items}</ul>")
    parts.append("<h2>Models</h2>")
    for model_name in ("checkpoint", "baseline"):
        info = metrics.get(model_name)
        if info:
            parts += [f"<h3>{model_name}</h3>", _kv_table(info, info_keys),
                      f"<pre>{html.escape(info.get('load_summary', ''))}</pre>"]
    sections = (
        ("Same-field and different-field similarity, retrieval", ("same_field", "different_field", "retrieval")),
        ("PCA of the embeddings", ("pca_scatter",)),
        ("Attention maps (last block, CLS to patches: head mean, then single heads)", ("attention",)),
        ("PCA-RGB patch features (first 3 components as RGB)", ("pca_rgb",)),
    )
    for title, prefixes in sections:
        figs = [n for n in figures_png if n.split("/", 1)[1].startswith(prefixes)]
        if not figs:
            continue
        parts.append(f"<h2>{html.escape(title)}</h2><div class=figs>")
        for name in figs:
            uri = "data:image/png;base64," + base64.b64encode(figures_png[name]).decode()
            caption = name.replace("/", ": ").replace("_", " ")
            if "all_views_field0" in name:
                caption += f" (rows: {', '.join(data['views'])})"
            parts.append(f"<figure><img src='{uri}' alt='{html.escape(name)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
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
    table = format_table(metrics["table"])
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
