"""The proof that the pipeline learns: a short tiny-config run on a synthetic JUMP bucket, judged on held-out fields.

Synthetic bucket (3 plates) -> field manifest with one plate held out -> shards of the other two -> `pretrain` with
the packaged tiny config (300 iterations from random weights). The teacher backbone is judged on the held-out plate's
fields, every fluorescent channel and the fluorescent mean shown separately (dinocell.eval.consistency):

- the training loss goes down;
- cross-channel agreement: views of the same field end up far more similar than views of different fields (the gap
  same - different starts near 0 because random-init features are all alike), and the model did not collapse
  (a collapsed model has every cosine at 1 and a gap of 0);
- cross-channel retrieval: a field's view in one channel finds the same field's view in another channel among all
  held-out fields several times more often than chance, and more often than with the initial weights;
- controls on the same embeddings: pairing each field's channel with another field's (a channel mix-up) leaves no
  gap and chance-level retrieval, so the numbers above measure same-field agreement, not a property of the
  feature space.

What this short from-scratch run does NOT show (measured while tuning it): the DINO and iBOT terms stay at their
uniform-prediction value log(K) in 300 iterations from random weights (the teacher's targets carry no information
until the features differ between fields; KoLeo drives the early spread). The trainer's pretrained start
(model.pretrained) is the real use; the objective's composition is tested exactly in test_train_core.py.
"""

import json

import numpy as np
import pytest
import torch

from dinocell import FLUORESCENT_CHANNELS, storage
from dinocell.config import DataConfig, PreprocessConfig, ShardConfig, load_config, packaged_config
from dinocell.eval.consistency import embed_views, summary
from dinocell.train.ssl_meta_arch import SSLMetaArch
from dinocell.train.trainer import pretrain

torch.set_num_threads(2)
ITERS = 300


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    from dinocell.data import discover, synth
    from dinocell.data.fields import FieldLoader
    from dinocell.data.shards import write_shards

    root = tmp_path_factory.mktemp("learning")
    source = str(root / "source")
    synth.synth_bucket(source, batches=1, plates_per_batch=3, wells_per_plate=6, sites_per_well=4, size=256, seed=0,
                       with_illum=False, workers=2)
    result = discover.discover_fields(
        DataConfig(images_prefix=storage.join(source, "images"), val_fraction=0.34, split_seed=0))
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


def test_short_run_learns_cross_channel_consistency(bucket):
    cfg = load_config(packaged_config("tiny"), [
        f"loader.shards={bucket['index']}", f"data.manifest={bucket['manifest']}",
        f"train.output_dir={bucket['root'] / 'runs'}", f"train.max_iters={ITERS}", "train.vis_every=150",
        "train.ckpt_every=0", "train.progress=false",
    ])
    size = cfg.augment.global_size

    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights: same seed, same construction
    initial = SSLMetaArch(cfg.model, cfg.loss, precision=cfg.train.precision)
    _, before = consistency(initial.teacher.backbone, bucket["held_out"], size)

    result = pretrain(cfg)
    assert result.iterations == ITERS
    state = torch.load(result.final_checkpoint, weights_only=True)
    trained = SSLMetaArch(cfg.model, cfg.loss, precision=cfg.train.precision)
    trained.teacher.load_state_dict(state["teacher"])
    embs, after = consistency(trained.teacher.backbone, bucket["held_out"], size)

    lines = [json.loads(x) for x in (bucket["root"] / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss/total"] for x in lines if "loss/total" in x]
    assert len(losses) == ITERS // cfg.train.log_every
    assert np.mean(losses[-3:]) < losses[0] - 0.25, losses  # the objective went down (window means of 20 its)
    assert all(np.isfinite(losses))

    chance = after["chance_top1"]  # 1/24 held-out fields
    assert before["gap"] < 0.05 and before["different_field"] > 0.95  # random init: everything alike
    assert after["gap"] > before["gap"] + 0.2, (before, after)  # same field, different channel: far closer
    assert after["different_field"] < 0.8, after  # and no collapse
    assert after["top1"] > 5 * chance and after["top1"] > before["top1"] + 0.05, (before, after)
    assert after["mrr"] > before["mrr"] + 0.05

    control = summary(mixed_up(embs), key="cls")  # a channel mix-up on the same embeddings
    assert abs(control["gap"]) < 0.1 and control["top1"] < 2.5 * chance, control

    # the monitoring images were written for the held-out (val) batch
    images = bucket["root"] / "runs" / "tiny" / "images" / "vis"
    assert sorted(p.name for p in images.iterdir()) == ["attention", "channel_consistency", "pca"]
