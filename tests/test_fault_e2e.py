"""End to end through a faulty network: discover -> shard -> pretrain (checkpoint) -> resume, every object GET behind
a loopback proxy that injects 10% mixed faults (503, 500, reset, delay past the read timeout, truncated body).

Nothing may be lost: the fields in the shards are exactly the manifest's minus the skips the shard step reports;
every skip is a planted (missing / corrupt) input, none is transient after the retry policy; training writes its
checkpoint and the restarted run resumes from it.
"""

from __future__ import annotations

import json

import pytest
import torch
from fault_proxy import FaultProxy

from dinocell import storage
from dinocell.config import load_config, packaged_config
from dinocell.data.shard_format import ShardIndex
from dinocell.data.shard_tar import read_shard
from dinocell.data.step import shard
from dinocell.jump.manifest import Manifest, make_field_id
from dinocell.jump.step import discover
from dinocell.train.checkpoint import CheckpointManager
from dinocell.train.step import pretrain

torch.set_num_threads(1)

SIZE = 64  # raw synthetic fields; 5 x 32 x 32 after 2x downsampling
FIELD_BYTES = 5 * (SIZE // 2) ** 2
# Clients give up on an answer after 1 s: the proxy's "delay" faults (1.5 s) are read timeouts, retried.
STORAGE = ["storage.read_timeout_s=1", "storage.connect_timeout_s=2", "storage.max_attempts=10"]
TINY = [
    "model.num_heads=2", "model.embed_dim=32", "model.depth=2", "model.n_prototypes=16",
    "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "augment.global_size=32", "augment.local_size=16",
    "augment.n_local=2", "augment.blur_kernel_size=3", "loader.batch_size=4", "loader.shuffle_buffer=4",
    "loader.num_workers=0", "optim.epochs=2", "optim.iters_per_epoch=2", "optim.warmup_epochs=1",
    "loss.warmup_teacher_temp_epochs=1", "train.log_every=1", "train.vis_every=0", "train.ckpt_every=2",
    "train.progress=false", "train.run_name=e2e",
]


@pytest.fixture
def source(s3_bucket, buckets):
    """A synthetic JUMP source (2 plates, 8 fields) with missing and corrupt images planted (those in the 5
    fluorescent channels, the ones sharded, are the fields that must be skipped)."""
    from dinocell.synth import SynthFaults

    report = buckets.synth(f"s3://{s3_bucket}/source", plates_per_batch=2, sites_per_well=2, with_illum=False,
                           seed=0, faults=SynthFaults(missing_channel=1, corrupt_tiff=2, seed=0))
    planted = {make_field_id(f.batch, f.plate, f.well, f.site) for f in report.faults
               if f.channel in ("DNA", "ER", "RNA", "AGP", "Mito")}
    assert planted, report.faults
    return s3_bucket, report, planted


def test_discover_shard_pretrain_resume_lose_nothing_under_mixed_faults(s3_server, source):
    bucket, report, planted = source
    out = f"s3://{bucket}/out"
    with FaultProxy(s3_server.endpoint_url, list(FaultProxy.KINDS), rate=0.1, seed=1, delay_s=1.5) as proxy:
        found = discover("", [f"data.images_prefix={report.source_root}/images", "data.val_fraction=0", *STORAGE],
                         manifest_uri=f"{out}/manifest.parquet", endpoint_url=proxy.url)
        shards = shard("", [f"shard.target_bytes={3 * FIELD_BYTES}", "shard.workers=2", *STORAGE],
                       manifest_uri=found.manifest_uri, shards_prefix=f"{out}/shards", endpoint_url=proxy.url)
        cfg = load_config(packaged_config("tiny"), [f"loader.shards={shards.index_uri}",
                                                    f"train.output_dir={out}/run", "train.max_iters=2", *TINY])
        first = pretrain(cfg)
        cfg.train.max_iters = 4
        second = pretrain(cfg)  # a restart: resumes from the first run's checkpoint
    assert set(proxy.injected) == set(FaultProxy.KINDS), proxy.injected  # every kind of fault happened
    assert sum(proxy.injected.values()) >= 0.05 * proxy.object_gets, (proxy.injected, proxy.object_gets)

    # Nothing lost: shard fields == manifest fields - reported skips, and the skips are the planted inputs.
    manifest = Manifest.read(found.manifest_uri)
    assert len(manifest) == found.n_fields == report.n_fields == 8
    index = ShardIndex.read(shards.index_uri)
    in_shards = [m["field_id"] for s in index.shards for m, _ in read_shard(index.shard_uri(s), s.bytes, s.sha256)]
    skipped = {s["field_id"]: s["kind"] for s in index.skipped}
    assert len(in_shards) == len(set(in_shards)) == index.n_fields
    assert set(in_shards) == set(manifest.column("field_id")) - set(skipped)
    assert set(skipped) == planted and set(skipped.values()) <= {"missing", "corrupt"}
    assert shards.skipped_by_kind["transient"] == 0 and shards.metadata()["skipped_transient"] == 0
    for fid in skipped:  # every skip is reported to the person running the step
        assert fid in shards.summary_text
    assert json.loads(storage.read_text(shards.index_uri))["totals"]["skipped"] == len(planted)

    # Training checkpointed and the restart resumed from that checkpoint.
    ckpts = CheckpointManager(f"{out}/run/e2e/checkpoints")
    assert first.final_checkpoint == ckpts.uri_for(2) and first.resumed_from is None
    assert second.resumed_from == first.final_checkpoint and second.final_checkpoint == ckpts.uri_for(4)
    assert [it for it, _ in ckpts.list()] == [2, 4] and ckpts.load()["iteration"] == 4
