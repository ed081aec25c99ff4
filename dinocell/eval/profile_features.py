"""Per-field features for profiling: the held-out fields as the JUMP consortium profiles them, not as crops.

A field's feature vector is the concatenation, over its fluorescent channels (each channel shown to the backbone on
its own, the way the model is trained), of the CLS embedding averaged over a tiling of the field: non-overlapping
`size` x `size` tiles at the preprocessed resolution, centred (a field smaller than one tile is resized to it).
Tiling keeps the cells at the scale the model trained on; averaging the tiles (then the sites of a well, in
dinocell.eval.profiles) gives the well profile.

Fields are chosen as whole plates (plates ordered by the sha256 of their name, until the next plate would pass
`max_fields`): per-plate normalisation needs every negative-control well of a plate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dinocell.jump.manifest import FieldRecord
from dinocell.log import get_logger

__all__ = ["DEFAULT_MAX_TILES", "field_features", "profile_meta", "select_plates", "tile_origins"]

log = get_logger(__name__)

DEFAULT_MAX_TILES = 16  # 4 x 4 tiles of 224 px cover a 1080 px field at full resolution; more adds little


def select_plates(records: Sequence[FieldRecord], max_fields: int) -> tuple[list[FieldRecord], list[str]]:
    """Records of whole plates, plates in sha256(batch/plate) order, until the next plate would pass max_fields
    (at least one plate; max_fields 0 = all). Returns (records, the plates chosen)."""
    if max_fields < 0:
        raise ValueError(f"profiling max_fields must be >= 0 (0 = all), got {max_fields}")
    by_plate: dict[tuple[str, str], list[FieldRecord]] = {}
    for r in records:
        by_plate.setdefault((r.batch, r.plate), []).append(r)
    order = sorted(by_plate, key=lambda k: hashlib.sha256(f"{k[0]}/{k[1]}".encode()).hexdigest())
    chosen, out = [], []
    for key in order:
        if max_fields and chosen and len(out) + len(by_plate[key]) > max_fields:
            break
        chosen.append(key)
        out.extend(by_plate[key])
    return out, [f"{b}/{p}" for b, p in chosen]


def tile_origins(height: int, width: int, size: int, max_tiles: int = DEFAULT_MAX_TILES) -> list[tuple[int, int]]:
    """Top-left corners of the centred grid of non-overlapping size x size tiles (at most max_tiles, the central
    ones); [] when the field is smaller than one tile (the caller resizes the whole field)."""
    ny, nx = height // size, width // size
    if ny == 0 or nx == 0:
        return []
    y0, x0 = (height - ny * size) // 2, (width - nx * size) // 2
    cells = [(y0 + i * size, x0 + j * size) for i in range(ny) for j in range(nx)]
    if len(cells) > max_tiles:  # keep the tiles nearest the centre (vignetting is worst at the corners)
        cy, cx = height / 2, width / 2
        cells.sort(key=lambda yx: (yx[0] + size / 2 - cy) ** 2 + (yx[1] + size / 2 - cx) ** 2)
        cells = sorted(cells[:max_tiles])
    return cells


def _tiles(image: torch.Tensor, size: int, max_tiles: int) -> torch.Tensor:
    """uint8 [C, H, W] -> float [T, C, size, size] (0..255)."""
    c, h, w = image.shape
    x = image.float()
    origins = tile_origins(h, w, size, max_tiles)
    if not origins:
        return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return torch.stack([x[:, y : y + size, xx : xx + size] for y, xx in origins])


@torch.no_grad()
def field_features(
    backbone,
    images: Sequence[np.ndarray],
    channels: Sequence[str],
    feature_channels: Sequence[str],
    *,
    size: int,
    mean: float,
    std: float,
    device="cpu",
    batch_size: int = 64,
    max_tiles: int = DEFAULT_MAX_TILES,
) -> np.ndarray:
    """[N, len(feature_channels) * D] float32: per channel, the tile-averaged CLS embedding, concatenated."""
    idx = [list(channels).index(c) for c in feature_channels]
    if not idx:
        raise ValueError("profiling: no feature channels")
    device = torch.device(device)
    in_chans = getattr(backbone, "in_chans", 1)
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for img in images:
            tiles = _tiles(torch.from_numpy(np.ascontiguousarray(img)), size, max_tiles)[:, idx]  # [T, V, s, s]
            t, v = tiles.shape[:2]
            x = ((tiles / 255.0 - mean) / std).reshape(t * v, 1, size, size)
            cls = []
            for start in range(0, x.shape[0], batch_size):
                part = x[start : start + batch_size].to(device)
                if in_chans == 3:
                    part = part.expand(-1, 3, -1, -1)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    cls.append(backbone.forward_features(part)["x_norm_clstoken"].float().cpu())
            emb = torch.cat(cls).reshape(t, v, -1).mean(dim=0)  # average the tiles, per channel
            out.append(emb.reshape(-1).numpy())
    finally:
        backbone.train(was_training)
    feats = np.stack(out).astype(np.float32)
    if not np.isfinite(feats).all():
        raise ValueError("profiling: non-finite field features")
    return feats


def profile_meta(field_ids: Sequence[str], records: dict[str, FieldRecord]) -> pd.DataFrame:
    """One row per field: batch, plate, well, site and the plate-map annotations discovery put in the manifest."""
    rows = []
    for fid in field_ids:
        r = records[fid]
        rows.append({"field_id": fid, "batch": r.batch, "plate": r.plate, "well": r.well, "site": r.site,
                     "perturbation": r.perturbation, "control_type": r.control_type, "target": r.target})
    return pd.DataFrame(rows)
