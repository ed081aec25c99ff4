"""bench/invariance_ceiling.py's training pieces (the bench itself runs for minutes and is not run here): the DINO
objective is the training's DINO term with an EMA teacher, the curriculum ends at the evaluation's views, and
--objective infonce is the symmetric InfoNCE it claims to be."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from bench_scripts import load_bench

from dinocell.config import load_config, resolve_config_path
from dinocell.eval.view_sampling import DEFAULT_SCALE
from dinocell.loss import sinkhorn_knopp
from dinocell.model.vit import build_vit


@pytest.fixture(scope="module")
def ceiling():
    return load_bench("invariance_ceiling")


@pytest.fixture()
def cfg():
    return load_config(resolve_config_path("tiny"), ["model.n_prototypes=8"])


@pytest.fixture()
def cfg_bn():
    """The same with the head's BatchNorm (what --head-bn sets)."""
    return load_config(resolve_config_path("tiny"), ["model.n_prototypes=8", "model.head_bn=true"])


def _backbone(cfg):
    torch.manual_seed(0)
    return build_vit(cfg.model.arch, **{**cfg.model.backbone_kwargs(student=False), "in_chans": 1})


def test_curriculum_goes_from_aligned_whole_fields_to_the_evaluations_views(ceiling):
    assert ceiling._curriculum(0, 100) == pytest.approx((0.9, 1.0))
    assert ceiling._curriculum(50, 100) == pytest.approx(((0.9 + DEFAULT_SCALE[0]) / 2, 0.5))
    assert ceiling._curriculum(100, 100) == pytest.approx((DEFAULT_SCALE[0], 0.0))
    assert ceiling._curriculum(500, 100) == pytest.approx((DEFAULT_SCALE[0], 0.0))
    assert ceiling._curriculum(1, 0) == pytest.approx((DEFAULT_SCALE[0], 0.0))  # no curriculum


def test_dino_objective_is_the_dino_term_plus_koleo_and_its_teacher_follows_by_ema(ceiling, cfg):
    obj = ceiling._DINOTerm(_backbone(cfg), cfg, koleo=0.0)
    assert not any(p.requires_grad for p in obj.teacher.parameters())
    assert {id(p) for p in obj.parameters()} == {id(p) for p in obj.student.parameters()}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * 3, 1, 16, 16, generator=g)
    obj.train()
    loss = obj(x)
    # by hand: view 1's teacher targets teach the student's view 2 and back, mean cross-entropy over fields
    with torch.no_grad():
        assert obj.teacher["head"].input_norm is None  # no --head-bn: the head sees the CLS as is
        t = sinkhorn_knopp(obj.teacher["head"](obj.teacher["backbone"].forward_features(x)["x_norm_clstoken"]),
                           cfg.loss.teacher_temp, cfg.loss.sinkhorn_iterations)
        s = F.log_softmax(obj.student["head"](obj.student["backbone"].forward_features(x)["x_norm_clstoken"])
                          / cfg.loss.student_temp, dim=-1)
    ce = lambda a, b: -(t[a] * s[b]).sum(-1).mean()  # noqa: E731
    assert loss.item() == pytest.approx(0.5 * (ce(slice(0, 3), slice(3, 6)) + ce(slice(3, 6), slice(0, 3))).item(),
                                        rel=1e-5)
    # one optimiser step moves the student; after_step moves the teacher by exactly the momentum's share
    opt = torch.optim.SGD(obj.parameters(), lr=1.0)
    before = [p.detach().clone() for p in obj.teacher.parameters()]
    loss.backward()
    opt.step()
    obj.after_step()
    m = float(cfg.optim.momentum_teacher)
    moved = 0
    for b, t_p, s_p in zip(before, obj.teacher.parameters(), obj.student.parameters(), strict=True):
        torch.testing.assert_close(t_p, m * b + (1 - m) * s_p, rtol=1e-6, atol=1e-7)
        moved += int(not torch.equal(t_p, b))
    assert moved > 0


def test_dino_koleo_weight_defaults_to_the_configs(ceiling, cfg, cfg_bn):
    assert ceiling._DINOTerm(_backbone(cfg), cfg, koleo=-1.0).koleo_weight == cfg.loss.koleo_weight
    assert ceiling._DINOTerm(_backbone(cfg_bn), cfg_bn, koleo=1.0).koleo_weight == 1.0


def test_infonce_objective_is_symmetric_and_at_log_batch_for_identical_embeddings(ceiling, cfg):
    obj = ceiling._InfoNCE(_backbone(cfg), temp=0.1)
    obj.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(cfg.model.embed_dim, 4))
    torch.nn.init.zeros_(obj.head[1].weight)
    torch.nn.init.ones_(obj.head[1].bias)  # every field the same embedding: no view finds its partner
    x = torch.randn(2 * 5, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    assert obj(x).item() == pytest.approx(math.log(5), rel=1e-5)


def test_head_probe_embeds_the_heads_unit_bottleneck(ceiling, cfg_bn):
    obj = ceiling._DINOTerm(_backbone(cfg_bn), cfg_bn, koleo=-1.0)
    probe = ceiling._HeadProbe(obj.teacher)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    out = probe.forward_features(x)
    assert out["x_norm_clstoken"].shape == (4, cfg_bn.model.head_bottleneck_dim)
    torch.testing.assert_close(out["x_norm_clstoken"].norm(dim=-1), torch.ones(4))


def test_head_bn_teacher_normalises_with_the_students_running_statistics(ceiling, cfg_bn):
    obj = ceiling._DINOTerm(_backbone(cfg_bn), cfg_bn, koleo=-1.0)
    obj.train()
    obj(torch.randn(2 * 4, 1, 16, 16, generator=torch.Generator().manual_seed(4))).backward()
    obj.after_step()
    s_bn, t_bn = obj.student["head"].input_norm, obj.teacher["head"].input_norm
    assert not torch.equal(s_bn.running_mean, torch.zeros_like(s_bn.running_mean))  # the batch moved them
    torch.testing.assert_close(t_bn.running_mean, s_bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(t_bn.running_var, s_bn.running_var, rtol=0, atol=0)


def test_dino_centering_targets_are_the_softmax_of_centred_teacher_logits(ceiling, cfg):
    obj = ceiling._DINOTerm(_backbone(cfg), cfg, koleo=0.0, centering=0.9)
    obj.center.fill_(0.25)  # a running centre from earlier batches
    x = torch.randn(2 * 3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    obj.train()
    loss = obj(x)
    with torch.no_grad():
        logits = obj.teacher["head"](obj.teacher["backbone"].forward_features(x)["x_norm_clstoken"])
        t = F.softmax((logits - 0.25) / cfg.loss.teacher_temp, dim=-1)  # the centre before this batch's update
        s = F.log_softmax(obj.student["head"](obj.student["backbone"].forward_features(x)["x_norm_clstoken"])
                          / cfg.loss.student_temp, dim=-1)
    ce = lambda a, b: -(t[a] * s[b]).sum(-1).mean()  # noqa: E731
    assert loss.item() == pytest.approx(0.5 * (ce(slice(0, 3), slice(3, 6)) + ce(slice(3, 6), slice(0, 3))).item(),
                                        rel=1e-5)
    # the centre follows the batch mean of the teacher's logits by EMA
    torch.testing.assert_close(obj.center, 0.9 * 0.25 + 0.1 * logits.mean(0, keepdim=True), rtol=1e-6, atol=1e-7)


def test_param_groups_decay_every_parameter_by_default_or_follow_the_trainers_rule(ceiling, cfg_bn):
    obj = ceiling._DINOTerm(_backbone(cfg_bn), cfg_bn, koleo=-1.0)
    student = list(obj.parameters())
    (every,) = ceiling._param_groups(obj, decay_norms=True)  # the runs in bench/measured: one group, the student
    assert [id(p) for p in every["params"]] == [id(p) for p in student] and "weight_decay" not in every
    decayed, exempt = ceiling._param_groups(obj, decay_norms=False)
    names = {id(p): n for n, p in obj.named_parameters()}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    assert exempt["weight_decay"] == 0.0 and len(decayed["params"]) + len(exempt["params"]) == len(student)
    assert {"student.backbone.norm.weight", "student.backbone.norm.bias", "student.head.input_norm.weight"} <= exempt_names
    assert "student.head.last_layer.weight" in {names[id(p)] for p in decayed["params"]}
    assert not any(n.startswith("teacher.") for n in exempt_names)
