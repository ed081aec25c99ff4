"""Seed streams of a synthetic bucket: every purpose draws from its own stream (`seeded_rng(seed, TAG_..., ...)`), so
changing one part of a run (the layout, the faults) leaves the others (plates, pixels) alone."""

from __future__ import annotations

import numpy as np

__all__ = ["TAG_FAULTS", "TAG_FIELD", "TAG_LAYOUT", "TAG_NUISANCE", "TAG_PLAN", "TAG_STRAY", "seeded_rng"]

TAG_PLAN, TAG_FIELD, TAG_FAULTS, TAG_STRAY = 101, 202, 303, 404
TAG_LAYOUT, TAG_NUISANCE = 505, 606  # the plate layout and perturbation effects; batch / well-position effects


def seeded_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))
