"""The evaluation report's figures (uint8 RGB arrays), named "<group>/<name>" in display order.

- matrices/<sampling>_<embedding>: every model side by side, rows same-field cosine, different-field cosine and
  retrieval top-1, on ONE colour scale per row type for all models (and both samplings), so colours compare;
- pca/<sampling>_<model>: the embeddings of every view of every field on their first 2 PCs, coloured by channel
  (by plate and by batch too when there are several);
- attention/... and pca_rgb/...: last-block CLS attention and PCA-RGB patch features of the learned models, on every
  view of one field (rows labelled by channel) and on the mean view of a few fields, each tile enlarged to at
  least TILE_PX pixels so cells are visible.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dinocell.eval.view_sampling import normalised_planes
from dinocell.monitor import consistency, figures
from dinocell.monitor.figures import attention_maps_image, pca_rgb_image

__all__ = ["TILE_PX", "build_figures", "labelled_grid", "pca_scatter_image", "side_by_side_matrices"]

TILE_PX = 200
SAMPLING_TITLES = {"independent": "independent views", "aligned": "aligned views (layout-solvable)"}
_ROWS = (
    ("same_field", "same-field cosine"),
    ("different_field", "different-field cosine"),
    ("retrieval_top1", "retrieval top-1 (row: query, column: gallery)"),
)


def _canvas(width: float, height: float, dpi: int = 80, layout: str | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    return fig, FigureCanvasAgg(fig)


def _rgb(fig, canvas) -> np.ndarray:
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def side_by_side_matrices(per_model: dict[str, dict], scales: dict[str, tuple[float, float]], title: str) -> np.ndarray:
    """per_model: {label: analysis of one embedding}; scales: {row matrix name: (vmin, vmax)} shared by all."""
    labels = next(iter(per_model.values()))["labels"]
    v = len(labels)
    side = max(2.8, 0.42 * v + 1.4)
    # constrained layout: the matrices fill the figure instead of sitting in wide fixed margins
    fig, canvas = _canvas(side * len(per_model) + 1.2, side * len(_ROWS) + 0.6, layout="constrained")
    axes = fig.subplots(len(_ROWS), len(per_model), squeeze=False)
    for r, (name, row_title) in enumerate(_ROWS):
        lo, hi = scales[name]
        im = None
        for c, (model, a) in enumerate(per_model.items()):
            ax = axes[r][c]
            m = np.asarray(a[name], dtype=np.float64)
            im = ax.imshow(m, cmap="viridis", vmin=lo, vmax=hi)
            ax.set_xticks(range(v), labels=labels, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(v), labels=labels if c == 0 else [""] * v, fontsize=7)
            for i in range(v):
                for j in range(v):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6.5,
                            color="black" if m[i, j] > (lo + hi) / 2 else "white")
            ax.set_title(f"{model}\n{row_title}" if r == 0 else row_title, fontsize=8)
        fig.colorbar(im, ax=list(axes[r]), fraction=0.015, pad=0.01)
    fig.suptitle(title)
    return _rgb(fig, canvas)


def _shared_scales(results: dict, key: str) -> dict[str, tuple[float, float]]:
    values = {name: [] for name, _ in _ROWS}
    for models in results.values():
        for analysis in models.values():
            for name in values:
                values[name].append(np.asarray(analysis[key][name], dtype=np.float64).min())
    lo = math.floor(min(min(values["same_field"]), min(values["different_field"])) * 10) / 10
    return {"same_field": (lo, 1.0), "different_field": (lo, 1.0), "retrieval_top1": (0.0, 1.0)}


def pca_scatter_image(embs: dict, key: str, plates: list[str], batches: list[str], title: str) -> np.ndarray:
    """Embeddings of every view of every field on their first 2 PCs: coloured by channel, and by plate / batch when
    there are several."""
    groupings = {name: list(values) for name, values in (("plate", plates), ("batch", batches))
                 if len(set(values)) > 1}
    return figures.pca_scatter_image(embs, key, groupings, title)


def labelled_grid(grid: np.ndarray, tile: int, row_labels: list[str], col_labels: list[str], title: str,
                  pad: int = 2) -> np.ndarray:
    """A tile grid (monitor.figures layout: `pad` px between tiles) drawn with row and column labels, each tile
    shown at >= TILE_PX pixels (nearest-neighbour, so patches stay squares)."""
    rows, cols = (grid.shape[0] - pad) // (tile + pad), (grid.shape[1] - pad) // (tile + pad)
    scale = max(1, math.ceil(TILE_PX / tile))
    big = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    dpi = 100
    # room for the longest row label (field ids run to 35 characters; about 0.085 in a character at 10 pt)
    left, top = max(1.3, 0.085 * max((len(str(lab)) for lab in row_labels[:rows]), default=0) + 0.3), 0.7
    fig, canvas = _canvas(big.shape[1] / dpi + left + 0.2, big.shape[0] / dpi + top + 0.2, dpi=dpi)
    ax = fig.add_axes((left / fig.get_figwidth(), 0.2 / fig.get_figheight(), big.shape[1] / dpi / fig.get_figwidth(),
                       big.shape[0] / dpi / fig.get_figheight()))
    ax.imshow(big, interpolation="nearest")
    step = (tile + pad) * scale
    ax.set_yticks([pad * scale + step * i + tile * scale / 2 for i in range(rows)], labels=row_labels[:rows])
    ax.set_xticks([pad * scale + step * j + tile * scale / 2 for j in range(cols)], labels=col_labels[:cols])
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, y=1 - 0.12 / fig.get_figheight(), va="top", fontsize=11)
    return _rgb(fig, canvas)


def _view_stack(fields, index: int, specs, size: int, mean: float, std: float) -> tuple[list[str], torch.Tensor]:
    """All views of field `index` as the model saw them (independent crops when specs is given, else whole)."""
    img = torch.from_numpy(fields.images[index])[None]
    if specs is None:
        views = consistency.field_views(img, fields.channels, size, mean, std)
    else:
        views = {v: specs[index][v].render(x[0, 0], size)[None, None]
                 for v, x in normalised_planes(img, fields.channels, mean, std).items()}
    return list(views), torch.cat(list(views.values()))


@torch.no_grad()
def _patch_figures(entry, fields, specs, size: int, device, n_vis: int) -> dict[str, np.ndarray]:
    model = entry.module
    patch = entry.info.patch_size
    grid = (size // patch, size // patch)
    names, field0 = _view_stack(fields, 0, specs, size, entry.norm_mean, entry.norm_std)
    n = min(n_vis, len(fields.images))
    whole = [consistency.field_views(torch.from_numpy(fields.images[i])[None], fields.channels, size,
                                     entry.norm_mean, entry.norm_std) for i in range(n)]
    first = next(iter(whole[0]))  # "mean" when there is a fluorescent channel
    sets = {
        "views_field0": (field0, names, f"every view of field {fields.field_ids[0]}"
                         + (" (independent crops, as scored)" if specs is not None else " (whole field)")),
        f"{first}_view": (torch.cat([w[first] for w in whole]), fields.field_ids[:n],
                          f"{first} view, whole field, of {n} fields"),
    }
    heads = min(3, getattr(model, "num_heads", 3))
    out = {}
    was_training = model.training
    model.eval()
    try:
        for name, (x, rows, what) in sets.items():
            xd = x.to(device)
            attn = model.get_last_self_attention(xd).float().cpu()
            tokens = model.forward_features(xd)["x_norm_patchtokens"].float().cpu()
            att = attention_maps_image(attn, grid, x, n_heads=heads, max_images=x.shape[0])
            out[f"attention/{entry.id}_{name}"] = labelled_grid(
                att, size, rows, ["view", "attention (mean of heads)"] + [f"head {h + 1}" for h in range(heads)],
                f"{entry.label}: last-block CLS attention, {what}")
            pca = pca_rgb_image(tokens, grid, x, max_images=x.shape[0])
            out[f"pca_rgb/{entry.id}_{name}"] = labelled_grid(
                pca, size, rows, ["view", "patch features, PCA as RGB"], f"{entry.label}: patch features, {what}")
    finally:
        model.train(was_training)
    return out


def build_figures(entries, embeddings: dict, results: dict, fields, specs, size: int, device,
                  n_vis: int = 4) -> dict[str, np.ndarray]:
    """entries: the EvalModels; embeddings / results: {sampling: {model id: ...}}; specs: the independent views'
    specs (None when only aligned views were scored)."""
    labels = {e.id: e.label for e in entries}
    figures: dict[str, np.ndarray] = {}
    for key in ("cls", "patch_mean"):
        scales = _shared_scales(results, key)
        for sampling, models in results.items():
            figures[f"matrices/{sampling}_{key}"] = side_by_side_matrices(
                {labels[m]: a[key] for m, a in models.items()}, scales,
                f"{SAMPLING_TITLES[sampling]}, {key} embedding: one colour scale per row for all models")
    learned = [e for e in entries if e.learned]
    for sampling, embs in embeddings.items():
        for e in learned:
            for key in ("cls", "patch_mean"):
                figures[f"pca/{sampling}_{e.id}_{key}"] = pca_scatter_image(
                    embs[e.id], key, fields.plates, fields.batches,
                    f"{e.label}, {SAMPLING_TITLES[sampling]}: {key} embeddings of every view, PCA")
    for e in learned:
        if hasattr(e.module, "get_last_self_attention"):
            figures.update(_patch_figures(e, fields, specs, size, device, n_vis))
    return figures
