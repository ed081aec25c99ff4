"""Diagnostic images of a run (uint8 RGB arrays): attention maps, PCA-RGB patch-feature maps, PCA scatters of the
embeddings coloured by channel, matrix heatmaps.

Used by the trainer's visualiser (every `train.vis_every` iterations) and by the evaluation report; writing them is
the RunLogger's job (dinocell.monitor.run_log).
"""

from __future__ import annotations

import textwrap

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["COSINE_RANGE", "attention_maps_image", "matrix_image", "pca2", "pca_rgb_image", "pca_scatter_image"]

# The colour scale of cosine-similarity heatmaps: fixed, so the images of every step and every run compare.
COSINE_RANGE = (-1.0, 1.0)


def _as_images(images, n: int, where: str) -> torch.Tensor:
    """[B, C, H, W] float -> [n, H, W] in [0, 1]: channels averaged, each image min-max scaled on its own."""
    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim != 4 or images.shape[0] < n:
        raise ValueError(f"{where}: images must be [B >= {n}, C, H, W], got {tuple(images.shape)}")
    grey = images[:n].mean(dim=1)
    return _minmax(grey.reshape(n, -1)).reshape(grey.shape)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Scale each row of [N, K] to [0, 1] (constant rows -> 0)."""
    lo = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))


def _grid_maps(values: torch.Tensor, grid_hw, size_hw, where: str) -> torch.Tensor:
    """[N, HW] patch values -> [N, H, W] by nearest upsampling (each patch stays a visible square)."""
    gh, gw = (int(g) for g in grid_hw)
    if values.shape[-1] != gh * gw:
        raise ValueError(f"{where}: {values.shape[-1]} patch values do not match grid_hw {gh}x{gw} = {gh * gw}")
    maps = values.reshape(-1, 1, gh, gw)
    return F.interpolate(maps, size=tuple(size_hw), mode="nearest")[:, 0]


def _colormap(name: str) -> torch.Tensor:
    import matplotlib

    lut = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    return torch.from_numpy(lut).float()


def _tile(rows: list[list[torch.Tensor]], pad: int = 2) -> np.ndarray:
    """Rows of equally sized [H, W, 3] tiles in [0, 1] -> one uint8 image with `pad` white pixels between tiles."""
    h, w = rows[0][0].shape[:2]
    ncols = max(len(r) for r in rows)
    out = torch.ones(pad + len(rows) * (h + pad), pad + ncols * (w + pad), 3)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = tile
    return (out.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()


def attention_maps_image(
    attn, grid_hw, images, n_heads: int = 3, max_images: int = 8, alpha: float = 0.6
) -> np.ndarray:
    """One row per image: the input (grey), the head-averaged CLS attention over it, then `n_heads` single heads.

    attn [B, heads, HW] (from `get_last_self_attention`), images [B, C, H, W] float (channels averaged for display).
    Every map is min-max scaled on its own (attention weights are tiny and skewed) and drawn with 'inferno' over the
    grey input at opacity `alpha`.
    """
    attn = torch.as_tensor(attn).detach().float().cpu()
    if attn.ndim != 3:
        raise ValueError(f"attention_maps_image: attn must be [B, heads, HW], got {tuple(attn.shape)}")
    n = min(attn.shape[0], max_images)
    heads = min(max(int(n_heads), 0), attn.shape[1])
    grey = _as_images(images, n, "attention_maps_image")
    hw = grey.shape[1:]
    maps = torch.cat([attn[:n].mean(dim=1, keepdim=True), attn[:n, :heads]], dim=1)  # [n, 1 + heads, HW]
    maps = _minmax(maps.reshape(n * (1 + heads), -1))
    up = _grid_maps(maps, grid_hw, hw, "attention_maps_image").reshape(n, 1 + heads, *hw)
    lut = _colormap("inferno")
    rows = []
    for i in range(n):
        base = grey[i, :, :, None].expand(*hw, 3)
        row = [base]
        for k in range(1 + heads):
            heat = lut[(up[i, k] * 255).round().long()]
            row.append((1 - alpha) * base + alpha * heat)
        rows.append(row)
    return _tile(rows)


def pca_rgb_image(patch_tokens, grid_hw, images, max_images: int = 8) -> np.ndarray:
    """One row per image: the input (grey) and its patch features' first 3 principal components as RGB.

    The PCA is fitted jointly over the shown images' patches, and each component is min-max scaled over all of them,
    so equal colours mean similar features across images too. Component signs are fixed (largest loading positive)
    so the colours do not flip between calls on similar features.
    """
    tokens = torch.as_tensor(patch_tokens).detach().double().cpu()
    if tokens.ndim != 3:
        raise ValueError(f"pca_rgb_image: patch_tokens must be [B, HW, D], got {tuple(tokens.shape)}")
    n = min(tokens.shape[0], max_images)
    grey = _as_images(images, n, "pca_rgb_image")
    hw = grey.shape[1:]
    x = tokens[:n].reshape(-1, tokens.shape[2])
    x = x - x.mean(dim=0, keepdim=True)
    k = min(3, x.shape[1])
    if x.shape[0] > 1:
        _, vecs = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
        vecs = vecs[:, -k:].flip(1)
        signs = torch.sign(vecs.gather(0, vecs.abs().argmax(dim=0, keepdim=True)))
        comps = x @ (vecs * signs)
    else:
        comps = torch.zeros(x.shape[0], k, dtype=x.dtype)
    if k < 3:
        comps = torch.cat([comps, comps.new_zeros(comps.shape[0], 3 - k)], dim=1)
    rgb = _minmax(comps.T).T.float()  # [n * HW, 3], each component over all patches
    per_image = rgb.reshape(n, -1, 3).permute(0, 2, 1).reshape(n * 3, -1)
    up = _grid_maps(per_image, grid_hw, hw, "pca_rgb_image").reshape(n, 3, *hw).permute(0, 2, 3, 1)
    rows = [[grey[i, :, :, None].expand(*hw, 3), up[i]] for i in range(n)]
    return _tile(rows)


def pca2(x) -> np.ndarray:
    """[N, D] -> [N, 2]: the first two principal components of the rows (signs fixed: largest loading positive)."""
    x = torch.as_tensor(x).detach().double().cpu()
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"pca2: expected [N >= 2, D] rows, got {tuple(x.shape)}")
    x = x - x.mean(dim=0, keepdim=True)
    _, vecs = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    vecs = vecs[:, -2:].flip(1)
    if vecs.shape[1] < 2:  # D == 1: the second component is 0
        vecs = torch.cat([vecs, torch.zeros_like(vecs)], dim=1)
    signs = torch.sign(vecs.gather(0, vecs.abs().argmax(dim=0, keepdim=True)))
    signs[signs == 0] = 1
    return (x @ (vecs * signs)).numpy()


def _palette(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    if n <= 20:
        return [cmap(i % cmap.N) for i in range(n)]
    return [matplotlib.colormaps["hsv"](i / n) for i in range(n)]


def _render(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def pca_scatter_image(embs: dict, key: str = "cls", groupings: dict | None = None, title: str = "") -> np.ndarray:
    """Every view of every field projected on the first 2 PCs of all of them: one panel coloured by view (channel),
    then one per grouping of the fields ({name: one label per field}, e.g. {"plate": plates}).

    embs: {view: {key: [B, D]}} (dinocell.monitor.consistency.embed_views). Channel consistency shows as views of a
    field landing together, and the panels coloured by channel mixed; clusters by channel mean channel-specific
    features.
    """
    from matplotlib.figure import Figure

    views = list(embs)
    if not views or any(key not in embs[v] for v in views):
        raise ValueError(f"pca_scatter_image: every view needs a {key!r} embedding, got views {views}")
    n = int(torch.as_tensor(embs[views[0]][key]).shape[0])
    groupings = dict(groupings or {})
    for name, labels in groupings.items():
        if len(labels) != n:
            raise ValueError(f"pca_scatter_image: grouping {name!r} has {len(labels)} labels for {n} fields")
    pts = pca2(torch.cat([torch.as_tensor(embs[v][key]) for v in views]))
    colourings = [("view (channel)", [v for v in views for _ in range(n)])]
    colourings += [(name, [str(x) for x in labels] * len(views)) for name, labels in groupings.items()]
    fig = Figure(figsize=(5 * len(colourings), 4.8), dpi=90)
    for k, (name, labels) in enumerate(colourings):
        ax = fig.add_subplot(1, len(colourings), k + 1)
        groups = list(dict.fromkeys(labels))
        for g, colour in zip(groups, _palette(len(groups))):
            idx = [i for i, lab in enumerate(labels) if lab == g]
            ax.scatter(pts[idx, 0], pts[idx, 1], s=12, color=colour, label=g, alpha=0.8, linewidths=0)
        if len(groups) <= 16:
            ax.legend(fontsize=7, markerscale=1.5, loc="best")
        else:
            ax.text(0.01, 0.99, f"{len(groups)} {name}s (legend omitted)", transform=ax.transAxes, va="top",
                    fontsize=8)
        ax.set_title(f"coloured by {name}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    if title:
        # wrapped to the figure's width (about 9 px a character at 90 dpi): a one-line title is clipped on both sides
        fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * fig.dpi / 9)), fontsize=11)
    return _render(fig)


def matrix_image(
    matrix, labels, title: str = "", fmt: str = ".2f", vmin: float | None = None, vmax: float | None = None,
    cmap: str = "viridis",
) -> np.ndarray:  # fmt: skip
    """A [V, V] matrix as an annotated heatmap (rows and columns labelled), rendered with matplotlib's Agg backend.

    vmin / vmax fix the colour scale (default: the matrix's own range, which differs from image to image: pass them,
    e.g. COSINE_RANGE, when images of several steps or runs are compared). Values outside are drawn at the ends.
    """
    import matplotlib
    from matplotlib.figure import Figure

    m = np.asarray(torch.as_tensor(matrix).detach().cpu().double() if isinstance(matrix, torch.Tensor) else matrix,
                   dtype=np.float64)  # fmt: skip
    labels = [str(x) for x in labels]
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(labels):
        raise ValueError(f"matrix_image: expected a [V, V] matrix with V = {len(labels)} labels, got {m.shape}")
    v = len(labels)
    side = max(3.5, 0.65 * v + 2.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    finite = m[np.isfinite(m)]
    lo = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
    hi = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
    if not hi > lo:
        hi = lo + 1.0  # a constant matrix: any non-empty scale
    im = ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi)
    ax.set_xticks(range(v), labels=labels, rotation=45, ha="right")
    ax.set_yticks(range(v), labels=labels)
    colours = matplotlib.colormaps[cmap]
    for i in range(v):
        for j in range(v):
            val = m[i, j]
            text = format(val, fmt) if np.isfinite(val) else "nan"
            # text readable on its cell whatever the colormap (diverging ones are light in the middle); NaN: blank
            r, g, b, _ = colours(float(np.clip((val - lo) / (hi - lo), 0, 1))) if np.isfinite(val) else (1, 1, 1, 1)
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _render(fig)
