"""From embeddings to the evaluation's numbers: per-model analyses, the long table and the model comparison.

View groups (the `views` of a table row):
- "fluorescent": pairs of fluorescent channels, the "mean" view excluded (the headline; "channels" when fewer than 2
  fluorescent channels are evaluated and every channel view is used);
- "mean-channel": the mean view against each fluorescent channel (it holds a fifth of each channel's pixels, so it
  is reported on its own row, never averaged into the headline);
- "brightfield-fluorescent": brightfield views against fluorescent channels (when brightfield was evaluated).

The comparison puts every model side by side per (sampling, embedding, views, metric), with the checkpoint minus the
best pixel baseline (`delta_vs_pixels`) and minus the initial weights (`delta_vs_init`). A group where a pixel
baseline retrieves fields (top-1 >= LAYOUT_SOLVABLE_TOP1) is `layout_solvable`: layout alone passes it, so no number
of that group is evidence of learning.
"""

from __future__ import annotations

from dinocell.channels import is_fluorescent, is_transmitted_light
from dinocell.monitor import consistency

__all__ = [
    "EMBEDDING_KEYS",
    "HEADLINE_METRICS",
    "LAYOUT_SOLVABLE_TOP1",
    "PIXEL_MODELS",
    "ROW_METRICS",
    "analyse_embeddings",
    "comparison_rows",
    "table_rows",
]

EMBEDDING_KEYS = ("cls", "patch_mean")
HEADLINE_METRICS = ("gap", "top1", "mrr")
ROW_METRICS = ("same_field", "different_field", "gap", "top1", "mrr", "chance_top1")
PIXEL_MODELS = ("pixels_8x8", "pixels_16x16")
LAYOUT_SOLVABLE_TOP1 = 0.9


def analyse_embeddings(embs: dict) -> dict:
    """Per embedding key: summary, the matrices, the mean-vs-channel and brightfield groups (None when absent)."""
    out = {}
    for key in EMBEDDING_KEYS:
        same, labels = consistency.same_field_matrix(embs, key)
        diff, _ = consistency.different_field_matrix(embs, key)
        ret = consistency.retrieval(embs, key)
        n_fields = int(next(iter(embs.values()))[key].shape[0])
        summary = consistency.summary(embs, key)
        matrices = {"same": same, "diff": diff, "top1": ret["top1"], "mrr": ret["mrr"]}
        bf = [v for v in labels if v != consistency.MEAN_VIEW and is_transmitted_light(v)]
        fl = [v for v in labels if v != consistency.MEAN_VIEW and is_fluorescent(v)]
        out[key] = {
            "summary": summary,
            "labels": labels,
            "same_field": same.tolist(),
            "different_field": diff.tolist(),
            "retrieval_top1": ret["top1"].tolist(),
            "retrieval_mrr": ret["mrr"].tolist(),
            "mean_vs_channel": summary["mean_vs_channel"],
            "brightfield": consistency.view_group(matrices, labels, bf, fl, n_fields) if bf and fl else None,
        }
    return out


def _groups(a: dict) -> list[tuple[str, dict]]:
    s = a["summary"]
    groups = [("fluorescent" if all(is_fluorescent(v) for v in s["summary_views"]) else "channels", s)]
    if a["mean_vs_channel"] is not None:
        groups.append(("mean-channel", a["mean_vs_channel"]))
    if a["brightfield"] is not None:
        groups.append(("brightfield-fluorescent", a["brightfield"]))
    return groups


def table_rows(results: dict, labels: dict[str, str]) -> list[dict]:
    """One row per sampling x embedding x view group x model (results: {sampling: {model_id: analysis}})."""
    rows = []
    for sampling, models in results.items():
        for key in EMBEDDING_KEYS:
            for model_id, analysis in models.items():
                for views, numbers in _groups(analysis[key]):
                    rows.append({"sampling": sampling, "model": labels[model_id], "model_id": model_id,
                                 "embedding": key, "views": views,
                                 **{m: float(numbers[m]) for m in ROW_METRICS}})
    order = {"fluorescent": 0, "channels": 0, "mean-channel": 1, "brightfield-fluorescent": 2}
    rows.sort(key=lambda r: (list(results).index(r["sampling"]), EMBEDDING_KEYS.index(r["embedding"]),
                             order[r["views"]]))  # stable: models keep their order within a group
    return rows


def comparison_rows(rows: list[dict], metrics=HEADLINE_METRICS) -> list[dict]:
    """Per (sampling, embedding, views, metric): {model_id: value}, best pixel baseline, deltas, layout flag."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["sampling"], r["embedding"], r["views"]), {})[r["model_id"]] = r
    out = []
    for (sampling, key, views), by_model in groups.items():
        pixels = [m for m in PIXEL_MODELS if m in by_model]
        layout_top1 = max((by_model[m]["top1"] for m in pixels), default=None)
        solvable = layout_top1 is not None and layout_top1 >= LAYOUT_SOLVABLE_TOP1
        for metric in metrics:
            values = {m: r[metric] for m, r in by_model.items()}
            best = max(pixels, key=lambda m: values[m]) if pixels else None
            ck = values.get("checkpoint")
            init = next((values[m] for m in ("initial_weights", "baseline") if m in values), None)
            out.append({
                "sampling": sampling, "embedding": key, "views": views, "metric": metric, "values": values,
                "chance": _chance(by_model, metric),
                "best_pixel": best,
                "delta_vs_pixels": None if best is None or ck is None else ck - values[best],
                "delta_vs_init": None if init is None or ck is None else ck - init,
                "pixel_top1": layout_top1,
                "layout_solvable": bool(solvable),
            })
    return out


def _chance(by_model: dict, metric: str) -> float | None:
    r = next(iter(by_model.values()))
    if metric == "top1":
        return r["chance_top1"]
    if metric == "mrr":
        n = round(1 / r["chance_top1"])
        return sum(1.0 / k for k in range(1, n + 1)) / n
    return 0.0 if metric == "gap" else None
