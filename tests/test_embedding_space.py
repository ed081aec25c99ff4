"""bench/embedding_space.py: the per-dimension standardisation and the head's BatchNorm it scores the CLS in."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_bench

from dinocell.config import load_config, packaged_config
from dinocell.train.ssl_model import SSLMetaArch


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


def test_head_batchnorm_is_the_teachers_eval_mode_norm_from_a_checkpoint_section(space):
    cfg = load_config(packaged_config("tiny"), ["model.head_bn=true", "model.head_nlayers=0"])
    meta = SSLMetaArch(cfg.model, cfg.loss, precision="fp32")
    t_bn = meta.teacher.dino_head.input_norm
    with torch.no_grad():  # statistics as training leaves them
        t_bn.running_mean.uniform_(-1, 1), t_bn.running_var.uniform_(0.5, 2), t_bn.weight.uniform_(0.5, 2)
    bn = space.head_batchnorm(meta.teacher.state_dict())
    x = torch.randn(7, cfg.model.embed_dim)
    torch.testing.assert_close(space.through(bn, {"DNA": {"cls": x}})["DNA"]["cls"], t_bn.eval()(x))
    plain = SSLMetaArch(load_config(packaged_config("tiny")).model, cfg.loss, precision="fp32")
    assert space.head_batchnorm(plain.teacher.state_dict()) is None  # no head BatchNorm: no such space
