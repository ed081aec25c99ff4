#!/usr/bin/env python3
"""Does the data hold field identity that survives independent views? A hand-crafted answer, no learning.

  python bench/invariant_statistics.py --out stats.json [--plates 4 --wells 24 --sites 2 --size 192
         --val-fraction 0.5 --site-variation 1] [--view-sizes 48 96] [--config tiny] [--workdir DIR]

The evaluation's headline (cross-channel top-1 under independent views, dinocell.eval.view_sampling) cannot be
solved by layout: each view has its own crop, flip and quarter turn. What a view still shares with another channel's
view of the same field is the field's population: how dense, how large and how clustered its cells are. This script
describes every view by statistics that no crop position, flip or turn changes, and scores them with the
evaluation's own code (view_specs, embed_fields, analyse_embeddings: fluorescent channel pairs, top-1), next to the
pixel baselines and the positions-only probe:

  mask_spectrum   the radially averaged power spectrum of the view's foreground mask (above its own mean), 10
                  log-spaced frequency bands, as log shares of the total: the spatial scale of the cell pattern
                  (cell size, spacing, clustering), from positions alone but without where they are;
  spectrum        the same of the view's z-scored intensities: texture scale;
  quantiles       10 quantiles (5%..95%) of the z-scored intensities.

Each statistic is standardised per dimension over every view of every field (`global`) or per view type
(`per_view`, e.g. all DNA views, then all Mito views) before the cosine. Both use the held-out set's own statistics:
this is a reference for what a model could learn, not a method.

If these statistics score well above the pixel baselines, the data holds layout-free field identity and a model
that stays near the pixels is failing to learn it; bench/invariance_ceiling.py measures how far a backbone trained
directly on the task gets.

Where that identity lives (`regions`): the same statistics of two fluorescent channels of a field, each from a
quadrant of the field, either the same quadrant (the same cells, as overlapping crops share) or two disjoint ones
(top-left and bottom-left: the same population, other cells), resized to the view size, scored per channel pair and
averaged over the pairs. If the disjoint quadrants score near the pixels, the field identity the independent views
leave is the shared cells themselves, not the population's statistics. Prints and writes (--out) one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ablation_multiview import add_data_args, data_overrides, prepare_manifest  # bench/ is the script's directory
from torch import nn

from dinocell.channels import is_fluorescent
from dinocell.config import load_config, resolve_config_path
from dinocell.eval.evaluate import load_eval_fields, view_specs
from dinocell.eval.models import EvalModel, embed_fields, reference_models
from dinocell.eval.scoring import analyse_embeddings
from dinocell.eval.view_sampling import normalised_planes

STATISTICS = ("mask_spectrum", "spectrum", "quantiles")
BANDS = 10
BAND_GROUPS = {"coarse": slice(0, 4), "middle": slice(4, 7), "fine": slice(7, BANDS)}  # of the bands, low to high


def radial_bands(power: torch.Tensor, bands: int = BANDS) -> torch.Tensor:
    """[B, S, S] power spectrum (torch.fft.fft2 layout) -> [B, bands]: mean power in log-spaced radial frequency
    bands from 1/S to the corner (sqrt(2)/2 cycles per pixel), the zero frequency left out."""
    s = power.shape[-1]
    f = torch.fft.fftfreq(s, device=power.device)
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    edges = torch.logspace(math.log10(1.0 / s), math.log10(math.sqrt(0.5) + 1e-6), bands + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        ring = (radius >= lo) & (radius < hi)
        out.append(power[:, ring].mean(-1) if ring.any() else power.new_zeros(power.shape[0]))
    return torch.stack(out, -1)


def _log_shares(power: torch.Tensor) -> torch.Tensor:
    bands = radial_bands(power)
    return torch.log(bands / bands.sum(-1, keepdim=True).clamp_min(1e-12) + 1e-8)


class InvariantStatistics(nn.Module):
    """Per view: the chosen statistics (module docstring), concatenated; the interface of the pixel baselines."""

    patch_size = 1  # any view size is valid
    in_chans = 1

    def __init__(self, parts: tuple[str, ...] = STATISTICS):
        super().__init__()
        unknown = set(parts) - set(STATISTICS)
        if unknown or not parts:
            raise ValueError(f"InvariantStatistics: parts must be among {STATISTICS}, got {parts}")
        self.parts = tuple(parts)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        grey = x.float().mean(dim=1)
        z = (grey - grey.mean((-2, -1), keepdim=True)) / grey.std((-2, -1), keepdim=True).clamp_min(1e-6)
        mask = (z > 0).float()
        stats = {}
        if "mask_spectrum" in self.parts:
            stats["mask_spectrum"] = _log_shares(torch.fft.fft2(mask - mask.mean((-2, -1), keepdim=True)).abs() ** 2)
        if "spectrum" in self.parts:
            stats["spectrum"] = _log_shares(torch.fft.fft2(z).abs() ** 2)
        if "quantiles" in self.parts:
            stats["quantiles"] = torch.quantile(z.flatten(1), torch.linspace(0.05, 0.95, 10), dim=1).T
        v = torch.cat([stats[p] for p in self.parts], dim=1)
        return {"x_norm_clstoken": v, "x_norm_patchtokens": v[:, None, :]}


def standardised(embs: dict, per_view: bool) -> dict:
    """Each dimension z-scored over all views of all fields, or (per_view) over each view type's fields."""
    every = torch.cat([e["cls"] for e in embs.values()])
    mu, sd = every.mean(0), every.std(0).clamp_min(1e-6)
    out = {}
    for view, e in embs.items():
        c = e["cls"]
        if per_view:
            mu, sd = c.mean(0), c.std(0).clamp_min(1e-6)
        s = (c - mu) / sd
        out[view] = {"cls": s, "patch_mean": s}
    return out


def band_scores(embs: dict) -> dict[str, float]:
    """The mask spectrum's top-1 from each group of its bands alone (`embs`: InvariantStatistics(("mask_spectrum",))
    embeddings): which spatial scales carry the field identity."""
    return {name: top1(standardised({v: {"cls": e["cls"][:, sl]} for v, e in embs.items()}, per_view=False))
            for name, sl in BAND_GROUPS.items()}


def top1(embs: dict) -> float:
    """The evaluation's cross-channel top-1 (fluorescent channel pairs) of {view: {"cls": [fields, D], ...}}."""
    return float(analyse_embeddings(embs)["cls"]["summary"]["top1"])


def region_scores(val, norm: tuple[float, float], size: int, parts: tuple[str, ...] = STATISTICS) -> dict:
    """{"same_quadrant", "disjoint_quadrants"}: mean over fluorescent channel pairs of the statistics' top-1
    (globally standardised) between channel a's top-left quadrant and channel b's top-left / bottom-left one."""
    planes = normalised_planes(torch.from_numpy(np.stack(val.images)), val.channels, *norm)
    fluo = [c for c in val.channels if is_fluorescent(c)]
    half = planes[fluo[0]].shape[-2] // 2
    model = InvariantStatistics(parts)

    def stat(x: torch.Tensor) -> dict:
        v = model.forward_features(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True))
        return {"cls": v["x_norm_clstoken"], "patch_mean": v["x_norm_clstoken"]}

    out = {}
    for name, row in (("same_quadrant", 0), ("disjoint_quadrants", half)):
        pairs = [top1(standardised({a: stat(planes[a][..., :half, :half]),
                                    b: stat(planes[b][..., row:row + half, :half])}, per_view=False))
                 for i, a in enumerate(fluo) for b in fluo[i + 1:]]
        out[name] = float(np.mean(pairs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the scores")
    ap.add_argument("--workdir", default="", help="the synthetic bucket and manifest (default: a temporary one)")
    ap.add_argument("--view-sizes", type=int, nargs="+", default=[0],
                    help="view sides to score at (0: the config's augment.global_size, the evaluation's)")
    add_data_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = prepare_manifest(args, Path(args.workdir or tmp))
        cfg = load_config(resolve_config_path(args.config), data_overrides(args))
        val = load_eval_fields(manifest, cfg, [c for c in cfg.data.channels if is_fluorescent(c)] or None, 0, "val")
    norm = (float(cfg.augment.norm_mean), float(cfg.augment.norm_std))
    specs = view_specs(val, seed=0)  # the evaluation's views, seed 0
    result = {"args": vars(args), "held_out_fields": len(val.images), "chance": 1 / len(val.images), "scores": {}}
    for size in [s or int(cfg.augment.global_size) for s in args.view_sizes]:
        scores = {m.id: top1(embed_fields(m, val, size, "cpu", 64, "independent", specs))
                  for m in reference_models(norm, "cpu")}
        for parts in [STATISTICS, *[(p,) for p in STATISTICS]]:
            model = EvalModel("stats", "+".join(parts), InvariantStatistics(parts), *norm, "invariant statistics")
            embs = embed_fields(model, val, size, "cpu", 64, "independent", specs)
            for per_view in (False, True):
                scores[f"{'+'.join(parts)}/{'per_view' if per_view else 'global'}"] = top1(standardised(embs, per_view))
            if parts == ("mask_spectrum",):
                scores.update({f"mask_spectrum/{k}_bands": v for k, v in band_scores(embs).items()})
        scores.update({f"regions/{k}": v for k, v in region_scores(val, norm, size).items()})
        result["scores"][str(size)] = scores
        print(json.dumps({"view_size": size, **{k: round(v, 4) for k, v in scores.items()}}), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
