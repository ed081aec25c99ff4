"""bench/embedding_space.py: the per-dimension standardisation (the head-BatchNorm space is the library's fold,
tested in tests/test_cls_fold.py)."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_bench


@pytest.fixture(scope="module")
def space():
    return load_bench("embedding_space")


def test_standardised_z_scores_every_dimension_over_all_views_and_fields(space):
    g = torch.Generator().manual_seed(0)
    embs = {v: {"cls": torch.randn(5, 3, generator=g) * torch.tensor([0.1, 1.0, 10.0]) + 4.0,
                "patch_mean": torch.ones(5, 3)} for v in ("DNA", "RNA")}
    out = space.standardised(embs)
    every = torch.cat([out["DNA"]["cls"], out["RNA"]["cls"]])
    torch.testing.assert_close(every.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(every.std(0), torch.ones(3), atol=1e-5, rtol=0)
    raw = torch.cat([embs["DNA"]["cls"], embs["RNA"]["cls"]])  # the same affine map for every view
    torch.testing.assert_close(out["RNA"]["cls"], (embs["RNA"]["cls"] - raw.mean(0)) / raw.std(0))
    assert out["DNA"]["patch_mean"] is embs["DNA"]["patch_mean"]  # other embeddings untouched
