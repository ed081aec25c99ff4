"""The proof that the pipeline learns: a short tiny-config run on a synthetic JUMP bucket, judged on held-out fields.

Synthetic bucket (3 plates) -> field manifest with one plate held out -> shards of the other two -> `pretrain` with
the packaged tiny config (600 iterations of 32 fields from random weights, about a minute on one core). Checked:

- the objective itself: the DINO term falls well below its uniform-prediction value log K and below its value in
  the first iterations (its cross-view global term furthest), and the total loss falls. A DINO loss whose targets
  do not belong to the student's fields cannot be predicted and stays near log K;
- the DINO head on the held-out plate (fields it never saw, whole fields instead of crops): the teacher's
  Sinkhorn-Knopp targets for each field's fluorescent mean, cross-entropy against the student's prediction from
  each single channel of the same field. It ends well below log K and far below the same number with every
  channel paired with another field's mean (a channel mix-up), and the targets are sharp and spread over many
  prototypes: a collapsed head (one prototype for everything, or uniform targets) has no such gap;
- the backbone on the held-out plate (dinocell.monitor.consistency, every fluorescent channel and the mean shown
  separately): views of the same field end up far closer than views of different fields (the gap starts near 0
  because random-init features are all alike), without collapse; a field's view in one channel finds the same
  field's view in another channel among all held-out fields several times more often than chance and more often
  than with the initial weights; a channel mix-up on the same embeddings leaves no gap and chance-level retrieval.

Checked by breaking the code on purpose (seed 0; healthy run: loss/dino 2.42 vs log K 2.77, held-out ce 2.03
vs 3.02 mixed up): DINO targets taken from the next field of the batch -> loss/dino stays at 2.773 and held-out ce
2.77 = ce_mixed; global crop 2 and the local crops of each field cut from the next field (a channel mix-up in
training) -> the same; teacher targets without Sinkhorn-Knopp centering (DINO's collapse: loss/dino -> 0.007) ->
held-out targets uniform, ce 7.2 = ce_mixed; the same without KoLeo (full collapse) -> also backbone
different_field 0.998, gap 0. In all of these but the full collapse the backbone numbers alone still pass (KoLeo
spreads the features by itself), which is why the DINO terms are checked directly. Pairing each global crop with its own teacher view (the diagonal) is
caught by tests/test_loss.py, not here: the local crops still teach cross-view agreement (held-out ce 2.28).
iBOT is not asserted: in this run it stays within 0.06 of its uniform value (1.39).
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinocell import storage
from dinocell.channels import FLUORESCENT_CHANNELS
from dinocell.config import DataConfig, PreprocessConfig, ShardConfig, load_config, packaged_config
from dinocell.loss import sinkhorn_knopp
from dinocell.monitor.consistency import MEAN_VIEW, embed_views, summary
from dinocell.train.ssl_model import LOSS_KEYS, SSLMetaArch
from dinocell.train.step import pretrain

ITERS = 600  # the tiny config's full schedule (15 epochs of 40 iterations)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    from dinocell.data.fields import FieldLoader
    from dinocell.data.shards import write_shards
    from dinocell.jump import discover
    from dinocell.synth import bucket as synth

    root = tmp_path_factory.mktemp("learning")
    source = str(root / "source")
    synth.synth_bucket(source, batches=1, plates_per_batch=3, wells_per_plate=6, sites_per_well=4, size=256, seed=0,
                       with_illum=False, workers=2)
    result = discover.discover_fields(
        DataConfig(images_prefix=storage.join(source, "images"), val_fraction=0.34, split_seed=0, eval_channels=[]))
    manifest = result.manifest
    manifest_uri = str(root / "manifest.parquet")
    manifest.write(manifest_uri)
    train, val = manifest.split("train"), manifest.split("val")
    assert len(train) == 48 and len(val) == 24 and not set(train.plates()) & set(val.plates())
    field_bytes = 5 * 128 * 128
    out = str(root / "shards")
    index = write_shards(manifest, out, ShardConfig(output=out, target_bytes=6 * field_bytes, workers=1),
                         PreprocessConfig())
    fields, errors = FieldLoader(PreprocessConfig(), list(FLUORESCENT_CHANNELS)).load_many(list(val.records()))
    assert not errors
    held_out = torch.stack([torch.from_numpy(f.image.copy()) for f in fields])
    return {"root": root, "index": index.uri, "manifest": manifest_uri, "held_out": held_out}


def consistency(backbone, fields, size):
    embs = embed_views(backbone, fields, list(FLUORESCENT_CHANNELS), size=size, device="cpu", batch_size=64)
    return embs, summary(embs, key="cls")


def mixed_up(embs, seed=0):
    """Each channel view paired with another field's (a fixed derangement per view; the mean view stays put)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, (view, d) in enumerate(embs.items()):
        n = d["cls"].shape[0]
        perm = torch.arange(n) if i == 0 else torch.from_numpy((np.arange(n) + 1 + rng.permutation(n - 1)[0]) % n)
        out[view] = {k: v[perm] for k, v in d.items()}
    return out


@torch.no_grad()
def held_out_dino(meta: SSLMetaArch, fields, cfg) -> dict:
    """The DINO objective on held-out whole fields, mean view -> each fluorescent channel (see the module docstring).

    ce: mean over channels and fields of CE(teacher Sinkhorn-Knopp target of the field's mean view, student
    softmax of the same field's channel view); ce_mixed: the same with each channel view taken from the next field
    (a channel mix-up); target_entropy: mean entropy of the targets; prototypes_used: distinct argmax prototypes
    of the targets over the fields.
    """
    channels = list(FLUORESCENT_CHANNELS)
    size = cfg.augment.global_size
    teacher = embed_views(meta.teacher.backbone, fields, channels, size=size, batch_size=64)
    student = embed_views(meta.student.backbone, fields, channels, size=size, batch_size=64)
    targets = sinkhorn_knopp(meta.teacher.dino_head(teacher[MEAN_VIEW]["cls"]), cfg.loss.teacher_temp,
                             cfg.loss.sinkhorn_iterations)
    other_field = torch.roll(torch.arange(targets.shape[0]), 1)
    ce, ce_mixed = [], []
    for channel in channels:
        log_p = F.log_softmax(meta.student.dino_head(student[channel]["cls"]) / cfg.loss.student_temp, dim=-1)
        ce.append(-(targets * log_p).sum(-1).mean())
        ce_mixed.append(-(targets * log_p[other_field]).sum(-1).mean())
    return {
        "ce": torch.stack(ce).mean().item(),
        "ce_mixed": torch.stack(ce_mixed).mean().item(),
        "target_entropy": -(targets * targets.clamp_min(1e-30).log()).sum(-1).mean().item(),
        "prototypes_used": len(set(targets.argmax(-1).tolist())),
    }


def test_short_run_learns_cross_channel_consistency(bucket):
    cfg = load_config(packaged_config("tiny"), [
        f"loader.shards={bucket['index']}", f"data.manifest={bucket['manifest']}",
        f"train.output_dir={bucket['root'] / 'runs'}", f"train.max_iters={ITERS}", "train.vis_every=150",
        "train.ckpt_every=0", "train.progress=false",
    ])
    log_k = math.log(cfg.model.n_prototypes)
    held_out = bucket["held_out"]
    size = cfg.augment.global_size

    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights: same seed, same construction
    initial = SSLMetaArch(cfg.model, cfg.loss, precision=cfg.train.precision)
    _, before = consistency(initial.teacher.backbone, held_out, size)
    dino_before = held_out_dino(initial, held_out, cfg)

    per_iteration = []  # every iteration's loss terms, in LOSS_KEYS order
    result = pretrain(cfg, on_iteration=lambda it, info: per_iteration.append(info["losses"].tolist()))
    assert result.iterations == ITERS and len(per_iteration) == ITERS
    state = torch.load(result.final_checkpoint, weights_only=True)
    trained = SSLMetaArch(cfg.model, cfg.loss, precision=cfg.train.precision)
    trained.student.load_state_dict(state["student"])
    trained.teacher.load_state_dict(state["teacher"])

    # -- the objective: means over the first 20 and the last 100 iterations
    losses = {k: np.array(v) for k, v in zip(LOSS_KEYS, np.array(per_iteration).T)}
    assert all(np.isfinite(v).all() for v in losses.values())
    first = {k: v[:20].mean() for k, v in losses.items()}
    last = {k: v[-100:].mean() for k, v in losses.items()}
    assert abs(first["dino"] - log_k) < 0.02, (first, log_k)  # random init: uniform predictions
    assert last["dino"] < log_k - 0.2 and last["dino"] < first["dino"] - 0.2, (first, last, log_k)  # seeds 0/1: -0.36
    assert last["dino_global"] < log_k - 0.5, (last, log_k)  # mean view <-> channel view: -0.9
    assert last["total"] < first["total"] - 0.4, (first, last)  # -0.6
    logged = [json.loads(x) for x in (bucket["root"] / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    windows = [x["loss/dino"] for x in logged if "loss/dino" in x]  # the run log says the same
    assert len(windows) == ITERS // cfg.train.log_every
    assert windows[-1] == pytest.approx(losses["dino"][-cfg.train.log_every:].mean(), rel=1e-5)

    # -- the DINO head on held-out fields: channel view predicts the mean view's target, and only its own field's
    dino_after = held_out_dino(trained, held_out, cfg)
    assert abs(dino_before["ce"] - log_k) < 0.1 and abs(dino_before["ce"] - dino_before["ce_mixed"]) < 0.05
    assert dino_after["ce"] < log_k - 0.3, (dino_before, dino_after, log_k)  # measured 2.03 / 2.19 vs 2.77
    assert dino_after["ce"] < dino_after["ce_mixed"] - 0.5, dino_after  # measured gaps 0.99 / 0.92
    assert dino_after["target_entropy"] < 0.5 * log_k and dino_after["prototypes_used"] >= 8, dino_after

    # -- the backbone on held-out fields
    embs, after = consistency(trained.teacher.backbone, held_out, size)
    chance = after["chance_top1"]  # 1/24 held-out fields
    assert before["gap"] < 0.05 and before["different_field"] > 0.95  # random init: everything alike
    assert after["gap"] > before["gap"] + 0.3, (before, after)  # same field, different channel: far closer
    assert after["different_field"] < 0.6, after  # and no collapse
    # 8x chance: the summary leaves the mean view out now (it held a fifth of every channel's pixels) and the
    # synthetic perturbations are subtler than the old treatments (measured 9.6x; 600 iterations of aligned views)
    assert after["top1"] > 8 * chance and after["top1"] > before["top1"] + 0.15, (before, after)
    assert after["mrr"] > before["mrr"] + 0.1, (before, after)

    control = summary(mixed_up(embs), key="cls")  # a channel mix-up on the same embeddings
    assert abs(control["gap"]) < 0.1 and control["top1"] < 2.5 * chance, control

    # the monitoring images were written for the held-out (val) batch
    images = bucket["root"] / "runs" / "tiny" / "images" / "vis"
    assert sorted(p.name for p in images.iterdir()) == ["attention", "channel_consistency", "pca", "pca_scatter"]
