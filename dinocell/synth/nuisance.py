"""Nuisance effects of a synthetic bucket that no perturbation explains, as in real screens:

- batch and plate brightness: a multiplier per fluorescent channel for each batch (staining / microscope session) and
  for each plate (the plate's own, drawn in dinocell.synth.plan), the same for every well of the plate, so
  normalising against the plate's negative controls removes them;
- well position: edge wells (outer ring, half as much on the second ring) are dimmer and denser (evaporation), and every
  plate has its own smooth row/column brightness gradient;
- well-to-well density jitter (pipetting);
- site to site, the population context of each field (`site_effects`): local confluence (crowded fields hold more,
  smaller cells) and the cells' state there (chromatin texture, membrane staining, colony clustering), so that two
  fields of one well differ in more than where their cells lie, as real sites do. Perturbations do not move these
  state numbers (dinocell.synth.perturbations.EFFECT_SCALES), only density and size, which site context adds noise to.
  Off unless asked for (`site_variation`, default 0): at 2 sites per well the confluence noise swamps the planted
  density and size effects (measured in the README's profiling comparison).

Each draws from its own seed stream (`seeded_rng(seed, TAG_NUISANCE, kind, ...)`).
"""

from __future__ import annotations

import numpy as np

from dinocell.channels import FLUORESCENT_CHANNELS
from dinocell.synth.cells import Phenotype
from dinocell.synth.seeds import TAG_NUISANCE, seeded_rng

__all__ = ["BATCH_BRIGHTNESS_SIGMA", "SITE_SIGMAS", "batch_brightness", "edge_weight", "site_effects", "well_effects"]

BATCH_BRIGHTNESS_SIGMA = 0.2  # log-scale spread of a batch's per-channel multiplier
EDGE_DIMMING = 0.12  # outer-ring wells lose this share of their brightness...
EDGE_DENSITY = 0.25  # ...and hold this much more cells
GRADIENT_SIGMA = 0.07  # log brightness change from the plate's centre to its edge, per axis
WELL_JITTER_SIGMA = 0.05  # log density, per well
# Spread of each site's own population context at site_variation = 1 (log scale for confluence and radius).
SITE_SIGMAS = {
    "confluence": 0.35,  # log density (cell counts of one well's sites vary by about a third); crowding also shrinks
    "cell_radius": 0.1,  # the cells (CROWDING_SHRINK), on top of their own size spread
    "dna_texture": 0.15,
    "agp_edges": 0.15,
    "clustering": 0.2,
}
# The cell-state keys: added to the Phenotype field of the same name (confluence and radius are multiplicative).
SITE_STATE_KEYS = tuple(k for k in SITE_SIGMAS if k not in ("confluence", "cell_radius"))
CROWDING_SHRINK = 0.3  # log radius lost per unit of log confluence


def batch_brightness(seed: int, batch_index: int) -> dict[str, float]:
    """A batch's brightness multiplier per fluorescent channel."""
    rng = seeded_rng(seed, TAG_NUISANCE, 1, batch_index)
    return {ch: float(np.exp(rng.normal(0.0, BATCH_BRIGHTNESS_SIGMA))) for ch in FLUORESCENT_CHANNELS}


def edge_weight(row: int, col: int, rows: int, cols: int) -> float:
    """1 for the outer ring of wells, 0.5 for the second ring, else 0."""
    ring = min(row - 1, rows - row, col - 1, cols - col)
    return 1.0 if ring == 0 else 0.5 if ring == 1 else 0.0


def well_effects(
    ph: Phenotype, seed: int, plate_key: tuple[int, int], row: int, col: int, rows: int, cols: int
) -> Phenotype:
    """`ph` with the well-position effects and the well's density jitter of plate `plate_key` (batch, plate index)."""
    grad = seeded_rng(seed, TAG_NUISANCE, 2, *plate_key).normal(0.0, GRADIENT_SIGMA, 2)
    jitter = seeded_rng(seed, TAG_NUISANCE, 3, *plate_key, row, col).normal(0.0, WELL_JITTER_SIGMA)
    e = edge_weight(row, col, rows, cols)
    # -1..1 from the first to the last row / column
    y, x = (2 * row - rows - 1) / max(rows - 1, 1), (2 * col - cols - 1) / max(cols - 1, 1)
    light = (1.0 - EDGE_DIMMING * e) * float(np.exp(grad[0] * y + grad[1] * x))
    vals = ph.to_dict()
    vals["density"] *= (1.0 + EDGE_DENSITY * e) * float(np.exp(jitter))
    for ch in FLUORESCENT_CHANNELS:
        vals[f"brightness_{ch.lower()}"] *= light
    return Phenotype(**vals)


def site_effects(ph: Phenotype, seed: int, plate_key: tuple[int, int], row: int, col: int, site: int,
                 scale: float) -> Phenotype:
    """`ph` (a well's phenotype) as site `site` of that well sees it: its own confluence and cell state, `scale` times
    SITE_SIGMAS (0 = every site of a well shows the same phenotype)."""
    if scale == 0:
        return ph
    z = seeded_rng(seed, TAG_NUISANCE, 4, *plate_key, row, col, site).standard_normal(len(SITE_SIGMAS))
    d = {k: scale * s * float(v) for (k, s), v in zip(SITE_SIGMAS.items(), z, strict=True)}
    vals = ph.to_dict()
    vals["density"] *= float(np.exp(d["confluence"]))
    vals["cell_radius"] *= float(np.exp(d["cell_radius"] - CROWDING_SHRINK * d["confluence"]))
    for k in SITE_STATE_KEYS:
        vals[k] += d[k]
    return Phenotype(**vals)
