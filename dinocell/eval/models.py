"""The models an evaluation scores side by side, and embedding the held-out fields' views with each.

Models (ids -> labels): "checkpoint"; its baseline, "initial_weights" ("initial weights": the run's starting point)
or "baseline" (another checkpoint); the pixel baselines "pixels_8x8" / "pixels_16x16" and the "positions_only"
probe (dinocell.eval.pixel_baseline). All are embedded through consistency.embed_views with the same views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dinocell.eval.checkpoint_reader import BackboneInfo, load_backbone, load_init_backbone
from dinocell.eval.pixel_baseline import PIXEL_GRIDS, PixelBackbone, PositionsProbe
from dinocell.eval.view_sampling import IndependentViews, ViewSpec
from dinocell.monitor import consistency

__all__ = ["EvalModel", "baseline_model", "embed_fields", "reference_models"]


@dataclass
class EvalModel:
    id: str
    label: str
    module: torch.nn.Module
    norm_mean: float
    norm_std: float
    description: str
    info: BackboneInfo | None = None  # None for the pixel baselines
    learned: bool = True  # False: a reference without learning (pixels, positions)


def baseline_model(baseline: str | None, info: BackboneInfo, which: str, device) -> EvalModel | None:
    """The checkpoint's baseline: "init" (its initial weights), "none" or a checkpoint URI."""
    if baseline in (None, "", "none"):
        return None
    if baseline == "init":
        m, i = load_init_backbone(info, in_chans=1, device=device)
        return EvalModel("initial_weights", "initial weights", m, i.norm_mean, i.norm_std,
                         f"the run's starting weights: {i.source}", i)
    m, i = load_backbone(baseline, which=which, in_chans=1, device=device)
    return EvalModel("baseline", "baseline", m, i.norm_mean, i.norm_std, f"checkpoint {i.source}", i)


def reference_models(norm: tuple[float, float], device, positions: bool = True) -> list[EvalModel]:
    """The pixel baselines (and the positions-only probe), normalised like the checkpoint's views."""
    out = [EvalModel(f"pixels_{g}x{g}", f"pixels {g}x{g}", PixelBackbone(g).to(device), *norm,
                     f"the view average-pooled to {g}x{g}, minus its mean (no learning)", learned=False)
           for g in PIXEL_GRIDS]
    if positions:
        out.append(EvalModel("positions_only", "positions only", PositionsProbe().to(device), *norm,
                             "binary mask (view > its mean) through a fixed random 5x5 conv, pooled to 8x8: sees "
                             "only where cells are", learned=False))
    return out


def embed_fields(model: EvalModel, fields, size: int, device, batch_size: int, sampling: str,
                 specs: list[dict[str, ViewSpec]] | None = None) -> dict:
    """{view: {"cls", "patch_mean"}} for every field (evaluation order). sampling "aligned": whole fields
    (consistency.field_views); "independent": each view cut by its spec. Fields of different sizes are embedded
    in groups of equal size and put back in order."""
    if sampling == "independent" and specs is None:
        raise ValueError("embed_fields: independent views need their view specs")
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(fields.images):
        groups.setdefault(img.shape, []).append(i)
    parts = []
    for idx in groups.values():
        stack = torch.from_numpy(np.stack([fields.images[i] for i in idx]))
        views_fn = None
        if sampling == "independent":
            views_fn = IndependentViews([specs[i] for i in idx], fields.channels, size, model.norm_mean,
                                        model.norm_std)
        parts.append((idx, consistency.embed_views(model.module, stack, fields.channels, size=size,
                                                   mean=model.norm_mean, std=model.norm_std, device=device,
                                                   batch_size=batch_size, views_fn=views_fn)))
    if len(parts) == 1:
        return parts[0][1]
    order = torch.tensor([i for idx, _ in parts for i in idx]).argsort()  # back to evaluation order
    views = parts[0][1]
    return {v: {k: torch.cat([p[v][k] for _, p in parts])[order] for k in views[v]} for v in views}
