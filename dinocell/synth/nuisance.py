"""Nuisance effects of a synthetic bucket that no perturbation explains, as in real screens:

- batch and plate brightness: a multiplier per fluorescent channel for each batch (staining / microscope session) and
  for each plate (the plate's own, drawn in dinocell.synth.plan), the same for every well of the plate, so
  normalising against the plate's negative controls removes them;
- well position: edge wells (outer ring, half as much on the second ring) are dimmer and denser (evaporation), and every
  plate has its own smooth row/column brightness gradient;
- well-to-well density jitter (pipetting).

Each draws from its own seed stream (`seeded_rng(seed, TAG_NUISANCE, kind, ...)`).
"""

from __future__ import annotations

import numpy as np

from dinocell.channels import FLUORESCENT_CHANNELS
from dinocell.synth.cells import Phenotype
from dinocell.synth.seeds import TAG_NUISANCE, seeded_rng

__all__ = ["BATCH_BRIGHTNESS_SIGMA", "batch_brightness", "edge_weight", "well_effects"]

BATCH_BRIGHTNESS_SIGMA = 0.2  # log-scale spread of a batch's per-channel multiplier
EDGE_DIMMING = 0.12  # outer-ring wells lose this share of their brightness...
EDGE_DENSITY = 0.25  # ...and hold this much more cells
GRADIENT_SIGMA = 0.07  # log brightness change from the plate's centre to its edge, per axis
WELL_JITTER_SIGMA = 0.05  # log density, per well


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
