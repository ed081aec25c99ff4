"""Channel-consistency metrics: does the backbone give every channel of a field the same representation?

Each field is shown to the backbone once per *view*: every channel on its own, plus "mean" (the mean of the
fluorescent channels present, the view global crop 1 trains on). By default (`field_views`) views are whole fields
resized to size x size (antialiased, as the training crops), normalised like the training crops: every view of a field
then shows the cells at the same positions, so layout alone identifies the field (a pooled pixel vector does). The
evaluation passes its own `views_fn` (dinocell.eval.view_sampling: an independent crop, flip and rotation per view).

From the embeddings (view -> [B, D] for B fields):
- same-field matrix [V, V]: mean cosine between view i and view j of the SAME field (diagonal 1 by definition);
- different-field matrix [V, V]: mean cosine between view i of field a and view j of another field b (a != b).
  A collapsed model scores 1 on both, so the gap same - different is the number that means something;
- retrieval [V, V]: the query is field a's view i, the gallery every field's view j; the rank of field a's view j.
  Ties are broken pessimistically (a gallery item scoring within 1e-7 of the true match counts as ranked above
  it), so a collapsed model scores top-1 0 and MRR 1/B (no better than chance, 1/B and H_B/B) instead of 1.
- `summary`: the single numbers, over pairs of fluorescent channels (the "mean" view excluded: it holds a fifth of
  each channel's pixels), and the mean view against each fluorescent channel on its own (`mean_vs_channel`);
- `view_group`: the same numbers for any rows x columns block of views (e.g. brightfield against fluorescent).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dinocell.channels import is_fluorescent
from dinocell.log import get_logger

__all__ = [
    "MEAN_VIEW",
    "TIE_TOLERANCE",
    "default_normalisation",
    "different_field_matrix",
    "embed_views",
    "field_views",
    "retrieval",
    "same_field_matrix",
    "summary",
    "view_group",
]

log = get_logger(__name__)

MEAN_VIEW = "mean"
TIE_TOLERANCE = 1e-7  # cosine scores this close to the true match's count as ties (float noise is ~1e-16 here)
_QUERY_CHUNK = 2048  # queries per block in retrieval, bounding the [chunk, B] score matrix


def default_normalisation() -> tuple[float, float]:
    """(mean, std) of the training crops: AugmentConfig's defaults when that module is importable, else 0.449/0.226
    (ImageNet's mean/std averaged over RGB, the same values)."""
    try:
        from dinocell.data.multiview import AugmentConfig
    except ImportError:  # pragma: no cover - the augmentation module ships with the package
        return 0.449, 0.226
    cfg = AugmentConfig()
    return float(cfg.norm_mean), float(cfg.norm_std)


# ----------------------------------------------------------------------------------------------- views


def _check_fields(fields_u8, channel_names) -> torch.Tensor:
    fields = torch.as_tensor(fields_u8)
    if fields.dtype != torch.uint8 or fields.ndim != 4:
        raise ValueError(f"fields must be uint8 [B, C, H, W], got {fields.dtype} {tuple(fields.shape)}")
    names = list(channel_names)
    if len(names) != fields.shape[1]:
        raise ValueError(f"{len(names)} channel names {names} for {fields.shape[1]} channels")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate channel names: {names}")
    if MEAN_VIEW in names:
        raise ValueError(f"a channel may not be named {MEAN_VIEW!r} (reserved for the fluorescent mean view)")
    return fields


def field_views(fields_u8, channel_names, size: int, mean: float, std: float) -> dict[str, torch.Tensor]:
    """Whole fields -> {view: float [B, 1, size, size]}: "mean" first (when a fluorescent channel is present), then
    each channel in the given order. Resize: bilinear with antialiasing (an area-style filter when shrinking),
    the whole field to a square (JUMP fields are square; others are stretched); then (x/255 - mean)/std."""
    fields = _check_fields(fields_u8, channel_names)
    names = list(channel_names)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    x = fields.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x / 255.0 - mean) / std
    views: dict[str, torch.Tensor] = {}
    fluo = [i for i, n in enumerate(names) if is_fluorescent(n)]
    if fluo:
        views[MEAN_VIEW] = x[:, fluo].mean(dim=1, keepdim=True)  # linear, so equal to normalising the mean image
    else:
        log.warning("field_views: no fluorescent channel among %s: no %r view", names, MEAN_VIEW)
    for i, name in enumerate(names):
        views[name] = x[:, i : i + 1]
    return views


@torch.no_grad()
def embed_views(
    backbone,
    fields_u8,
    channel_names,
    size: int = 224,
    mean: float | None = None,
    std: float | None = None,
    device="cpu",
    batch_size: int = 64,
    views_fn=None,
) -> dict[str, dict[str, torch.Tensor]]:
    """{view: {"cls": [B, D], "patch_mean": [B, D]}} (float32, CPU) for every view of every field.

    views_fn(fields_u8_chunk, start) -> {view: float [b, 1, size, size]} makes the views of fields start..start+b
    (default: `field_views`, whole fields in the same orientation).

    The backbone runs in eval mode (restored afterwards) under no_grad, with bf16 autocast on CUDA. Fields are
    processed `batch_size` at a time, so only one chunk's views are in memory. A 3-channel backbone gets the grey
    view repeated on its 3 inputs; a 1-channel backbone gets it as is.
    """
    fields = _check_fields(fields_u8, channel_names)
    d_mean, d_std = default_normalisation()
    mean = d_mean if mean is None else mean
    std = d_std if std is None else std
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    in_chans = getattr(backbone, "in_chans", 1)
    if in_chans not in (1, 3):
        raise ValueError(f"embed_views: backbone takes {in_chans} input channels; supported: 1 or 3")
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    chunks: dict[str, dict[str, list[torch.Tensor]]] = {}
    try:
        for start in range(0, fields.shape[0], batch_size):
            part = fields[start : start + batch_size].to(device, non_blocking=True)
            views = (field_views(part, channel_names, size, mean, std) if views_fn is None
                     else views_fn(part, start))
            for view, x in views.items():
                if in_chans == 3:
                    x = x.expand(-1, 3, -1, -1)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out = backbone.forward_features(x)
                dst = chunks.setdefault(view, {"cls": [], "patch_mean": []})
                dst["cls"].append(out["x_norm_clstoken"].float().cpu())
                dst["patch_mean"].append(out["x_norm_patchtokens"].float().mean(dim=1).cpu())
    finally:
        backbone.train(was_training)
    return {view: {k: torch.cat(v) for k, v in d.items()} for view, d in chunks.items()}


# ----------------------------------------------------------------------------------------------- metrics


def _unit_embeddings(embs: dict, key: str) -> tuple[list[str], list[torch.Tensor]]:
    """Views in order and their L2-normalised [B, D] float64 embeddings, after checking shapes agree."""
    if not isinstance(embs, dict) or not embs:
        raise ValueError("embeddings: expected a non-empty dict view -> {key: [B, D]}")
    labels, units, shape = [], [], None
    for view, d in embs.items():
        if key not in d:
            raise KeyError(f"embeddings[{view!r}] has no {key!r} (has {sorted(d)})")
        e = torch.as_tensor(d[key]).detach().cpu().double()
        if e.ndim != 2:
            raise ValueError(f"embeddings[{view!r}][{key!r}] must be [B, D], got {tuple(e.shape)}")
        if shape is not None and e.shape != shape:
            raise ValueError(f"embeddings[{view!r}][{key!r}] is {tuple(e.shape)}, other views are {tuple(shape)}")
        shape = e.shape
        zero = int((e.norm(dim=1) == 0).sum())
        if zero:
            log.warning("embeddings[%r][%r]: %d all-zero vectors (cosine 0 with everything)", view, key, zero)
        labels.append(str(view))
        units.append(F.normalize(e, dim=1))
    if shape[0] < 2:
        raise ValueError(f"embeddings: need at least 2 fields, got {shape[0]}")
    return labels, units


def same_field_matrix(embs: dict, key: str = "cls") -> tuple[np.ndarray, list[str]]:
    labels, u = _unit_embeddings(embs, key)
    v = len(u)
    m = np.ones((v, v))
    for i in range(v):
        for j in range(i + 1, v):
            m[i, j] = m[j, i] = float((u[i] * u[j]).sum(dim=1).mean())
    return m, labels


def different_field_matrix(embs: dict, key: str = "cls") -> tuple[np.ndarray, list[str]]:
    labels, u = _unit_embeddings(embs, key)
    b = u[0].shape[0]
    sums = [x.sum(dim=0) for x in u]
    v = len(u)
    m = np.empty((v, v))
    for i in range(v):
        for j in range(v):
            # sum over all pairs (a, b) is sum_a u_a . sum_b v_b: O(B D) instead of a [B, B] matrix
            all_pairs = float(sums[i] @ sums[j])
            same = float((u[i] * u[j]).sum())
            m[i, j] = (all_pairs - same) / (b * (b - 1))
    return m, labels


def _ranks(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Rank (1 = best) of gallery[a] for query[a], ties pessimistic (see TIE_TOLERANCE)."""
    b = query.shape[0]
    out = torch.empty(b, dtype=torch.long)
    for start in range(0, b, _QUERY_CHUNK):
        q = query[start : start + _QUERY_CHUNK]
        scores = q @ gallery.T  # [chunk, B]
        idx = torch.arange(start, start + q.shape[0])
        true = scores[torch.arange(q.shape[0]), idx].unsqueeze(1)
        beats = scores >= true - TIE_TOLERANCE
        beats[torch.arange(q.shape[0]), idx] = False
        out[start : start + q.shape[0]] = 1 + beats.sum(dim=1)
    return out


def retrieval(embs: dict, key: str = "cls") -> dict:
    """{"top1": [V, V], "mrr": [V, V], "labels": views}: row i = query view, column j = gallery view."""
    labels, u = _unit_embeddings(embs, key)
    v = len(u)
    top1, mrr = np.empty((v, v)), np.empty((v, v))
    for i in range(v):
        for j in range(v):
            r = _ranks(u[i], u[j]).double()
            top1[i, j] = float((r == 1).double().mean())
            mrr[i, j] = float((1.0 / r).mean())
    return {"top1": top1, "mrr": mrr, "labels": labels}


def _off_diagonal_mean(m: np.ndarray, idx: list[int]) -> float:
    sub = m[np.ix_(idx, idx)]
    mask = ~np.eye(len(idx), dtype=bool)
    return float(sub[mask].mean())


def _block_mean(m: np.ndarray, rows: list[int], cols: list[int]) -> float:
    return float(m[np.ix_(rows, cols)].mean())


def _chance(n_fields: int) -> dict:
    return {"chance_top1": 1.0 / n_fields, "chance_mrr": sum(1.0 / k for k in range(1, n_fields + 1)) / n_fields}


def view_group(matrices: dict, labels: list[str], rows: list[str], cols: list[str], n_fields: int) -> dict:
    """The summary numbers of views `rows` against views `cols` (disjoint sets): block means of the same-field and
    different-field matrices, retrieval averaged over both query directions. matrices: {"same", "diff", "top1",
    "mrr"} [V, V] over `labels`."""
    r = [labels.index(v) for v in rows]
    c = [labels.index(v) for v in cols]
    if not r or not c or set(r) & set(c):
        raise ValueError(f"view_group: need two non-empty disjoint view sets, got {rows} and {cols}")
    out = {
        "views": list(rows),
        "against": list(cols),
        "same_field": _block_mean(matrices["same"], r, c),
        "different_field": _block_mean(matrices["diff"], r, c),
        "top1": (_block_mean(matrices["top1"], r, c) + _block_mean(matrices["top1"], c, r)) / 2,
        "mrr": (_block_mean(matrices["mrr"], r, c) + _block_mean(matrices["mrr"], c, r)) / 2,
        **_chance(n_fields),
    }
    out["gap"] = out["same_field"] - out["different_field"]
    return out


def summary(embs: dict, key: str = "cls") -> dict:
    """The headline numbers (plain floats/ints/strings, JSON-ready).

    same_field (the seed's single number): mean off-diagonal same-field cosine over pairs of fluorescent channels
    (the "mean" view excluded: it shares a fifth of its pixels with each channel, so it inflates every number);
    different_field: the same average over different fields; gap: same_field - different_field; top1 / mrr: mean
    off-diagonal retrieval over those views; chance_top1 = 1/B, chance_mrr = H_B / B (a random ranking).
    `mean_vs_channel`: the mean view against each fluorescent channel (view_group), None without a mean view.
    With fewer than 2 fluorescent channels, all views but "mean" are used (`summary_views` says which).
    """
    same, labels = same_field_matrix(embs, key)
    diff, _ = different_field_matrix(embs, key)
    ret = retrieval(embs, key)
    n_fields = int(torch.as_tensor(next(iter(embs.values()))[key]).shape[0])
    fluo = [i for i, name in enumerate(labels) if name != MEAN_VIEW and is_fluorescent(name)]
    if len(fluo) < 2:
        fluo = [i for i, name in enumerate(labels) if name != MEAN_VIEW]
        if len(fluo) < 2:
            raise ValueError(f"summary: need at least 2 channel views besides {MEAN_VIEW!r}, got {labels}")
        log.warning("summary: fewer than 2 fluorescent channels among %s: averaging over all channel views", labels)
    out = {
        "key": key,
        "n_fields": n_fields,
        "views": labels,
        "summary_views": [labels[i] for i in fluo],
        "same_field": _off_diagonal_mean(same, fluo),
        "different_field": _off_diagonal_mean(diff, fluo),
        "top1": _off_diagonal_mean(ret["top1"], fluo),
        "mrr": _off_diagonal_mean(ret["mrr"], fluo),
        **_chance(n_fields),
    }
    out["gap"] = out["same_field"] - out["different_field"]
    if len(labels) > len(fluo):
        everything = list(range(len(labels)))
        out["same_field_all_views"] = _off_diagonal_mean(same, everything)
        out["different_field_all_views"] = _off_diagonal_mean(diff, everything)
        out["top1_all_views"] = _off_diagonal_mean(ret["top1"], everything)
    matrices = {"same": same, "diff": diff, "top1": ret["top1"], "mrr": ret["mrr"]}
    channels = [labels[i] for i in fluo if is_fluorescent(labels[i])]
    out["mean_vs_channel"] = (view_group(matrices, labels, [MEAN_VIEW], channels, n_fields)
                              if MEAN_VIEW in labels and channels else None)
    for k, val in out.items():
        if isinstance(val, float) and not math.isfinite(val):
            raise ValueError(f"summary: {k} is {val} (non-finite embeddings for {key!r}?)")
    return out
