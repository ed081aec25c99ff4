"""W&B with the real wandb package in offline mode: WANDB_MODE wins over the config, the trainer's keys arrive under
the names W&B users expect (loss/*, training/lr, training/epoch, ...), the images too, and the GPU's system/* values
only where a GPU is in use. The offline run's transaction log (run-<id>.wandb) is read back record by record."""

import json
import struct
import time
from pathlib import Path

import pytest
import torch

from dinocell import storage
from dinocell.monitor.run_log import WANDB_KEYS, RunLogger

wandb = pytest.importorskip("wandb", reason="wandb is optional: pip install 'dinocell[wandb]'")
from wandb.proto import wandb_internal_pb2  # noqa: E402

torch.set_num_threads(2)

# What Trainer._log passes to log_scalars on a CPU run (dinocell/train/loop.py), one value each.
TRAINER_KEYS = [
    "loss/total", "loss/dino", "loss/dino_global", "loss/dino_local", "loss/ibot", "loss/koleo",
    "lr", "wd", "momentum", "teacher_temp", "last_layer_lr", "epoch", "fields_per_s", "s_per_iter",
    "data_wait_s_per_iter", "skipped_total", "grad_norm/backbone", "augment/global/mean_fraction", "data/fields_read",
]
ON_GPU = torch.cuda.is_available()
GPU_MEMORY_KEYS = {"system/gpu_memory_gb", "system/gpu_memory_reserved_gb", "system/gpu_memory_peak_gb"}


def read_wandb_log(path: Path) -> list:
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks
    (crc32c u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last), each record a wandb_internal Record."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def history(wandb_root: Path, run_id: str, timeout_s: float = 30.0) -> list[dict]:
    """{key: value} of every history row of the offline run `run_id` under wandb_root.

    wandb-core writes the log in its own process and may still be flushing it when run.finish() returns: the rows
    are read once the log holds the run's exit record."""
    runs = list((wandb_root / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, sorted(p.name for p in (wandb_root / "wandb").iterdir())
    path = runs[0] / f"run-{run_id}.wandb"
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_log(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{path}: no exit record {timeout_s}s after finish()"
        time.sleep(0.05)
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows


@pytest.fixture
def offline(tmp_path, monkeypatch):
    root = tmp_path / "wandb_root"
    root.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(root))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return root


def test_env_mode_wins_and_the_trainer_keys_are_mapped(tmp_path, offline):
    run_dir = tmp_path / "run"
    # the config says disabled (its default); WANDB_MODE=offline in the environment wins
    with RunLogger(run_dir, {"train": {"lr": 1e-3}}, wandb_mode="disabled", run_name="keys") as rl:
        assert rl.wandb_mode == "offline" and rl.wandb_run is not None
        rl.log_scalars(2, {k: float(i) for i, k in enumerate(TRAINER_KEYS)})
        rl.log_scalars(3, {"nonfinite/iteration": 3, "skipped": 1, "gpu_mem_gib": 1.5})
    rows = history(offline, (run_dir / "wandb_id.txt").read_text().strip())
    assert [r["_step"] for r in rows] == [2, 3]
    first = rows[0]
    for key in ("loss/total", "loss/dino", "loss/ibot", "loss/koleo", "training/lr", "training/epoch",
                "training/teacher_momentum", "training/weight_decay", "perf/fields_per_s", "grad_norm/backbone",
                "augment/global/mean_fraction", "data/fields_read"):
        assert key in first, f"{key} not in the W&B row: {sorted(first)}"
    assert first["training/lr"] == TRAINER_KEYS.index("lr") and first["training/epoch"] == TRAINER_KEYS.index("epoch")
    assert not {"lr", "epoch", "momentum", "wd"} & set(first)  # renamed, not sent twice
    assert rows[1]["training/skipped_updates"] == 1 and "gpu_mem_gib" not in rows[1]
    gpu_keys = {k for r in rows for k in r if k.startswith("system/gpu")}
    if not torch.cuda.is_initialized():  # CUDA not in use: no GPU values, never a made-up 0
        assert gpu_keys == set(), gpu_keys
    else:
        assert GPU_MEMORY_KEYS <= gpu_keys, gpu_keys
    # the local file keeps the caller's keys
    local = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "lr" in local[0] and "epoch" in local[0] and "training/lr" not in local[0]
    assert local[1]["gpu_mem_gib"] == 1.5


def test_every_mapped_key_has_a_section():
    assert all(v is None or v.split("/")[0] in ("training", "perf") for v in WANDB_KEYS.values())


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_gpu_memory_and_utilisation_on_a_gpu(tmp_path, offline):
    x = torch.ones(256, 1024, 1024, device="cuda")  # 1 GiB
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, {}, wandb_mode="offline") as rl:
        rl.log_scalars(1, {"loss/total": 1.0})
    del x
    row = history(offline, (run_dir / "wandb_id.txt").read_text().strip())[0]
    assert row["system/gpu_memory_gb"] >= 1.07 and row["system/gpu_memory_peak_gb"] >= row["system/gpu_memory_gb"]
    assert row["system/gpu_memory_reserved_gb"] >= row["system/gpu_memory_gb"]
    try:
        expected_util = torch.cuda.utilization()
    except Exception:  # noqa: BLE001 - no NVML here: the key must be absent
        expected_util = None
    if expected_util is None:
        assert "system/gpu_util" not in row
    else:
        assert 0 <= row["system/gpu_util"] <= 100


# ----------------------------------------------------------------------------------- the real trainer, offline

FIELD_SIZE = 128


@pytest.fixture(scope="module")
def shard_index(tmp_path_factory):
    """4 synthetic fields (64 x 64 after preprocessing) in one shard."""
    from dinocell.config import DataConfig, PreprocessConfig, ShardConfig
    from dinocell.data.shards import write_shards
    from dinocell.jump.discover import discover_fields
    from dinocell.synth import synth_bucket

    root = tmp_path_factory.mktemp("wandb_data")
    source = str(root / "source")
    synth_bucket(source, batches=1, plates_per_batch=1, wells_per_plate=2, sites_per_well=2, size=FIELD_SIZE, seed=0,
                 with_illum=False, workers=2)
    manifest = discover_fields(DataConfig(images_prefix=storage.join(source, "images"), val_fraction=0.0)).manifest
    out = str(root / "shards")
    return write_shards(manifest, out, ShardConfig(output=out, workers=1), PreprocessConfig()).uri


@pytest.mark.slow
def test_trainer_run_arrives_in_wandb_under_the_expected_keys(shard_index, tmp_path, offline):
    from dinocell.config import load_config, packaged_config
    from dinocell.train.step import pretrain

    cfg = load_config(packaged_config("tiny"), [
        f"loader.shards={shard_index}", f"train.output_dir={tmp_path / 'out'}", "train.run_name=wb",
        "model.num_heads=2", "model.embed_dim=32", "model.depth=2", "model.n_prototypes=64",
        "model.head_hidden_dim=48", "model.head_bottleneck_dim=16",
        "augment.global_size=32", "augment.local_size=16", "augment.n_local=2", "augment.blur_kernel_size=3",
        "loader.batch_size=4", "loader.shuffle_buffer=4", "loader.num_workers=0",
        "optim.epochs=1", "optim.iters_per_epoch=2", "optim.warmup_epochs=0", "loss.warmup_teacher_temp_epochs=0",
        "train.log_every=1", "train.vis_every=2", "train.ckpt_every=0", "train.max_iters=2", "train.progress=false",
        "train.wandb_mode=disabled",  # WANDB_MODE=offline (the fixture) wins
    ])
    result = pretrain(cfg)
    run_id = (Path(result.run_dir) / "wandb_id.txt").read_text().strip()
    rows = history(offline, run_id)
    keys = {k for r in rows for k in r}
    for key in ("loss/total", "loss/dino", "loss/ibot", "loss/koleo", "training/lr", "training/epoch",
                "perf/fields_per_s", "consistency/same_field", "consistency/gap"):
        assert key in keys, f"{key} not logged to W&B: {sorted(keys)}"
    for image in ("vis/attention", "vis/pca", "vis/pca_scatter", "vis/channel_consistency"):
        assert f"{image}/_type" in keys and f"{image}/path" in keys, f"image {image} not logged: {sorted(keys)}"
    assert not {"lr", "epoch"} & keys
    by_step = {r["_step"]: r for r in rows if "training/epoch" in r}
    assert by_step[1]["training/epoch"] == 0.5 and by_step[2]["training/epoch"] == 1.0
    gpu_keys = {k for k in keys if k.startswith("system/gpu")}
    if ON_GPU:  # train.device=auto trains on the GPU: its memory is in every row
        assert all(GPU_MEMORY_KEYS <= set(r) for r in rows if "training/lr" in r), gpu_keys
    else:
        assert gpu_keys == set(), gpu_keys  # a CPU run: no GPU values at all
    local = [json.loads(x) for x in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert any("lr" in r and "loss/total" in r for r in local)
