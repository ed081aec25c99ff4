"""SSL training core: config sections, schedules, optimizer groups, EMA teacher, loss composition on a tiny model."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dinocell.config import Config, ConfigError, config_from_dict, load_config, packaged_config
from dinocell.config.training import LossConfig, ModelConfig, OptimConfig, validate_training_config
from dinocell.loss import collate_masks, sinkhorn_knopp
from dinocell.model import build_vit
from dinocell.train.optim import apply_schedules, build_optimizer, build_param_groups, param_rule
from dinocell.train.schedules import CosineSchedule, TrainingSchedules
from dinocell.train.ssl_model import SSLInputs, SSLMetaArch

torch.set_num_threads(2)


def tiny_model_cfg(**kw) -> ModelConfig:
    base = {"arch": "vit_tiny", "embed_dim": 32, "depth": 2, "num_heads": 2, "n_prototypes": 64, "head_hidden_dim": 48,
            "head_bottleneck_dim": 16, "drop_path_rate": 0.0, "rope_rescale": 0.0, "layerscale": 0.1}
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def tiny_inputs(batch=4, n_local=2, g=16, loc=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    glob = torch.randn(2 * batch, 1, g, g, generator=gen)
    local = torch.randn(n_local * batch, 1, loc, loc, generator=gen)
    masks = collate_masks(2 * batch, (g // 8, g // 8), (0.1, 0.5), 0.5, generator=seed)
    return SSLInputs(glob, local, masks)


# ----------------------------------------------------------------------------------------------- config


def test_config_defaults_are_the_seed_values():
    cfg = Config()
    assert (cfg.model.arch, cfg.model.patch_size, cfg.model.in_chans, cfg.model.n_prototypes) == ("vit_small", 8, 1, 65536)
    assert (cfg.loss.dino_weight, cfg.loss.ibot_weight, cfg.loss.koleo_weight) == (1.0, 1.0, 0.1)
    assert (cfg.loss.student_temp, cfg.loss.teacher_temp, cfg.loss.warmup_teacher_temp) == (0.1, 0.07, 0.04)
    assert cfg.loss.mask_ratio_min_max == (0.1, 0.5) and cfg.loss.sinkhorn_iterations == 3
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.epochs, o.iters_per_epoch, o.warmup_epochs) == (5e-5, 0.04, 100, 2400, 10.0)
    assert (o.momentum_teacher, o.clip_grad, o.layer_decay, o.patch_embed_lr_mult) == (0.996, 3.0, 1.0, 1.0)
    assert cfg.loader.batch_size == 64 and cfg.augment.global_size == 224 and cfg.augment.n_local == 8


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.warmup_epochs=101", "optim.warmup_epochs must be in"),
        ("optim.min_lr=1.0", "optim.min_lr must be in"),
        ("optim.layer_decay=0", "optim.layer_decay"),
        ("loss.mask_ratio_min_max=[0.6, 0.2]", "loss.mask_ratio_min_max"),
        ("loss.teacher_temp=0", "loss.teacher_temp must be > 0"),
        ("model.arch=vit_huge", "model.arch must be one of"),
        ("model.drop_path_rate=1.0", "model.drop_path_rate"),
        ("train.nan_policy=ignore", "must be one of"),
        ("train.precision=fp16", "must be one of"),
        ("optim.lrr=1", "did you mean 'lr'"),
    ],
)
def test_config_rejects_nonsense(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_cross_section_checks():
    cfg = config_from_dict({"optim": {"epochs": 10, "warmup_epochs": 1}, "loader": {"shards": "x/index.json"}})
    with pytest.raises(ConfigError, match="loss.warmup_teacher_temp_epochs=30.0 exceeds optim.epochs=10"):
        validate_training_config(cfg)
    cfg.loss.warmup_teacher_temp_epochs = 5
    cfg.augment.global_size = 100  # not a multiple of the patch size 8
    with pytest.raises(ConfigError, match="multiples of model.patch_size"):
        validate_training_config(cfg)
    cfg.augment.global_size = 96
    validate_training_config(cfg)
    cfg.loader.shards = ""
    with pytest.raises(ConfigError, match="loader.shards is empty"):
        validate_training_config(cfg)


@pytest.mark.parametrize("name", ["tiny", "vits8_jump"])
def test_packaged_configs_load_and_validate(name):
    cfg = load_config(packaged_config(name), ["loader.shards=s3://b/shards/index.json",
                                              "model.pretrained=s3://b/weights/dinov3_vits16_pretrain_lvd1689m-08c60483.pth"])
    validate_training_config(cfg)
    if name == "vits8_jump":  # the seed's run: defaults everywhere that matters
        assert cfg.model.arch == "vit_small" and cfg.optim.lr == 5e-5 and cfg.train.precision == "bf16"
        assert cfg.optim.epochs * cfg.optim.iters_per_epoch == 240_000


# ----------------------------------------------------------------------------------------------- schedules


def test_cosine_schedule_hand_values():
    s = CosineSchedule(base_value=1.0, final_value=0.0, total_iters=10, warmup_iters=2, start_warmup_value=0.2)
    assert s(0) == pytest.approx(0.2) and s(1) == pytest.approx(0.6)  # linear 0.2 -> 1.0 over 2 iterations
    assert s(2) == pytest.approx(1.0)  # cosine start
    assert s(6) == pytest.approx(0.5)  # half-way through the 8 cosine iterations: cos(pi/2) = 0
    assert s(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert s(10) == 0.0 and s(1000) == 0.0  # past the end: the final value
    arr = s.array()
    assert arr.shape == (10,) and arr[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    frozen = CosineSchedule(1.0, 1.0, 10, warmup_iters=2, freeze_iters=3)
    assert [frozen(i) for i in range(6)] == [0.0, 0.0, 0.0, 0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="exceed the total"):
        CosineSchedule(1.0, 0.0, 5, warmup_iters=6)


def test_training_schedules_from_config():
    optim = OptimConfig(lr=1e-3, min_lr=1e-5, epochs=4, iters_per_epoch=10, warmup_epochs=1, momentum_teacher=0.992,
                        momentum_teacher_end=1.0, weight_decay=0.04, weight_decay_end=0.4, freeze_last_layer_epochs=1)
    loss = LossConfig(warmup_teacher_temp_epochs=2)
    s = TrainingSchedules.from_config(optim, loss, iters_per_epoch=10)
    assert s.total_iters == 40
    at = [s.at(i) for i in range(40)]
    assert at[0]["lr"] == 0.0 and at[5]["lr"] == pytest.approx(5e-4) and at[10]["lr"] == pytest.approx(1e-3)
    assert at[39]["lr"] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 29 / 30)))
    # the last layer is frozen for the first epoch (lr 0), then follows the lr exactly (not shifted)
    assert all(a["last_layer_lr"] == 0.0 for a in at[:10]) and all(a["last_layer_lr"] == a["lr"] for a in at[10:])
    assert at[0]["momentum"] == pytest.approx(0.992) and s.at(40)["momentum"] == 1.0
    assert at[0]["wd"] == pytest.approx(0.04) and s.at(40)["wd"] == pytest.approx(0.4)
    temps = [a["teacher_temp"] for a in at]
    assert temps[0] == pytest.approx(0.04) and temps[10] == pytest.approx(0.055) and temps[20:] == [0.07] * 20
    assert all(b >= a for a, b in itertools.pairwise(temps))


# ----------------------------------------------------------------------------------------------- optimizer


def test_param_groups_weight_decay_layer_decay_and_last_layer():
    meta = SSLMetaArch(tiny_model_cfg(), LossConfig(), precision="fp32")
    depth = meta.depth
    groups = build_param_groups(meta.student_named_parameters(), depth, layer_decay=0.5, patch_embed_lr_mult=0.2)
    seen = [n for g in groups for n in g["names"]]
    assert sorted(seen) == sorted(n for n, _ in meta.student.named_parameters())  # every student param, once
    assert len(seen) == len(set(seen))
    teacher_ids = {id(p) for p in meta.teacher.parameters()}
    assert not any(id(p) in teacher_ids for g in groups for p in g["params"])

    rule = {n: (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups for n in g["names"]}
    assert rule["backbone.patch_embed.proj.weight"] == (pytest.approx(0.5**3 * 0.2), 1.0, False)
    assert rule["backbone.patch_embed.proj.bias"] == (pytest.approx(0.5**3 * 0.2), 0.0, False)
    assert rule["backbone.cls_token"] == (0.5**3, 0.0, False)
    assert rule["backbone.storage_tokens"][1] == 0.0 and rule["backbone.mask_token"][1] == 0.0
    assert rule["backbone.blocks.0.attn.qkv.weight"] == (0.5**2, 1.0, False)
    assert rule["backbone.blocks.0.attn.qkv.bias"] == (0.5**2, 0.0, False)
    assert rule["backbone.blocks.1.ls2.gamma"] == (0.5, 0.0, False)
    assert rule["backbone.blocks.1.norm1.weight"] == (0.5, 0.0, False)
    assert rule["backbone.norm.weight"] == (1.0, 0.0, False)
    assert rule["dino_head.mlp.0.weight"] == (1.0, 1.0, False)
    assert rule["dino_head.mlp.0.bias"] == (1.0, 0.0, False)
    assert rule["dino_head.last_layer.weight"] == (1.0, 1.0, True)
    assert rule["ibot_head.last_layer.weight"] == (1.0, 1.0, True)
    # a parameter's rule does not depend on which group it landed in
    assert param_rule("backbone.blocks.1.mlp.fc1.weight", depth, 0.5, 0.2).lr_multiplier == 0.5


def test_apply_schedules_and_frozen_last_layer_do_not_move():
    meta = SSLMetaArch(tiny_model_cfg(), LossConfig(), precision="fp32")
    optim_cfg = OptimConfig(layer_decay=0.5)
    opt = build_optimizer(meta.student_named_parameters(), meta.depth, optim_cfg, torch.device("cpu"))
    apply_schedules(opt, lr=1e-2, wd=0.1, last_layer_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == (0.0 if g["is_last_layer"] else 1e-2 * g["lr_multiplier"])
        assert g["weight_decay"] == 0.1 * g["wd_multiplier"]
    before = {n: p.detach().clone() for n, p in meta.student.named_parameters()}
    meta.train()
    meta.forward_backward(tiny_inputs(), teacher_temp=0.04)
    opt.step()
    after = dict(meta.student.named_parameters())
    for n in ("dino_head.last_layer.weight", "ibot_head.last_layer.weight"):
        assert torch.equal(after[n], before[n]), f"{n} moved while frozen"
    assert not torch.equal(after["dino_head.mlp.0.weight"], before["dino_head.mlp.0.weight"])
    assert not torch.equal(after["backbone.blocks.0.mlp.fc1.weight"], before["backbone.blocks.0.mlp.fc1.weight"])


# ----------------------------------------------------------------------------------------------- student / teacher


def test_teacher_is_a_frozen_eval_copy_and_ema_follows_the_formula():
    torch.manual_seed(0)
    meta = SSLMetaArch(tiny_model_cfg(drop_path_rate=0.2, rope_rescale=2.0), LossConfig(), precision="fp32")
    meta.train()
    assert meta.student.backbone.training and not meta.teacher.training
    assert not meta.teacher.backbone.blocks[0].training
    assert all(not p.requires_grad for p in meta.teacher.parameters())
    assert meta.teacher.backbone.blocks[0].drop_path == 0.0 and meta.teacher.backbone.rope_embed.rescale_coords is None
    for (ns, s), (nt, t) in zip(meta.student.state_dict().items(), meta.teacher.state_dict().items()):
        assert ns == nt and torch.equal(s, t)

    with torch.no_grad():  # make student and teacher differ
        for p in meta.student.parameters():
            p.add_(torch.randn_like(p))
    teacher_before = [p.detach().clone() for p in meta.teacher.parameters()]
    student = [p.detach().clone() for p in meta.student.parameters()]
    m = 0.9
    meta.update_teacher(m)
    for t0, s, t1 in zip(teacher_before, student, meta.teacher.parameters()):
        torch.testing.assert_close(t1, t0 * m + s * (1 - m), rtol=0, atol=1e-6)
    meta.update_teacher(1.0)  # momentum 1: the teacher stays put
    for t1, t2 in zip([p.detach().clone() for p in meta.teacher.parameters()], meta.teacher.parameters()):
        assert torch.equal(t1, t2)
    meta.update_teacher(0.0)  # momentum 0: the teacher becomes the student
    for s, t in zip(meta.student.parameters(), meta.teacher.parameters()):
        assert torch.equal(s, t)


def test_head_bn_teacher_standardises_with_the_students_running_statistics():
    torch.manual_seed(0)
    meta = SSLMetaArch(tiny_model_cfg(head_bn=True, head_nlayers=0), LossConfig(), precision="fp32").train()
    s_bn, t_bn = meta.student.dino_head.input_norm, meta.teacher.dino_head.input_norm
    assert s_bn.training and not t_bn.training and meta.student.ibot_head.input_norm is not None
    inputs = tiny_inputs()
    meta.forward_backward(inputs, teacher_temp=0.07)
    assert int(s_bn.num_batches_tracked) == 1 and int(t_bn.num_batches_tracked) == 0  # the teacher does not track
    # the student's head saw every global and local CLS of the step in one batch
    with torch.no_grad():
        cls = torch.cat([meta.student.backbone.forward_features(inputs.global_crops, inputs.masks.masks)["x_norm_clstoken"],
                         meta.student.backbone.forward_features(inputs.local_crops)["x_norm_clstoken"]])
    torch.testing.assert_close(s_bn.running_mean, 0.1 * cls.mean(0), rtol=1e-5, atol=1e-6)
    meta.update_teacher(0.99)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        for part in ("dino_head", "ibot_head"):
            assert torch.equal(getattr(meta.teacher[part].input_norm, name), getattr(meta.student[part].input_norm, name))
    # the teacher's targets standardise with those statistics (eval mode), not with its batch's
    with torch.no_grad():
        t_cls = meta.teacher.backbone.forward_features(inputs.global_crops)["x_norm_clstoken"]
        by_hand = F.normalize((t_cls - t_bn.running_mean) / torch.sqrt(t_bn.running_var + t_bn.eps)
                              * t_bn.weight + t_bn.bias, dim=-1) @ meta.teacher.dino_head.last_layer.weight.T
        torch.testing.assert_close(meta.teacher.dino_head(t_cls), by_hand, rtol=1e-5, atol=1e-6)
    # the statistics are state: a fresh model loaded from this one's state dict has them bit-exactly
    again = SSLMetaArch(tiny_model_cfg(head_bn=True, head_nlayers=0), LossConfig(), precision="fp32")
    again.load_state_dict(meta.state_dict())
    assert torch.equal(again.teacher.dino_head.input_norm.running_var, t_bn.running_var)


def reference_losses(meta: SSLMetaArch, inputs: SSLInputs, teacher_temp: float) -> dict:
    """The objective written out plainly (pairs expanded, log_softmax), for a deterministic student."""
    b, ng, nl = inputs.batch_size, 2, inputs.n_local_crops
    with torch.no_grad():
        t_out = meta.teacher.backbone.forward_features(inputs.global_crops)
        t_cls, t_patch = t_out["x_norm_clstoken"], t_out["x_norm_patchtokens"]
        targets = sinkhorn_knopp(meta.teacher.dino_head(t_cls), teacher_temp, 3).unflatten(0, (ng, b))
        masked_t = t_patch.flatten(0, 1)[inputs.masks.masks.flatten()]
        ibot_targets = sinkhorn_knopp(meta.teacher.ibot_head(masked_t), teacher_temp, 3)
    g = meta.student.backbone.forward_features(inputs.global_crops, inputs.masks.masks)
    loc = meta.student.backbone.forward_features(inputs.local_crops)
    s_global = meta.student.dino_head(g["x_norm_clstoken"]).unflatten(0, (ng, b))
    s_local = meta.student.dino_head(loc["x_norm_clstoken"]).unflatten(0, (nl, b))

    def ce(t, s):
        return -(t * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

    glob_pairs = [ce(targets[i], s_global[j]) for i in range(ng) for j in range(ng) if i != j]
    local_pairs = [ce(targets[i], s_local[j]) for i in range(ng) for j in range(nl)]
    dino = (sum(glob_pairs) + sum(local_pairs)) / (len(glob_pairs) + len(local_pairs))
    s_ibot = meta.student.ibot_head(g["x_norm_patchtokens"].flatten(0, 1)[inputs.masks.masks.flatten()])
    per_patch = -(ibot_targets * F.log_softmax(s_ibot / 0.1, dim=-1)).sum(-1)
    per_image_count = inputs.masks.masks.sum(1, keepdim=True).expand_as(inputs.masks.masks)[inputs.masks.masks]
    ibot = (per_patch / per_image_count).sum() / (ng * b)

    def koleo(x):  # nearest neighbour by distance; the 1e-8 inside the norm as torch's pairwise_distance
        x = F.normalize(x, dim=-1)
        nearest = (torch.cdist(x, x) + torch.eye(len(x)) * 1e9).argmin(dim=1)
        return -torch.log(F.pairwise_distance(x, x[nearest], eps=1e-8) + 1e-8).mean()

    cls = g["x_norm_clstoken"].unflatten(0, (ng, b))
    kol = koleo(cls[0]) + koleo(cls[1])
    return {"dino": dino, "ibot": ibot, "koleo": kol, "total": dino + ibot + 0.1 * kol}


def test_loss_composition_matches_the_plain_objective_and_grads_reach_only_the_student():
    torch.manual_seed(1)
    meta = SSLMetaArch(tiny_model_cfg(), LossConfig(), precision="fp32").train()
    with torch.no_grad():  # a teacher that differs from the student, as after some training
        for p in meta.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inputs = tiny_inputs(batch=4, n_local=3)
    teacher_before = {k: v.clone() for k, v in meta.teacher.state_dict().items()}

    got = meta.forward_backward(inputs, teacher_temp=0.05)
    for k, v in got.items():
        assert v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v), k
    ref = reference_losses(meta, inputs, 0.05)
    for k in ("dino", "ibot", "koleo", "total"):
        torch.testing.assert_close(got[k], ref[k].detach(), rtol=1e-4, atol=1e-5, msg=k)
    # DINOv3's term weights: 2 global pairs and 2 x 3 local pairs -> 2/8 global + 6/8 local
    torch.testing.assert_close(got["dino"], 0.25 * got["dino_global"] + 0.75 * got["dino_local"])

    for name, p in meta.student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert meta.student.backbone.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert meta.student.ibot_head.last_layer.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in meta.teacher.parameters())
    for k, v in meta.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"backward changed teacher {k}"


def test_loss_weights_scale_the_terms():
    torch.manual_seed(2)
    model_cfg = tiny_model_cfg()
    inputs = tiny_inputs()
    meta = SSLMetaArch(model_cfg, LossConfig(dino_weight=2.0, ibot_weight=0.0, koleo_weight=0.5), precision="fp32")
    out = meta.compute_losses(inputs, 0.04)
    torch.testing.assert_close(out["total"], 2.0 * out["dino"] + 0.5 * out["koleo"])


def test_bf16_autocast_and_shared_head():
    torch.manual_seed(3)
    meta = SSLMetaArch(tiny_model_cfg(ibot_separate_head=False), LossConfig(), precision="bf16").train()
    assert "ibot_head" not in meta.student and "ibot_head" not in meta.teacher
    losses = meta.forward_backward(tiny_inputs(), teacher_temp=0.04)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    # fp32 master weights and gradients under bf16 compute
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in meta.student.parameters())
    norms = meta.clip_gradients(1e-3)
    assert norms.shape == (2,) and torch.isfinite(norms).all()
    for part in meta.student.values():  # each part clipped to its own max norm
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in part.parameters()]))
        assert total <= 1e-3 * 1.01


def test_pretrained_patch16_rgb_checkpoint_loads_into_student_and_teacher(tmp_path):
    model_cfg = tiny_model_cfg()
    torch.manual_seed(4)
    official = build_vit("vit_tiny", patch_size=16, in_chans=3, embed_dim=32, depth=2, num_heads=2)
    path = tmp_path / "vit16.pth"
    torch.save(official.state_dict(), path)
    meta = SSLMetaArch(model_cfg, LossConfig(), precision="fp32")
    report = meta.load_pretrained(str(path))
    assert [a.key for a in report.adapted] == ["backbone.patch_embed.proj.weight"[len("backbone."):]]
    assert meta.student.backbone.patch_embed.proj.weight.shape == (32, 1, 8, 8)
    torch.testing.assert_close(meta.student.backbone.blocks[1].attn.qkv.weight, official.blocks[1].attn.qkv.weight)
    for s, t in zip(meta.student.parameters(), meta.teacher.parameters()):
        assert torch.equal(s, t)
