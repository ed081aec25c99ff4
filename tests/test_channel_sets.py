"""A dataset whose channels are not JUMP's (Actin, Mito and a phase-contrast plane; no DNA) end to end:
shards -> pretrain -> evaluate, with data.channels naming them. The mean view averages the fluorescent ones present
(Actin, Mito); Phase is transmitted light and is evaluated against them, not averaged."""

from __future__ import annotations

import io

import numpy as np
import tifffile
import torch

from dinocell.config import load_config, packaged_config
from dinocell.data.step import shard
from dinocell.eval.evaluate import run_evaluation
from dinocell.jump.manifest import Manifest
from dinocell.train.step import pretrain

torch.set_num_threads(1)

CHANNELS = ["Actin", "Mito", "Phase"]
SIZE = 64
TINY = [
    "model.num_heads=2", "model.embed_dim=32", "model.depth=1", "model.n_prototypes=8", "model.head_hidden_dim=16",
    "model.head_bottleneck_dim=8", "augment.global_size=16", "augment.local_size=8", "augment.n_local=2",
    "augment.blur_kernel_size=3", "loader.batch_size=4", "loader.shuffle_buffer=4", "loader.num_workers=0",
    "optim.epochs=2", "optim.iters_per_epoch=2", "optim.warmup_epochs=1", "loss.warmup_teacher_temp_epochs=1",
    "train.log_every=1", "train.vis_every=2", "train.ckpt_every=2", "train.progress=false", "train.run_name=other",
    f"data.channels=[{','.join(CHANNELS)}]",
]


def _tiff(rng) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, rng.gamma(2.0, 300.0, (SIZE, SIZE)).astype(np.uint16))
    return buf.getvalue()


def test_a_dataset_without_dna_trains_and_evaluates(tmp_path, buckets):
    rng = np.random.default_rng(0)
    records = [
        buckets.field("B1", f"P{i % 3}", f"A{i + 1:02d}", 1,
                      {ch: (str(tmp_path / "raw" / f"f{i}_{ch}.tiff"), _tiff(rng)) for ch in CHANNELS},
                      split="val" if i % 3 == 2 else "train")
        for i in range(12)
    ]
    manifest_uri = str(tmp_path / "manifest.parquet")
    Manifest.from_records(records, CHANNELS).write(manifest_uri)

    shards = shard("", [f"data.channels=[{','.join(CHANNELS)}]", "shard.workers=1"], manifest_uri=manifest_uri,
                   shards_prefix=str(tmp_path / "shards"))
    assert shards.channels == CHANNELS and shards.totals["fields"] == 8  # the train split

    cfg = load_config(packaged_config("tiny"), [f"loader.shards={shards.index_uri}", f"data.manifest={manifest_uri}",
                                                f"train.output_dir={tmp_path / 'run'}", "train.max_iters=4", *TINY])
    result = pretrain(cfg)
    assert result.final_checkpoint.endswith("ckpt-00000004.pt")

    ev = run_evaluation(result.final_checkpoint, manifest_uri, cfg, str(tmp_path / "eval"), visuals=False,
                        view_mode="independent", pixel_baselines=False)
    assert ev.metrics["data"]["channels"] == CHANNELS
    assert ev.metrics["data"]["views"] == ["mean", *CHANNELS]
    cls = ev.metrics["results"]["independent"]["checkpoint"]["cls"]
    assert cls["summary"]["summary_views"] == ["Actin", "Mito"]  # the fluorescent pair
    assert cls["brightfield"]["views"] == ["Phase"] and cls["brightfield"]["against"] == ["Actin", "Mito"]
    assert "not_scored" in ev.metrics["profiling"]  # no plate maps: said, not crashed
