"""bench/invariant_statistics.py's statistics: unchanged by what the evaluation's independent views change (flip,
quarter turn, brightness), changed by what they keep (the cells' size and number)."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_bench


@pytest.fixture(scope="module")
def stats():
    return load_bench("invariant_statistics")


def _discs(n: int, radius: float, size: int = 48, seed: int = 0) -> torch.Tensor:
    """[1, 1, size, size]: n bright discs of `radius` at random places on a dark, slightly noisy background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = 0.05 * torch.rand(size, size, generator=g)
    for cy, cx in (torch.rand(n, 2, generator=g) * size).tolist():
        img = torch.maximum(img, (((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2).float())
    return img[None, None]


def _vector(stats, x: torch.Tensor) -> torch.Tensor:
    return stats.InvariantStatistics().forward_features(x)["x_norm_clstoken"][0]


def test_the_statistics_ignore_flips_quarter_turns_and_brightness(stats):
    x = _discs(12, 3.0)
    ref = _vector(stats, x)
    for changed in (torch.rot90(x, 1, (-2, -1)), torch.rot90(x, 3, (-2, -1)), x.flip(-1), x.flip(-2),
                    3.0 * x + 0.5):
        torch.testing.assert_close(_vector(stats, changed), ref, rtol=1e-4, atol=1e-4)


def test_the_statistics_tell_cell_size_and_number_apart(stats):
    small, large, many = _discs(12, 2.0), _discs(12, 5.0), _discs(40, 2.0, seed=1)
    same_kind = _vector(stats, _discs(12, 2.0, seed=2))  # other positions, same population
    d = {name: (_vector(stats, x) - _vector(stats, small)).norm().item()
         for name, x in (("large", large), ("many", many))}
    d_same = (same_kind - _vector(stats, small)).norm().item()
    assert d["large"] > 2 * d_same and d["many"] > 2 * d_same, (d, d_same)


def test_radial_bands_cover_every_frequency_but_zero(stats):
    power = torch.ones(1, 16, 16)
    bands = stats.radial_bands(power, bands=4)
    assert bands.shape == (1, 4)
    torch.testing.assert_close(bands, torch.ones(1, 4))  # each band is the mean of ones
    dc = torch.zeros(1, 16, 16)
    dc[0, 0, 0] = 1.0  # the zero frequency (the mean) is in no band
    torch.testing.assert_close(stats.radial_bands(dc, bands=4), torch.zeros(1, 4))
    corner = torch.zeros(1, 16, 16)
    corner[0, 8, 8] = 1.0  # the highest frequency (1/2, 1/2) is in the last band
    assert stats.radial_bands(corner, bands=4)[0, -1] > 0


def test_unknown_statistics_are_refused(stats):
    with pytest.raises(ValueError, match="parts must be among"):
        stats.InvariantStatistics(("moments",))


def test_standardised_per_view_centres_each_view_type(stats):
    g = torch.Generator().manual_seed(0)
    embs = {"DNA": {"cls": torch.randn(5, 3, generator=g) + 10},
            "Mito": {"cls": torch.randn(5, 3, generator=g) - 10}}
    per_view = stats.standardised(embs, per_view=True)
    for v in embs:
        torch.testing.assert_close(per_view[v]["cls"].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    pooled = stats.standardised(embs, per_view=False)
    assert pooled["DNA"]["cls"].mean() > 0.5 > -0.5 > pooled["Mito"]["cls"].mean()


def test_region_scores_tell_shared_cells_from_a_shared_population(stats):
    """Fields of one population (same disc count and size, other positions), each channel the same cells at its own
    brightness: the same quadrant of two channels finds its field, disjoint quadrants cannot (chance 1/12)."""
    from types import SimpleNamespace

    import numpy as np

    fields = []
    for f in range(12):
        cells = _discs(60, 3.0, size=96, seed=100 + f)[0, 0]
        fields.append(np.stack([(255 * (0.2 + 0.6 * k / 4) * cells.clamp(0, 1)).to(torch.uint8).numpy()
                                for k in range(5)]))
    val = SimpleNamespace(images=fields, channels=["DNA", "ER", "RNA", "AGP", "Mito"])
    scores = stats.region_scores(val, (0.5, 0.25), size=24, parts=("mask_spectrum",))
    assert scores["same_quadrant"] > 0.8, scores
    assert scores["disjoint_quadrants"] < 0.35, scores
