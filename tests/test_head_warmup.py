"""Starting from DINOv3 weights: the head warm-up (backbone frozen or at a reduced lr while the random heads learn)
and model.init (continued pretraining never starts from random weights by accident)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinocell import storage
from dinocell.config import ConfigError, DataConfig, PreprocessConfig, ShardConfig, load_config, packaged_config
from dinocell.config.training import (
    LossConfig,
    ModelConfig,
    OptimConfig,
    check_model_init,
    effective_head_warmup_iters,
    validate_training_config,
)
from dinocell.loss import collate_masks
from dinocell.model import build_vit, load_dinov3_checkpoint
from dinocell.train.checkpoint import CheckpointManager
from dinocell.train.optim import apply_schedules, build_optimizer
from dinocell.train.schedules import TrainingSchedules
from dinocell.train.ssl_model import SSLInputs, SSLMetaArch
from dinocell.train.step import pretrain

torch.set_num_threads(2)

FIELD_SIZE = 96  # raw synthetic field; preprocessed (2x downsampled) fields are 48 x 48
WIDTH = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _moved(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- config: model.init
def _vits8(*overrides: str):
    return load_config(packaged_config("vits8_jump"), ["loader.shards=s3://b/shards/index.json", *overrides])


def test_vits8_jump_without_weights_is_a_config_error_naming_the_fix():
    cfg = _vits8()
    assert cfg.model.init == "pretrained" and cfg.model.pretrained == ""
    with pytest.raises(ConfigError) as err:
        validate_training_config(cfg)
    message = str(err.value)
    assert "model.pretrained is empty but model.init=pretrained" in message
    assert "--set model.pretrained=" in message and "dinov3_vits16_pretrain_lvd1689m-08c60483.pth" in message
    assert "model.init=random" in message  # the other way out, on purpose
    # the same check alone, for a submission whose loader.shards is only filled in by the shard step
    cfg.loader.shards = ""
    with pytest.raises(ConfigError, match="model.pretrained is empty but model.init=pretrained"):
        check_model_init(cfg.model)


def test_vits8_jump_loads_with_weights_or_explicit_random_init_and_tiny_loads():
    weights = "s3://models/dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    with_weights = _vits8(f"model.pretrained={weights}")
    validate_training_config(with_weights)
    assert with_weights.model.starts_pretrained and with_weights.optim.head_warmup_iters == 2000
    random_init = _vits8("model.init=random")
    validate_training_config(random_init)
    assert not random_init.model.starts_pretrained
    tiny = load_config(packaged_config("tiny"), ["loader.shards=s3://b/shards/index.json"])
    validate_training_config(tiny)
    assert tiny.model.init == "auto" and not tiny.model.starts_pretrained and tiny.optim.head_warmup_iters == 0
    # the warm-up is a pretrained-init feature: a random backbone has nothing to protect
    assert effective_head_warmup_iters(with_weights) == 2000 and effective_head_warmup_iters(random_init) == 0
    # contradictions and bad values name the field
    with pytest.raises(ConfigError, match="model.init=random but model.pretrained="):
        validate_training_config(_vits8("model.init=random", f"model.pretrained={weights}"))
    with pytest.raises(ConfigError, match="model.init: must be one of"):
        _vits8("model.init=imagenet")
    with pytest.raises(ConfigError, match="optim.head_warmup_backbone_lr_mult must be in"):
        _vits8("optim.head_warmup_backbone_lr_mult=1.5")
    with pytest.raises(ConfigError, match="optim.head_warmup_iters must be <= the run's 240000"):
        _vits8("optim.head_warmup_iters=300000")


# ----------------------------------------------------------------------------------------------- the mechanics
def _tiny_meta(seed=0) -> SSLMetaArch:
    cfg = ModelConfig(arch="vit_tiny", n_prototypes=64, head_hidden_dim=48, head_bottleneck_dim=16,
                      drop_path_rate=0.0, rope_rescale=0.0, layerscale=0.1, **WIDTH)
    cfg.validate()
    torch.manual_seed(seed)
    return SSLMetaArch(cfg, LossConfig(), precision="fp32").train()


def _inputs(seed=0, batch=4, g=16, loc=8) -> SSLInputs:
    gen = torch.Generator().manual_seed(seed)
    masks = collate_masks(2 * batch, (g // 8, g // 8), (0.1, 0.5), 0.5, generator=seed)
    return SSLInputs(torch.randn(2 * batch, 1, g, g, generator=gen), torch.randn(2 * batch, 1, loc, loc, generator=gen),
                     masks)


def test_schedule_step_of_the_backbone_lr_multiplier():
    optim = OptimConfig(epochs=2, iters_per_epoch=5, warmup_epochs=1, head_warmup_iters=3,
                        head_warmup_backbone_lr_mult=0.25)
    s = TrainingSchedules.from_config(optim, LossConfig(warmup_teacher_temp_epochs=1), 5)
    assert [s.at(i)["backbone_lr_mult"] for i in range(6)] == [0.25, 0.25, 0.25, 1.0, 1.0, 1.0]
    assert s.at(2)["lr"] == pytest.approx(optim.lr * 2 / 5)  # the lr schedule itself is unchanged
    off = TrainingSchedules.from_config(optim, LossConfig(warmup_teacher_temp_epochs=1), 5, head_warmup_iters=0)
    assert {off.at(i)["backbone_lr_mult"] for i in range(10)} == {1.0}  # random init: the trainer passes 0
    with pytest.raises(ValueError, match="head_warmup_iters=11 must be in"):
        TrainingSchedules.from_config(optim, LossConfig(warmup_teacher_temp_epochs=1), 5, head_warmup_iters=11)


def test_reduced_multiplier_scales_the_backbone_update_and_composes_with_layer_decay_and_clipping():
    """One AdamW step from the same state and batch: the backbone's update is exactly mult x the full one (AdamW's
    step and its decoupled weight decay are both proportional to the lr), the heads' update does not change."""
    optim_cfg = OptimConfig(layer_decay=0.5, patch_embed_lr_mult=0.2, weight_decay=0.04)
    deltas, lrs = {}, {}
    for mult in (1.0, 0.25):
        meta = _tiny_meta()
        before = _snapshot(meta.student)
        opt = build_optimizer(meta.student_named_parameters(), meta.depth, optim_cfg, torch.device("cpu"))
        apply_schedules(opt, lr=1e-3, wd=0.04, last_layer_lr=1e-3, backbone_lr_mult=mult)
        lrs[mult] = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
        meta.forward_backward(_inputs(), teacher_temp=0.04, train_backbone=mult > 0)
        norms = meta.clip_gradients(0.5)
        assert norms[0] > 0.5  # the backbone's gradient is really clipped
        opt.step()
        deltas[mult] = {k: meta.student.state_dict()[k] - before[k] for k in before}
        scale = {k: v.abs().max().item() for k, v in before.items()}
    # lr = schedule x layer decay (x patch-embedding mult) x warm-up mult, on backbone groups only
    assert lrs[0.25]["backbone.blocks.0.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.5**2 * 0.25)
    assert lrs[0.25]["backbone.patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5**3 * 0.2 * 0.25)
    assert lrs[0.25]["dino_head.mlp.0.weight"] == lrs[1.0]["dino_head.mlp.0.weight"] == pytest.approx(1e-3)
    backbone = [k for k in deltas[1.0] if k.startswith("backbone.") and deltas[1.0][k].abs().max() > 0]
    assert len(backbone) > 10
    eps = torch.finfo(torch.float32).eps
    for k in backbone:  # atol: the fp32 rounding of p_new - p, a few ulps of the parameter's magnitude
        torch.testing.assert_close(deltas[0.25][k], 0.25 * deltas[1.0][k], rtol=1e-4, atol=4 * eps * scale[k])
        assert deltas[0.25][k].abs().max() > 100 * eps * scale[k]  # an update well above the rounding
    for k in deltas[1.0]:
        if not k.startswith("backbone."):
            assert torch.equal(deltas[0.25][k], deltas[1.0][k]), k


def test_frozen_step_moves_only_the_heads_of_student_and_teacher():
    meta = _tiny_meta()
    opt = build_optimizer(meta.student_named_parameters(), meta.depth, OptimConfig(), torch.device("cpu"))
    student0, teacher0 = _snapshot(meta.student.backbone), _snapshot(meta.teacher.backbone)
    heads0 = _snapshot(meta.teacher.dino_head)
    for it in range(2):
        apply_schedules(opt, lr=1e-3, wd=0.04, last_layer_lr=1e-3, backbone_lr_mult=0.0)
        opt.zero_grad(set_to_none=True)
        meta.forward_backward(_inputs(seed=it), teacher_temp=0.04, train_backbone=False)
        assert all(p.grad is None for p in meta.student.backbone.parameters())  # no backbone backward at all
        assert meta.clip_gradients(3.0)[0] == 0  # clipping sees no backbone gradient
        opt.step()
        meta.update_teacher(0.9, backbone=False)
    assert _same(_snapshot(meta.student.backbone), student0) and _same(_snapshot(meta.teacher.backbone), teacher0)
    assert _moved(heads0, _snapshot(meta.teacher.dino_head))
    assert not any(p in opt.state for p in meta.student.backbone.parameters())  # no AdamW state accumulated
    # the EMA of two equal tensors is not always bit-equal to them: why the frozen teacher backbone skips the EMA
    t = meta.teacher.backbone.blocks[0].mlp.fc1.weight.detach()
    assert not torch.equal(0.996 * t + (1 - 0.996) * t, t)


# ----------------------------------------------------------------------------------------------- the training loop
@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    """A small synthetic shard set (8 fields in 2 shards) and a DINOv3-layout RGB patch-16 checkpoint."""
    from dinocell.data.shards import write_shards
    from dinocell.jump import discover
    from dinocell.synth import bucket as synth

    root = tmp_path_factory.mktemp("warmup")
    source = str(root / "source")
    synth.synth_bucket(source, batches=1, plates_per_batch=2, wells_per_plate=2, sites_per_well=2, size=FIELD_SIZE,
                       seed=0, with_illum=False, workers=2)
    manifest = discover.discover_fields(DataConfig(images_prefix=storage.join(source, "images"), val_fraction=0.0,
                                                   eval_channels=[])).manifest
    out = str(root / "shards")
    index = write_shards(manifest, out, ShardConfig(output=out, target_bytes=4 * 5 * (FIELD_SIZE // 2) ** 2, workers=1),
                         PreprocessConfig())
    torch.manual_seed(7)
    weights = root / "dinov3_like_vit16_rgb.pth"
    torch.save(build_vit("vit_tiny", patch_size=16, in_chans=3, **WIDTH).state_dict(), weights)
    return {"index": index.uri, "weights": str(weights)}


def _run_cfg(run_inputs, out, run_name, *extra):
    return load_config(packaged_config("tiny"), [
        f"loader.shards={run_inputs['index']}", f"train.output_dir={out}", f"train.run_name={run_name}",
        f"model.pretrained={run_inputs['weights']}", "model.init=pretrained",
        "model.num_heads=2", "model.embed_dim=32", "model.depth=2", "model.n_prototypes=64",
        "model.head_hidden_dim=48", "model.head_bottleneck_dim=16", "model.drop_path_rate=0.1",
        "augment.global_size=32", "augment.local_size=16", "augment.n_local=2", "augment.blur_kernel_size=3",
        "loader.batch_size=4", "loader.shuffle_buffer=4", "loader.num_workers=0",
        "optim.epochs=2", "optim.iters_per_epoch=3", "optim.warmup_epochs=0", "loss.warmup_teacher_temp_epochs=1",
        "optim.head_warmup_iters=3", "optim.head_warmup_backbone_lr_mult=0.0", "optim.clip_grad=1.0",
        "train.log_every=1", "train.vis_every=0", "train.ckpt_every=2", "train.max_iters=5", "train.progress=false",
        *extra,
    ])


@pytest.mark.slow
def test_trainer_head_warmup_freezes_both_backbones_then_trains_and_resumes_bit_exactly(run_inputs, tmp_path):
    states = {}

    def record(iteration, info):
        meta = info["trainer"].meta
        states[iteration] = {"student_backbone": _snapshot(meta.student.backbone),
                             "teacher_backbone": _snapshot(meta.teacher.backbone),
                             "student_head": _snapshot(meta.student.dino_head),
                             "teacher_head": _snapshot(meta.teacher.dino_head)}

    straight = pretrain(_run_cfg(run_inputs, tmp_path, "straight"), on_iteration=record)
    assert straight.iterations == 5 and straight.skipped_iterations == 0

    # the starting backbone: the checkpoint, loaded (patch 16 -> 8, RGB -> grey folded) as the trainer does
    start = build_vit("vit_tiny", patch_size=8, in_chans=1, **WIDTH)
    load_dinov3_checkpoint(start, run_inputs["weights"])
    start = _snapshot(start)
    for it in (1, 2, 3):  # warm-up: iterations 0, 1, 2 (reported after the step as 1, 2, 3)
        assert _same(states[it]["student_backbone"], start), f"student backbone moved at iteration {it}"
        assert _same(states[it]["teacher_backbone"], start), f"teacher backbone moved at iteration {it}"
        previous = states.get(it - 1)
        if previous is not None:
            assert _moved(previous["student_head"], states[it]["student_head"])
            assert _moved(previous["teacher_head"], states[it]["teacher_head"])
    for it in (4, 5):  # after the warm-up the backbones train
        assert _moved(states[it - 1]["student_backbone"], states[it]["student_backbone"])
        assert _moved(states[it - 1]["teacher_backbone"], states[it]["teacher_backbone"])
    metrics = [json.loads(line) for line in (Path(straight.run_dir) / "metrics.jsonl").read_text().splitlines()]
    mults = {m["step"]: m["backbone_lr_mult"] for m in metrics if "backbone_lr_mult" in m}
    assert [mults[i] for i in (1, 2, 3, 4, 5)] == [0.0, 0.0, 0.0, 1.0, 1.0]

    # crash after iteration 3 (the checkpoint of iteration 2 is mid-warm-up), resume: the same final state
    def crash(iteration, info):
        if iteration == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(_run_cfg(run_inputs, tmp_path, "crashed"), on_iteration=crash)
    resumed = pretrain(_run_cfg(run_inputs, tmp_path, "crashed"))
    assert resumed.resumed_from.endswith("ckpt-00000002.pt") and resumed.iterations == 5
    a = CheckpointManager(str(Path(straight.final_checkpoint).parent)).load(straight.final_checkpoint)
    b = CheckpointManager(str(Path(resumed.final_checkpoint).parent)).load(resumed.final_checkpoint)
    for side in ("student", "teacher"):
        assert _same(a[side], b[side]), f"{side} differs after the resume"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(_same(sa[k], sb[k]) for k in sa)
    assert resumed.final_losses == pytest.approx(straight.final_losses, rel=0, abs=0)


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, record_dir: str) -> None:
    import os

    from dinocell.config import config_from_dict

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    sums = {}

    def record(iteration, info):  # per iteration: the backbones' parameter sums (float64) on this rank
        meta = info["trainer"].meta
        sums[iteration] = [[float(p.detach().double().sum()) for p in getattr(meta, side).backbone.parameters()]
                           for side in ("student", "teacher")]

    pretrain(config_from_dict(cfg_dict), on_iteration=record)
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(sums))


@pytest.mark.slow
def test_two_rank_ddp_head_warmup_then_training(run_inputs, tmp_path):
    """DistributedDataParallel around the student backbone: the frozen iterations run it without autograd (no
    gradient hooks fire), then it trains; both ranks stay identical."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _run_cfg(run_inputs, tmp_path / "out", "ddp", "optim.head_warmup_iters=2", "train.max_iters=4")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    mp.spawn(_ddp_worker, args=(2, port, cfg.to_dict(), str(record_dir)), nprocs=2, join=True)
    r0, r1 = (json.loads((record_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and sorted(r0) == ["1", "2", "3", "4"]
    assert r0["1"] == r0["2"]  # warm-up: neither backbone moves
    assert r0["3"][0] != r0["2"][0] and r0["3"][1] != r0["2"][1]  # then both train
