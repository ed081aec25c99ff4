"""The training loop: exact resume after a crash, 2-rank DDP on gloo, NaN handling (stop / skip)."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dinocell import storage
from dinocell.config import DataConfig, PreprocessConfig, ShardConfig, config_from_dict, load_config, packaged_config
from dinocell.train.batches import WorkerOrderedBatches
from dinocell.train.checkpoint import CheckpointManager
from dinocell.train.step import NonFiniteLossError, pretrain

torch.set_num_threads(2)

FIELD_SIZE = 128  # raw synthetic field; preprocessed (2x downsampled) fields are 64 x 64


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """A small synthetic JUMP bucket -> field manifest -> shards (12 fields in 4 shards)."""
    from dinocell.data.shards import write_shards
    from dinocell.jump import discover
    from dinocell.synth import bucket as synth

    root = tmp_path_factory.mktemp("data")
    source = str(root / "source")
    synth.synth_bucket(source, batches=1, plates_per_batch=2, wells_per_plate=2, sites_per_well=3, size=FIELD_SIZE,
                       seed=0, with_illum=False, workers=2)
    manifest = discover.discover_fields(DataConfig(images_prefix=storage.join(source, "images"), val_fraction=0.0,
                                                   eval_channels=[])).manifest  # the 5 fluorescent channels
    field_bytes = 5 * (FIELD_SIZE // 2) ** 2
    out = str(root / "shards")
    index = write_shards(manifest, out, ShardConfig(output=out, target_bytes=3 * field_bytes, workers=1), PreprocessConfig())
    assert len(index.shards) == 4 and index.n_fields == 12
    manifest_uri = str(root / "manifest.parquet")
    manifest.write(manifest_uri)
    return {"index": index.uri, "manifest": manifest_uri, "field_ids": set(manifest.column("field_id"))}


def tiny_overrides(shard_index: str, out: str, run_name: str, *extra: str) -> list[str]:
    return [
        f"loader.shards={shard_index}", f"train.output_dir={out}", f"train.run_name={run_name}",
        "model.num_heads=2", "model.embed_dim=32", "model.depth=2", "model.n_prototypes=64",
        "model.head_hidden_dim=48", "model.head_bottleneck_dim=16", "model.drop_path_rate=0.1",
        "augment.global_size=32", "augment.local_size=16", "augment.n_local=2", "augment.blur_kernel_size=3",
        "loader.batch_size=4", "loader.shuffle_buffer=4",
        "optim.epochs=2", "optim.iters_per_epoch=4", "optim.warmup_epochs=1", "loss.warmup_teacher_temp_epochs=1",
        "train.log_every=2", "train.vis_every=0", "train.ckpt_every=3", "train.max_iters=6", "train.progress=false",
        *extra,
    ]


def tiny_cfg(shard_set, out, run_name, *extra):
    return load_config(packaged_config("tiny"), tiny_overrides(shard_set["index"], str(out), run_name, *extra))


def load_final(result):
    return CheckpointManager(str(Path(result.final_checkpoint).parent)).load(result.final_checkpoint)


def assert_same_tree(a, b, path="state"):
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


class SimulatedCrash(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_crash_and_resume_is_bit_exact(shard_set, tmp_path, num_workers):
    """2N iterations straight == N iterations, crash, automatic resume, N more: every tensor of the final state."""
    workers = f"loader.num_workers={num_workers}"
    straight = pretrain(tiny_cfg(shard_set, tmp_path, "straight", workers))
    assert straight.iterations == 6 and straight.resumed_from is None

    def crash(iteration, info):
        if iteration == 5:  # after the checkpoint at 3: the work of iterations 4 and 5 is lost
            raise SimulatedCrash("killed")

    with pytest.raises(SimulatedCrash):
        pretrain(tiny_cfg(shard_set, tmp_path, "crashed", workers), on_iteration=crash)
    ckpts = CheckpointManager(str(tmp_path / "crashed" / "checkpoints"))
    assert [it for it, _ in ckpts.list()] == [3]  # a crash writes nothing: the last good checkpoint stays

    resumed = pretrain(tiny_cfg(shard_set, tmp_path, "crashed", workers))
    assert resumed.resumed_from.endswith("ckpt-00000003.pt") and resumed.iterations == 6
    a, b = load_final(straight), load_final(resumed)
    for key in ("student", "teacher", "optimizer", "iteration", "schedules", "ranks"):
        assert_same_tree(a[key], b[key], key)
    assert resumed.final_losses == pytest.approx(straight.final_losses, rel=0, abs=0)
    # the checkpoint is also an official-layout training checkpoint: the backbone loads with the DINOv3 loader
    from dinocell.model import build_vit, load_dinov3_checkpoint

    model = build_vit("vit_tiny", patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    report = load_dinov3_checkpoint(model, resumed.final_checkpoint)
    assert report.source_format == "teacher" and report.stripped_prefix == "backbone."


def test_worker_ordered_batches_restores_the_interrupted_order():
    def loader(start_per_worker):  # a 2-worker DataLoader's interleaving, restarted at worker 0
        counters = dict(start_per_worker)
        while True:
            for w in (0, 1):
                counters[w] += 1
                yield {"stream_pos": [{"worker": w}], "id": (w, counters[w])}

    straight = WorkerOrderedBatches(loader({0: 0, 1: 0}), 2, 0)
    order = [next(straight)["id"] for _ in range(7)]
    # after 3 batches worker 0 delivered 2, worker 1 delivered 1; a fresh loader starts at worker 0 again
    resumed = WorkerOrderedBatches(loader({0: 2, 1: 1}), 2, 3)
    assert [next(resumed)["id"] for _ in range(4)] == order[3:]


def assert_same_masks(a, b, what):
    assert a.n_masked_patches == b.n_masked_patches, what
    for name in ("masks", "mask_indices", "masks_weight"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: {name} differs"


def test_the_augment_curriculum_follows_the_training_iteration(shard_set, tmp_path):
    """augment.curriculum_iters=4: the first iteration's crops are near-whole and unturned, iterations from 4 on are
    dealt the configured flips and turns; the trainer hands the augmentation its iteration."""
    seen = {}

    def record(iteration, info):
        views = info["trainer"]._last_views
        area = views.global_views.box[:, 2] * views.global_views.box[:, 3] / views.field_size[0] / views.field_size[1]
        turned = [bool(v.hflip.any() or v.vflip.any() or v.rot90.any()) for v in (views.global_views, views.local_views)]
        seen[iteration] = (float(area.min()), any(turned))

    pretrain(tiny_cfg(shard_set, tmp_path, "curriculum", "augment.curriculum_iters=4", "augment.global_scale=[0.32,1.0]",
                      "augment.hflip_prob=0.5", "augment.vflip_prob=0.5", "augment.rotate90=true"), on_iteration=record)
    assert sorted(seen) == [1, 2, 3, 4, 5, 6]
    assert seen[1][0] >= 0.9 - 1e-5 and not seen[1][1]  # built at iteration 0
    assert seen[5][1] and seen[6][1]


def test_ibot_masks_come_with_the_batch_from_the_workers_and_survive_a_resume(shard_set, tmp_path, monkeypatch):
    """The DataLoader workers build each batch's iBOT masks (never the training process), seeded by (seed, rank,
    iteration): a crashed and resumed run uses exactly the masks of the straight run, iteration by iteration."""
    from torch.utils.data import get_worker_info

    import dinocell.train.batches as batches
    from dinocell.loss import collate_masks
    from dinocell.train.seeds import mask_rng

    def only_in_workers(*args, **kwargs):
        assert get_worker_info() is not None, "iBOT masks built in the training process, not in a DataLoader worker"
        return collate_masks(*args, **kwargs)

    monkeypatch.setattr(batches, "collate_masks", only_in_workers)  # forked workers inherit the patch

    def recorder(store, crash_at=None):
        def hook(iteration, info):
            store[iteration] = info["masks"]
            if iteration == crash_at:
                raise SimulatedCrash("killed")
        return hook

    workers = "loader.num_workers=2"
    straight, crashed, resumed = {}, {}, {}
    pretrain(tiny_cfg(shard_set, tmp_path, "straight", workers), on_iteration=recorder(straight))
    with pytest.raises(SimulatedCrash):
        pretrain(tiny_cfg(shard_set, tmp_path, "crashed", workers), on_iteration=recorder(crashed, crash_at=5))
    result = pretrain(tiny_cfg(shard_set, tmp_path, "crashed", workers), on_iteration=recorder(resumed))
    assert result.resumed_from.endswith("ckpt-00000003.pt")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6] and sorted(crashed) == [1, 2, 3, 4, 5] and sorted(resumed) == [4, 5, 6]
    for it in crashed:
        assert_same_masks(crashed[it], straight[it], f"iteration {it} before the crash")
    for it in resumed:
        assert_same_masks(resumed[it], straight[it], f"iteration {it} after the resume")

    # the masks of iteration i are a function of (seed, rank, i) alone (whatever the workers and their order)
    cfg = tiny_cfg(shard_set, tmp_path, "straight", workers)
    grid = (cfg.augment.global_size // cfg.model.patch_size,) * 2
    for it, got in straight.items():
        assert got.n_images == 2 * cfg.loader.batch_size and got.masks.shape[1] == grid[0] * grid[1]
        want = collate_masks(2 * cfg.loader.batch_size, grid, tuple(cfg.loss.mask_ratio_min_max),
                             cfg.loss.mask_probability, generator=mask_rng(cfg.train.seed, 0, it - 1))
        assert_same_masks(got, want, f"iteration {it} vs mask_rng")
    assert len({tuple(m.mask_indices.tolist()) for m in straight.values()}) == len(straight)  # fresh every iteration

    # which iteration each worker's next batch is for, after a (re)start at iteration 3 with 2 workers
    collate = batches.CollateWithMasks(None, 8, grid, (0.1, 0.5), 0.5, seed=0, rank=0, num_workers=2)
    collate.start(3, worker_ordered=True)  # WorkerOrderedBatches: iteration i takes worker i % 2's batch
    assert collate.next_iteration == [4, 3]
    collate.start(3, worker_ordered=False)  # the DataLoader's own round robin restarts at worker 0
    assert collate.next_iteration == [3, 4]


# ----------------------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, record_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    seen: list[str] = []

    def record(iteration, info):
        seen.extend(info["field_ids"])
        if iteration == info["trainer"].end_iteration:
            meta = info["trainer"].meta
            digest = {part: [float(p.detach().double().sum()) for p in getattr(meta, part).parameters()]
                      for part in ("student", "teacher")}
            Path(record_dir, f"rank{rank}.json").write_text(json.dumps({"fields": seen, "params": digest}))

    result = pretrain(config_from_dict(cfg_dict), on_iteration=record)
    Path(record_dir, f"result{rank}.json").write_text(json.dumps({"final": result.final_checkpoint}))


def test_two_rank_gloo_ddp(shard_set, tmp_path):
    cfg = tiny_cfg(shard_set, tmp_path / "out", "ddp", "train.max_iters=4", "train.ckpt_every=2")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict(), str(record_dir)), nprocs=2, join=True)

    r0, r1 = (json.loads((record_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["fields"]) == len(r1["fields"]) == 4 * 4  # batch 4 x 4 iterations on each rank
    # data epoch 0 = each rank's first 6 fields: disjoint halves of the 12 (later epochs re-deal the shards)
    first0, first1 = set(r0["fields"][:6]), set(r1["fields"][:6])
    assert len(first0) == len(first1) == 6 and not first0 & first1
    assert first0 | first1 == shard_set["field_ids"]
    assert r0["params"] == r1["params"]  # DDP kept the students, hence the EMA teachers, identical

    finals = {json.loads((record_dir / f"result{r}.json").read_text())["final"] for r in (0, 1)}
    assert len(finals) == 1  # every rank reports the same checkpoint
    run = tmp_path / "out" / "ddp"
    state = CheckpointManager(str(run / "checkpoints")).load()
    assert state["iteration"] == 4 and state["world_size"] == 2
    assert [r["rank"] for r in state["ranks"]] == [0, 1]
    assert state["ranks"][0]["data"] != state["ranks"][1]["data"]  # each rank's own data position
    assert not torch.equal(state["ranks"][0]["augment_generator"], state["ranks"][1]["augment_generator"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]  # rank 0 alone writes logs (rank 1 would duplicate every line)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "ckpt-00000002.pt", "ckpt-00000002.pt.json", "ckpt-00000004.pt", "ckpt-00000004.pt.json", "latest.json"]


# ----------------------------------------------------------------------------------------------- NaN policy


def poison_student(info) -> torch.Tensor:
    """Set one student weight to NaN (a fault injected between iterations); returns the original values."""
    weight = info["trainer"].meta.student.backbone.blocks[0].mlp.fc1.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    return saved


def test_nan_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(shard_set, tmp_path):
    def fault(iteration, info):
        if iteration == 4:
            poison_student(info)

    cfg = tiny_cfg(shard_set, tmp_path, "nan", "train.ckpt_every=2")
    with pytest.raises(NonFiniteLossError) as err:
        pretrain(cfg, on_iteration=fault)
    msg = str(err.value)
    assert "non-finite loss/gradient at iteration 5" in msg and "total=nan" in msg
    assert "Last good checkpoint:" in msg and msg.rstrip().endswith("drop such batches.")
    assert "ckpt-00000004.pt" in msg
    mgr = CheckpointManager(str(tmp_path / "nan" / "checkpoints"))
    assert [it for it, _ in mgr.list()] == [2, 4]
    state = mgr.load()
    assert state["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_nan_skip_policy_counts_and_limits(shard_set, tmp_path):
    saved = {}
    snapshots = {}

    def transient(iteration, info):
        fc1 = info["trainer"].meta.student.backbone.blocks[0].mlp.fc1.weight
        if iteration == 3:
            saved["w"] = poison_student(info)
            snapshots[3] = {k: v.clone() for k, v in info["trainer"].meta.teacher.state_dict().items()}
        if iteration == 4:  # iteration 4 ran on the poisoned weight: skipped, so nothing moved
            assert not info["applied"]
            teacher = info["trainer"].meta.teacher.state_dict()
            assert all(torch.equal(teacher[k], v) for k, v in snapshots[3].items())
            with torch.no_grad():
                fc1.copy_(saved["w"])  # the fault goes away

    result = pretrain(tiny_cfg(shard_set, tmp_path, "skip", "train.nan_policy=skip", "train.max_skips=1"),
                      on_iteration=transient)
    assert result.iterations == 6 and result.skipped_iterations == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in result.final_losses.values())  # finite after the fault
    lines = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped_total"] for x in lines] == [0, 1, 1]

    def permanent(iteration, info):
        if iteration == 2:
            poison_student(info)

    with pytest.raises(NonFiniteLossError, match=r"3 updates skipped, more than train.max_skips=2"):
        pretrain(tiny_cfg(shard_set, tmp_path, "skip2", "train.nan_policy=skip", "train.max_skips=2"),
                 on_iteration=permanent)


# ----------------------------------------------------------------------------------------------- other data paths


def test_s3_output_resumes_on_a_new_machine_and_continues_the_logs(shard_set, tmp_path, s3_bucket, monkeypatch):
    out = f"s3://{s3_bucket}/runs"
    monkeypatch.setenv("DINOCELL_LOCAL_RUN_DIR", str(tmp_path / "machine1"))
    first = pretrain(tiny_cfg(shard_set, out, "s3run", "train.max_iters=2"))
    assert first.final_checkpoint == f"{out}/s3run/checkpoints/ckpt-00000002.pt"
    monkeypatch.setenv("DINOCELL_LOCAL_RUN_DIR", str(tmp_path / "machine2"))  # nothing local any more
    second = pretrain(tiny_cfg(shard_set, out, "s3run", "train.max_iters=4"))
    assert second.resumed_from == first.final_checkpoint and second.iterations == 4
    steps = [json.loads(x)["step"] for x in storage.read_text(f"{out}/s3run/metrics.jsonl").splitlines()]
    assert steps == [2, 4]
    assert storage.exists(f"{out}/s3run/config.yaml")


def test_raw_mode_with_one_pass_epochs(shard_set, tmp_path):
    cfg = tiny_cfg(shard_set, tmp_path, "raw", "loader.mode=raw", f"data.manifest={shard_set['manifest']}",
                   "optim.iters_per_epoch=0", "train.max_iters=4", "train.ckpt_every=0")
    result = pretrain(cfg)
    state = load_final(result)
    assert state["schedules"]["iters_per_epoch"] == 3  # 12 training fields / batch 4
    assert state["ranks"][0]["data"] == {"mode": "raw", "epoch": 1, "fields_consumed": 16}
    # The raw stream's cache counters reach the log: every field read is a lookup per channel, hit or miss.
    lines = [json.loads(x) for x in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    data = [x for x in lines if "data/misses" in x]
    assert data, "raw-mode data counters missing from metrics.jsonl"
    last = data[-1]
    assert last["data/misses"] >= 12 * 5 and last["data/hits"] + last["data/misses"] >= 16 * 5
    assert 0.0 <= last["data/hit_rate"] <= 1.0 and last["data/skipped"] == 0
    resumed = pretrain(tiny_cfg(shard_set, tmp_path, "raw", "loader.mode=raw", f"data.manifest={shard_set['manifest']}",
                                "optim.iters_per_epoch=0", "train.max_iters=5", "train.ckpt_every=0"))
    assert resumed.resumed_from == result.final_checkpoint and resumed.iterations == 5


def test_a_pod_that_requested_gpus_never_trains_on_cpu(monkeypatch):
    """train.device auto falls back to CPU on a laptop, but not in a pod that asked for GPUs (wrong image or node)."""
    from dinocell.train.distributed import REQUIRED_GPUS_ENV, resolve_device

    monkeypatch.delenv(REQUIRED_GPUS_ENV, raising=False)
    if not torch.cuda.is_available():
        assert resolve_device("auto", 0) == torch.device("cpu")
        monkeypatch.setenv(REQUIRED_GPUS_ENV, "8")
        with pytest.raises(RuntimeError, match="requested 8 GPUs, CUDA not available: wrong image or node"):
            resolve_device("auto", 0)
    monkeypatch.setenv(REQUIRED_GPUS_ENV, "8")
    with pytest.raises(RuntimeError, match="requested 8 GPUs"):
        resolve_device("cpu", 0)


# ----------------------------------------------------------------------------------------------- preemption

# The training process of a preempted pod: the tiny run, which at iteration `at` tells the test to send SIGTERM now
# (a marker file) and holds that iteration until the signal has arrived, so the stop iteration is deterministic.
_PREEMPTED_RUN = r"""
import sys, time
from pathlib import Path

import torch

from dinocell.config import load_config
from dinocell.train.step import pretrain

# the same intra-op thread count as the in-process runs it is compared with (float reductions depend on it)
torch.set_num_threads(int(sys.argv[4]))
cfg_path, marker, at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])


def hold_for_sigterm(iteration, info):
    if iteration == at:
        marker.write_text(str(iteration))
        deadline = time.monotonic() + 60
        while not info["trainer"].sigterm.requested and time.monotonic() < deadline:
            time.sleep(0.01)


pretrain(load_config(cfg_path), on_iteration=hold_for_sigterm)
"""


def test_sigterm_checkpoints_exits_143_and_the_restart_is_bit_exact(shard_set, tmp_path):
    """A real SIGTERM to a training process (a preempted pod): it finishes the iteration, writes the full checkpoint
    of the iteration where it stopped, exits with 143; the restarted run resumes from `latest` and ends bit-exactly
    where an uninterrupted run ends."""
    import signal
    import subprocess
    import sys
    import time

    workers = "loader.num_workers=2"  # forked DataLoader workers must not swallow the trainer's SIGTERM handling
    before = signal.getsignal(signal.SIGTERM)
    straight = pretrain(tiny_cfg(shard_set, tmp_path, "straight", workers))
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored when training ends

    cfg_path = tmp_path / "preempted.yaml"
    cfg_path.write_text(tiny_cfg(shard_set, tmp_path, "preempted", workers).to_yaml())
    marker = tmp_path / "send-sigterm-now"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _PREEMPTED_RUN, str(cfg_path), str(marker), "3",
                             str(torch.get_num_threads())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before iteration 3: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "the run did not reach iteration 3"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGTERM)  # during iteration 3's hook, after its periodic checkpoint
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-3000:]
    # the flag rides on the next iteration's all-reduce: iteration 4 completes, is checkpointed, and the run exits
    assert "SIGTERM: checkpointed iteration 4, exiting for restart" in err, err[-3000:]
    ckpts = CheckpointManager(str(tmp_path / "preempted" / "checkpoints"))
    assert [it for it, _ in ckpts.list()] == [3, 4]
    assert ckpts.latest().endswith("ckpt-00000004.pt")
    assert json.loads((tmp_path / "preempted" / "checkpoints" / "latest.json").read_text())["iteration"] == 4

    resumed = pretrain(tiny_cfg(shard_set, tmp_path, "preempted", workers))  # the restarted pod
    assert resumed.resumed_from.endswith("ckpt-00000004.pt") and resumed.iterations == 6
    a, b = load_final(straight), load_final(resumed)
    assert a.keys() == b.keys()
    for key in a.keys() - {"config"}:  # the configs differ only in run_name
        assert_same_tree(a[key], b[key], key)
    assert resumed.final_losses == pytest.approx(straight.final_losses, rel=0, abs=0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "preempted" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # the restarted run continues the metrics log


def _ddp_preempted_worker(rank: int, world: int, port: int, cfg_dict: dict, record_dir: str) -> None:
    import signal

    from dinocell.train.preemption import Preempted

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)

    def sigterm_rank1(iteration, info):
        if rank == 1 and iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to this rank only

    try:
        pretrain(config_from_dict(cfg_dict), on_iteration=sigterm_rank1)
        record = {"exit": 0}
    except Preempted as e:
        record = {"exit": e.code, "iteration": e.iteration, "checkpoint": e.checkpoint}
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(record))


def test_sigterm_on_one_ddp_rank_stops_every_rank_at_the_same_iteration(shard_set, tmp_path):
    cfg = tiny_cfg(shard_set, tmp_path / "out", "ddp", "train.max_iters=4", "train.ckpt_every=2")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    mp.spawn(_ddp_preempted_worker, args=(2, _free_port(), cfg.to_dict(), str(record_dir)), nprocs=2, join=True)

    r0, r1 = (json.loads((record_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    # rank 1's SIGTERM (end of iteration 2) reaches rank 0 through iteration 3's all-reduce: both stop after 3
    assert r0 == r1 and r0["exit"] == 143 and r0["iteration"] == 3 and r0["checkpoint"].endswith("ckpt-00000003.pt")
    mgr = CheckpointManager(str(tmp_path / "out" / "ddp" / "checkpoints"))
    assert [it for it, _ in mgr.list()] == [2, 3]
    state = mgr.load()
    assert state["iteration"] == 3 and state["world_size"] == 2 and [r["rank"] for r in state["ranks"]] == [0, 1]
