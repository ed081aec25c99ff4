"""The SSL training loop: `pretrain(cfg)`.

One iteration on each rank: next batch of uint8 fields (DataLoader over shards or raw fields) -> device ->
multi-view crops (augmentation on the device, seeded generator) + iBOT masks -> scheduled lr / wd / momentum /
teacher temperature -> forward-backward -> per-part gradient clipping -> finite check (all ranks agree) ->
AdamW step -> EMA teacher update. An epoch is `optim.iters_per_epoch` iterations (DINOv3's convention); the data
streams are endless and keep their own epochs.

Distributed: started by torchrun (env:// rendezvous; nccl on GPU, gloo on CPU; device cuda:LOCAL_RANK). Every
rank reads a disjoint part of the data (ShardStream / RawFieldStream partition by rank); only rank 0 logs and
writes checkpoints, but a checkpoint holds the RNG and data positions of every rank (gathered to rank 0).

Resume: a run restarted with the same output_dir / run_name resumes from its `latest` checkpoint automatically and
continues exactly: model, teacher, optimizer, iteration (the schedules are closed-form in it), every rank's RNG
states (global torch / CUDA / numpy / python, the augmentation and mask generators) and data position
(ShardStream.state_dict; raw mode restarts its current data epoch, which is the only inexact case). Batches are
consumed in a fixed worker order (iteration i takes worker i % num_workers's next batch), so a multi-worker shard
loader also resumes bit-exactly.

Non-finite loss or gradient: nan_policy "stop" raises NonFiniteLossError naming the iteration, the loss terms and
the last good checkpoint (never overwritten by a bad state); "skip" drops that update (no step, no EMA), counts it,
and stops once more than max_skips updates were dropped.
"""

from __future__ import annotations

import collections
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dinocell import storage
from dinocell.channels import FLUORESCENT_CHANNELS
from dinocell.config.training import validate_training_config
from dinocell.data.multiview import MultiViewAugment
from dinocell.log import get_logger, setup_logging
from dinocell.loss import collate_masks
from dinocell.train.optim import apply_schedules, build_optimizer
from dinocell.train.schedules import TrainingSchedules
from dinocell.train.ssl_model import LOSS_KEYS, SSLInputs, SSLMetaArch, mask_batch_to

log = get_logger(__name__)

CHECKPOINT_FORMAT = "dinocell-pretrain"
CHECKPOINT_VERSION = 1
PART_NAMES = ("backbone", "dino_head", "ibot_head")


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss or gradient and stopped; the message names the last good checkpoint."""


@dataclass
class PretrainResult:
    final_checkpoint: str  # URI of the checkpoint written at the end
    output_uri: str  # <output_dir>/<run_name>: checkpoints/ and (for a local output) the logs
    run_dir: str  # local directory holding metrics.jsonl, config.yaml, images/
    iterations: int  # iterations completed (including skipped ones)
    final_losses: dict[str, float]  # loss terms of the last logging window (mean over ranks and iterations)
    skipped_iterations: int = 0
    resumed_from: str | None = None


# ----------------------------------------------------------------------------------------------- distributed
@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda") or spec == "auto":
        if not torch.cuda.is_available():
            if spec == "auto":
                return torch.device("cpu")
            raise RuntimeError(f"train.device={spec!r} but CUDA is not available")
        if spec.startswith("cuda:"):
            return torch.device(spec)
        return torch.device("cuda", local_rank)
    raise ValueError(f"train.device: unknown device {spec!r}")


def setup_distributed(train_cfg) -> DistEnv:
    """Join the torchrun process group when WORLD_SIZE > 1 (or reuse an initialised one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = _resolve_device(train_cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    initialized_here = False
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    elif world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            world_size=world,
            rank=rank,
            timeout=datetime.timedelta(minutes=train_cfg.dist_timeout_min),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
        initialized_here = True
    return DistEnv(rank, world, local_rank, device, initialized_here)


def _all_gather_objects(env: DistEnv, obj) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------- data
class WorkerOrderedBatches:
    """Batches of a multi-worker shard DataLoader in a fixed order: iteration i gets worker (i % W)'s next batch.

    The DataLoader itself restarts at worker 0 when re-created after a resume, while the interrupted run would have
    continued with worker (iteration % W): without this reordering a resumed run would see the same batches in a
    rotated order. Batches that arrive early wait here (at most W - 1 of them); they are not `observe`d until used,
    so a checkpoint never counts them as consumed.
    """

    def __init__(self, batches: Iterator[dict], num_workers: int, start_iteration: int):
        self.batches = batches
        self.num_workers = max(1, num_workers)
        self.iteration = start_iteration
        self.waiting: dict[int, collections.deque] = collections.defaultdict(collections.deque)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        want = self.iteration % self.num_workers
        while not self.waiting[want]:
            batch = next(self.batches)
            workers = {int(p["worker"]) for p in batch["stream_pos"]}
            if len(workers) != 1:
                raise RuntimeError(f"a batch mixes samples of DataLoader workers {sorted(workers)}")
            self.waiting[workers.pop()].append(batch)
        self.iteration += 1
        return self.waiting[want].popleft()


def _data_note(values: dict) -> str:
    """The data counters worth a glance in the log line: skipped inputs always, the raw-mode cache hit rate."""
    parts = []
    if "data/hit_rate" in values:
        parts.append(f"cache hit rate {values['data/hit_rate']:.2f}")
    skipped = values.get("data/skipped", 0) + values.get("data/shards_failed", 0)
    if skipped:
        parts.append(f"{int(skipped)} inputs skipped (see warnings)")
    return ("  " + ", ".join(parts)) if parts else ""


class DataSource:
    """The rank's field stream and DataLoader (shards or raw mode), its resume state and its epoch length."""

    def __init__(self, cfg, env: DistEnv):
        from torch.utils.data import DataLoader

        self.cfg, self.env = cfg, env
        self.mode = cfg.loader.mode
        self.batch_size = cfg.loader.batch_size
        self.num_workers = cfg.loader.num_workers
        self.fields_consumed = 0  # raw mode: by this rank since the start of the run
        if self.mode == "shards":
            from dinocell.data.shard_reader import ShardStream

            self.stream = ShardStream(cfg.loader.shards, cfg.loader, rank=env.rank, world_size=env.world_size,
                                      seed=cfg.train.seed, infinite=True)
            collate = ShardStream.collate
            self.channels = tuple(self.stream.channels)
        else:
            from dinocell.data.fields import collate_fields
            from dinocell.data.raw_stream import RawFieldStream
            from dinocell.jump.manifest import Manifest

            manifest = Manifest.read(cfg.data.manifest)
            self.stream = RawFieldStream(manifest, cfg.loader, cfg.preprocess, cfg.data.channels, split="train",
                                         rank=env.rank, world_size=env.world_size, seed=cfg.train.seed,
                                         iter_epochs=True)
            collate = collate_fields
            self.channels = tuple(cfg.data.channels)
        loader_gen = torch.Generator().manual_seed(_stream_seed(cfg.train.seed, env.rank, 3))
        self.loader = DataLoader(
            self.stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=env.device.type == "cuda",
            drop_last=True,
            persistent_workers=self.num_workers > 0,
            prefetch_factor=2 if self.num_workers > 0 else None,
            generator=loader_gen,  # the DataLoader's base seed must not consume the global RNG (exact resume)
        )

    def stats_scalars(self) -> dict[str, float]:
        """This rank's data counters for the log (raw mode: cache hits/misses/hit rate, skipped fields; shards:
        shards/fields read, corrupt shards skipped): counted in shared memory across DataLoader workers, so exact."""
        return {f"data/{k}": float(v) for k, v in self.stream.stats().items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def fields_per_epoch(self) -> int:
        """Fields of one pass over this rank's share of the training data."""
        if self.mode == "shards":
            return self.stream.fields_per_epoch(0, num_workers=max(1, self.num_workers))
        return max(1, len(self.stream.manifest) // self.env.world_size)

    def iters_per_epoch(self) -> int:
        n = self.fields_per_epoch() // self.batch_size
        if n < 1:
            raise ValueError(
                f"optim.iters_per_epoch=0 means one pass over the data, but this rank's share holds "
                f"{self.fields_per_epoch()} fields, fewer than one batch of loader.batch_size={self.batch_size}"
            )
        return n

    def batches(self, start_iteration: int) -> Iterator[dict]:
        it = iter(self.loader)
        if self.mode == "shards" and self.num_workers > 1:
            return WorkerOrderedBatches(it, self.num_workers, start_iteration)
        return it

    def consumed(self, batch: dict) -> None:
        if self.mode == "shards":
            self.stream.observe(batch)
        else:
            self.fields_consumed += len(batch["field_ids"])

    def state_dict(self) -> dict:
        if self.mode == "shards":
            return {"mode": "shards", "stream": self.stream.state_dict()}
        share = self.fields_per_epoch()
        return {"mode": "raw", "epoch": self.stream.epoch + self.fields_consumed // share,
                "fields_consumed": self.fields_consumed}

    def load_state_dict(self, state: dict, exact: bool = True) -> None:
        if state.get("mode") != self.mode:
            log.warning("checkpoint data state is for loader.mode=%s, this run uses %s: data restarts from its start",
                        state.get("mode"), self.mode)
            return
        if self.mode == "shards":
            self.stream.load_state_dict(state["stream"], strict=exact)
        else:
            epoch = int(state["epoch"])
            self.stream.set_epoch(epoch)
            log.warning("raw data mode resumes at the start of data epoch %d (fields of that epoch may repeat)", epoch)


def _stream_seed(seed: int, rank: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, rank, stream)."""
    return (seed * 1_000_003 + rank * 7919 + stream * 104_729) % (2**63 - 1)


# ----------------------------------------------------------------------------------------------- visualisation
class Visualizer:
    """Images on a fixed validation batch: last-block CLS attention, PCA-RGB patch features, channel consistency."""

    def __init__(self, cfg, fields_u8: torch.Tensor, channels: tuple[str, ...], device: torch.device):
        self.cfg = cfg
        self.fields_u8 = fields_u8.cpu()
        self.channels = tuple(channels)
        self.device = device

    @classmethod
    def from_config(cls, cfg, first_batch: dict, device: torch.device) -> Visualizer:
        """Fields of the manifest's val split when there is a manifest with one, else the first training batch."""
        n = cfg.train.vis_fields
        if cfg.data.manifest:
            try:
                from dinocell.data.fields import FieldLoader
                from dinocell.jump.manifest import Manifest

                val = Manifest.read(cfg.data.manifest).split("val")
                if len(val):
                    channels = list(first_batch["channels"])
                    loader = FieldLoader(cfg.preprocess, channels, cfg.loader.fetch_workers)
                    fields, errors = loader.load_many(list(val.take(list(range(min(n, len(val))))).records()))
                    if errors:
                        log.warning("visualisation: %d val field(s) failed to load: %s", len(errors), errors[:3])
                    if len(fields) >= 2 and fields[0].image.shape == tuple(first_batch["images"].shape[1:]):
                        images = torch.stack([torch.from_numpy(f.image.copy()) for f in fields])
                        log.info("visualisation batch: %d val fields of %s", len(fields), cfg.data.manifest)
                        return cls(cfg, images, tuple(channels), device)
            except Exception as e:  # noqa: BLE001 - the images are diagnostics: never let them stop training
                log.warning("visualisation: cannot use the manifest's val split (%s: %s); using the first batch",
                            type(e).__name__, e)
        log.info("visualisation batch: the first %d fields of the first training batch", min(n, len(first_batch["images"])))
        return cls(cfg, first_batch["images"][:n].clone(), tuple(first_batch["channels"]), device)

    def mean_view(self) -> torch.Tensor:
        """The fluorescent mean of each field at the global crop size, normalised like the training crops."""
        aug = self.cfg.augment
        idx = [self.channels.index(c) for c in FLUORESCENT_CHANNELS]
        x = self.fields_u8[:, idx].float().mean(dim=1, keepdim=True)
        x = F.interpolate(x, size=(aug.global_size, aug.global_size), mode="bilinear", antialias=True,
                          align_corners=False)
        return ((x / 255.0 - aug.norm_mean) / aug.norm_std).to(self.device)

    @torch.no_grad()
    def images(self, backbone) -> tuple[dict, dict]:
        """({name: rgb uint8}, {scalar name: value}) for the teacher backbone (eval mode)."""
        from dinocell.monitor.consistency import embed_views, same_field_matrix, summary
        from dinocell.monitor.figures import attention_maps_image, matrix_image, pca_rgb_image

        x = self.mean_view()
        patch = backbone.patch_size
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        display = x.cpu()
        out = {
            "vis/attention": attention_maps_image(backbone.get_last_self_attention(x).float().cpu(), grid, display),
            "vis/pca": pca_rgb_image(backbone.forward_features(x)["x_norm_patchtokens"].float().cpu(), grid, display),
        }
        scalars = {}
        aug = self.cfg.augment
        embs = embed_views(backbone, self.fields_u8, list(self.channels), size=aug.global_size, mean=aug.norm_mean,
                           std=aug.norm_std, device=self.device, batch_size=len(self.fields_u8))
        matrix, labels = same_field_matrix(embs, key="cls")
        out["vis/channel_consistency"] = matrix_image(matrix, labels, "same-field CLS cosine similarity")
        numbers = summary(embs, key="cls")
        for key in ("same_field", "different_field", "gap", "top1", "mrr"):
            scalars[f"consistency/{key}"] = numbers[key]
        return out, scalars


# ----------------------------------------------------------------------------------------------- the run
def _run_paths(train_cfg) -> tuple[str, str, bool]:
    """(output URI of the run, local log directory, whether logs must be synced to the output)."""
    output_uri = storage.join(train_cfg.output_dir, train_cfg.name)
    if storage.is_s3(output_uri):
        base = os.environ.get("DINOCELL_LOCAL_RUN_DIR") or tempfile.mkdtemp(prefix="dinocell-run-")
        return output_uri, str(Path(base) / train_cfg.name), True
    return output_uri, str(storage.local_path(output_uri)), False


def _progress_enabled(train_cfg, rank: int) -> bool:
    if rank != 0 or train_cfg.progress is False:
        return False
    return train_cfg.progress is True or sys.stderr.isatty()


@dataclass
class _Window:
    """Loss sums on the device (no host sync per iteration) plus host timings since the last log line."""

    sums: torch.Tensor | None = None
    iters: int = 0
    skipped: int = 0
    data_wait_s: float = 0.0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, losses: torch.Tensor) -> None:
        self.sums = losses.clone() if self.sums is None else self.sums + losses
        self.iters += 1


class Trainer:
    def __init__(self, cfg, on_iteration: Callable[[int, dict], None] | None = None):
        setup_logging()
        validate_training_config(cfg)
        self.cfg = cfg
        self.on_iteration = on_iteration
        self.env = setup_distributed(cfg.train)
        env = self.env
        self.output_uri, self.run_dir, self.sync_logs = _run_paths(cfg.train)
        self.ckpt_root = storage.join(self.output_uri, "checkpoints")

        # model: the same init on every rank (DDP broadcasts rank 0's anyway)
        torch.manual_seed(cfg.train.seed)
        self.meta = SSLMetaArch(cfg.model, cfg.loss, precision=cfg.train.precision)
        if cfg.model.pretrained:
            report = self.meta.load_pretrained(cfg.model.pretrained)
            log.info("pretrained weights: %s", report.summary())
        else:
            log.warning("model.pretrained is empty: the backbone starts from RANDOM weights")
        self.meta.to(env.device)
        if env.distributed:
            self.meta.wrap_ddp(env.device)
        if cfg.model.compile:
            self.meta.compile_backbones()
        self.meta.train()
        self.optimizer = build_optimizer(self.meta.student_named_parameters(), self.meta.depth, cfg.optim, env.device)

        self.data = DataSource(cfg, env)
        ipe = cfg.optim.iters_per_epoch or self.data.iters_per_epoch()
        self.iters_per_epoch = ipe
        self.schedules = TrainingSchedules.from_config(cfg.optim, cfg.loss, ipe)
        self.end_iteration = cfg.train.max_iters or self.schedules.total_iters
        self.augment = MultiViewAugment(cfg.augment)
        self.grid = (cfg.augment.global_size // cfg.model.patch_size,) * 2

        # per-rank random streams: global RNGs (drop path, RoPE rescale), augmentation, masks
        torch.manual_seed(_stream_seed(cfg.train.seed, env.rank, 0))
        import random

        import numpy as np

        np.random.seed(_stream_seed(cfg.train.seed, env.rank, 0) % 2**32)
        random.seed(_stream_seed(cfg.train.seed, env.rank, 0))
        self.aug_gen = torch.Generator(device=env.device).manual_seed(_stream_seed(cfg.train.seed, env.rank, 1))
        self.mask_gen = torch.Generator().manual_seed(_stream_seed(cfg.train.seed, env.rank, 2))

        from dinocell.monitor.run_log import RunLogger
        from dinocell.train.checkpoint import CheckpointManager

        self.ckpt = CheckpointManager(self.ckpt_root, keep_last=cfg.train.keep_last,
                                      milestone_every=cfg.train.milestone_every, rank=env.rank)
        if self.sync_logs and env.rank == 0:
            self._fetch_remote_metrics()
        self.logger = RunLogger(self.run_dir, cfg.to_dict(), wandb_mode=cfg.train.wandb_mode,
                                wandb_project=cfg.train.wandb_project, run_name=cfg.train.name, rank=env.rank)
        self.iteration = 0
        self.skipped = 0
        self.last_checkpoint: str | None = None
        self.last_saved_iteration = -1
        self.resumed_from = self._resume()
        self.visualizer: Visualizer | None = None
        self._last_views = None  # the latest batch's crops and the latest gradient norms, for the log lines
        self._last_norms: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------ checkpoints
    def _rank_state(self) -> dict:
        from dinocell.train.checkpoint import capture_rng_state

        return {
            "rank": self.env.rank,
            "rng": capture_rng_state(),
            "augment_generator": self.aug_gen.get_state(),
            "mask_generator": self.mask_gen.get_state(),
            "data": self.data.state_dict(),
        }

    def save_checkpoint(self) -> str:
        """Write the full training state at the current iteration (every rank must call it)."""
        ranks = _all_gather_objects(self.env, self._rank_state())
        uri = self.ckpt.uri_for(self.iteration)
        if self.env.rank == 0:
            state = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "iteration": self.iteration,
                # official training-checkpoint layout (teacher / student with backbone.* dino_head.* ibot_head.*)
                "student": self.meta.student.state_dict(),
                "teacher": self.meta.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": None,  # bf16 needs no loss scaling
                "schedules": {"iteration": self.iteration, "iters_per_epoch": self.iters_per_epoch,
                              "total_iters": self.schedules.total_iters, "values": self.schedules.at(self.iteration)},
                "skipped_iterations": self.skipped,
                "world_size": self.env.world_size,
                "ranks": ranks,
                "config": self.cfg.to_dict(),
            }
            uri = self.ckpt.save(self.iteration, state)
            if self.sync_logs:
                self.logger.sync_to(self.output_uri)
        self.last_checkpoint = uri
        self.last_saved_iteration = self.iteration
        return uri

    def _resume(self) -> str | None:
        state = self.ckpt.load()  # the newest checkpoint that verifies (None: a fresh run)
        if state is None:
            return None
        if state.get("format") != CHECKPOINT_FORMAT:
            raise RuntimeError(f"{self.ckpt_root}: the latest checkpoint is not a {CHECKPOINT_FORMAT} checkpoint")
        self.meta.student.load_state_dict(state["student"])
        self.meta.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        uri = self.ckpt.uri_for(self.iteration)
        self.skipped = int(state.get("skipped_iterations", 0))
        saved = state["schedules"]
        if saved["iters_per_epoch"] != self.iters_per_epoch or saved["total_iters"] != self.schedules.total_iters:
            log.warning("resuming with different schedules: saved %d iterations/epoch, %d in all; now %d and %d",
                        saved["iters_per_epoch"], saved["total_iters"], self.iters_per_epoch, self.schedules.total_iters)
        ranks = state["ranks"]
        exact = len(ranks) == self.env.world_size
        if not exact:
            log.warning("checkpoint was written by %d ranks, this run has %d: RNG streams restart and data "
                        "restarts at the saved epoch (inexact resume)", len(ranks), self.env.world_size)
        mine = ranks[self.env.rank % len(ranks)]
        self.data.load_state_dict(mine["data"], exact=exact)
        if exact:
            from dinocell.train.checkpoint import restore_rng_state

            restore_rng_state(mine["rng"])
            self.aug_gen.set_state(mine["augment_generator"])
            self.mask_gen.set_state(mine["mask_generator"])
        self.last_checkpoint = uri
        self.last_saved_iteration = self.iteration
        log.info("resumed from %s at iteration %d", uri, self.iteration)
        return uri

    def _fetch_remote_metrics(self) -> None:
        """Resuming into an s3:// output from a new machine: continue the earlier metrics.jsonl, not a fresh one."""
        remote = storage.join(self.output_uri, "metrics.jsonl")
        local = Path(self.run_dir) / "metrics.jsonl"
        if not local.exists() and storage.exists(remote):
            local.parent.mkdir(parents=True, exist_ok=True)
            storage.download_file(remote, local)

    # ------------------------------------------------------------------------------------------ one step
    def _inputs(self, batch: dict) -> SSLInputs:
        images = batch["images"].to(self.env.device, non_blocking=True)
        views = self.augment(images, list(batch["channels"]), generator=self.aug_gen)
        lc = self.cfg.loss
        masks = collate_masks(views.global_crops.shape[0], self.grid, tuple(lc.mask_ratio_min_max),
                              lc.mask_probability, generator=self.mask_gen)
        self._last_views = views
        return SSLInputs(views.global_crops, views.local_crops, mask_batch_to(masks, self.env.device),
                         n_global_crops=views.n_global_crops)

    def _step(self, inputs: SSLInputs) -> tuple[torch.Tensor, dict, bool]:
        """(stacked losses [len(LOSS_KEYS)], schedule values, whether the update was applied)."""
        sched = self.schedules.at(self.iteration)
        apply_schedules(self.optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.meta.forward_backward(inputs, sched["teacher_temp"])
        norms = self.meta.clip_gradients(self.cfg.optim.clip_grad)
        stacked = torch.stack([losses[k] for k in LOSS_KEYS])
        bad = (~torch.isfinite(stacked).all() | ~torch.isfinite(norms).all()).to(torch.int32)
        if self.env.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank takes the same decision
        if bad.item():
            self._non_finite(stacked, norms)
            self.optimizer.zero_grad(set_to_none=True)
            return stacked, sched, False
        self.optimizer.step()
        self.meta.update_teacher(sched["momentum"])
        self._last_norms = norms
        return stacked, sched, True

    def _non_finite(self, stacked: torch.Tensor, norms: torch.Tensor) -> None:
        values = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOSS_KEYS, stacked.tolist()))
        parts = [k for k in PART_NAMES if k in self.meta.student]
        grad = ", ".join(f"{k}={v:.4g}" for k, v in zip(parts, norms.tolist()))
        where = f"non-finite loss/gradient at iteration {self.iteration + 1} ({values}; grad norms {grad})"
        good = self.last_checkpoint or "none (no checkpoint was written yet)"
        if self.cfg.train.nan_policy == "skip":
            self.skipped += 1
            log.warning("%s: update skipped (%d skipped so far, train.max_skips=%d)", where, self.skipped,
                        self.cfg.train.max_skips)
            if self.skipped <= self.cfg.train.max_skips:
                return
            msg = (f"{where}: {self.skipped} updates skipped, more than train.max_skips={self.cfg.train.max_skips}; "
                   f"training stopped. Last good checkpoint: {good}")
        else:
            msg = (f"{where}: training stopped (train.nan_policy=stop). Last good checkpoint: {good}. "
                   "Lower optim.lr, check the data, or set train.nan_policy=skip to drop such batches.")
        self.logger.log_scalars(self.iteration, {"nonfinite/iteration": self.iteration, "skipped": self.skipped})
        self.logger.close()
        raise NonFiniteLossError(msg)

    # ------------------------------------------------------------------------------------------ logging
    def _log(self, window: _Window, sched: dict) -> dict[str, float]:
        env = self.env
        sums = window.sums if window.sums is not None else torch.zeros(len(LOSS_KEYS), device=env.device)
        counts = torch.tensor([window.iters - window.skipped], dtype=torch.float64, device=env.device)
        packed = torch.cat([sums.double(), counts])
        if env.distributed:
            dist.all_reduce(packed)
        n = max(packed[-1].item(), 1.0)
        means = {k: v / n for k, v in zip(LOSS_KEYS, packed[:-1].tolist())}
        if env.rank != 0:
            return means
        elapsed = time.perf_counter() - window.t0
        fields = window.iters * self.data.batch_size * env.world_size
        values = {f"loss/{k}": v for k, v in means.items()}
        values.update({
            "lr": sched["lr"], "wd": sched["wd"], "momentum": sched["momentum"],
            "teacher_temp": sched["teacher_temp"], "last_layer_lr": sched["last_layer_lr"],
            "epoch": self.iteration / self.iters_per_epoch,
            "fields_per_s": fields / max(elapsed, 1e-9),
            "s_per_iter": elapsed / max(window.iters, 1),
            "data_wait_s_per_iter": window.data_wait_s / max(window.iters, 1),
            "skipped_total": self.skipped,
        })
        norms = self._last_norms
        if norms is not None:
            for k, v in zip([k for k in PART_NAMES if k in self.meta.student], norms.tolist()):
                values[f"grad_norm/{k}"] = v
        if env.device.type == "cuda":
            values["gpu_mem_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
        views = self._last_views
        if views is not None:
            values.update({f"augment/{k}": v for k, v in views.stats().items()})
        values.update(self.data.stats_scalars())
        self.logger.log_scalars(self.iteration, values)
        log.info("it %d/%d  loss %.4f (dino %.4f ibot %.4f koleo %.4f)  lr %.3g  %.1f fields/s  data wait %.3fs/it%s",
                 self.iteration, self.end_iteration, means["total"], means["dino"], means["ibot"], means["koleo"],
                 sched["lr"], values["fields_per_s"], values["data_wait_s_per_iter"], _data_note(values))
        return means

    def _visualise(self, batch: dict) -> None:
        if self.env.rank != 0:
            return
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        try:
            # the diagnostics must not move the training RNG streams (exact resume, reproducibility)
            with torch.random.fork_rng(devices=devices, device_type=self.env.device.type):
                if self.visualizer is None:
                    self.visualizer = Visualizer.from_config(self.cfg, batch, self.env.device)
                images, scalars = self.visualizer.images(self.meta.teacher.backbone)
            for name, rgb in images.items():
                self.logger.log_image(self.iteration, name, rgb)
            if scalars:
                self.logger.log_scalars(self.iteration, scalars)
        except Exception as e:  # noqa: BLE001 - never stop a long run for a diagnostic image
            log.warning("visualisation at iteration %d failed: %s: %s", self.iteration, type(e).__name__, e)

    # ------------------------------------------------------------------------------------------ the loop
    def run(self) -> PretrainResult:
        cfg, env = self.cfg, self.env
        tcfg = cfg.train
        if self.iteration >= self.end_iteration:
            log.info("nothing to do: iteration %d >= end %d", self.iteration, self.end_iteration)
        log.info("training %s from iteration %d to %d (%d iterations/epoch, %d ranks, device %s, %s)",
                 self.output_uri, self.iteration, self.end_iteration, self.iters_per_epoch, env.world_size,
                 env.device, tcfg.precision)
        batches = self.data.batches(self.iteration)
        progress = None
        if _progress_enabled(tcfg, env.rank):
            from tqdm import tqdm

            progress = tqdm(total=self.end_iteration, initial=self.iteration, dynamic_ncols=True, desc="pretrain")
        window = _Window()
        final_losses: dict[str, float] = {}
        sched = self.schedules.at(self.iteration)
        try:
            while self.iteration < self.end_iteration:
                t_wait = time.perf_counter()
                batch = next(batches)
                window.data_wait_s += time.perf_counter() - t_wait
                self.data.consumed(batch)
                inputs = self._inputs(batch)
                stacked, sched, applied = self._step(inputs)
                if applied:
                    window.add(stacked.detach())
                else:
                    window.iters += 1
                    window.skipped += 1
                self.iteration += 1
                if progress is not None:
                    progress.update(1)
                last = self.iteration == self.end_iteration
                if self.iteration % tcfg.log_every == 0 or last:
                    final_losses = self._log(window, sched)
                    if progress is not None:
                        progress.set_postfix(loss=f"{final_losses['total']:.3f}")
                    window = _Window()
                if tcfg.vis_every and self.iteration % tcfg.vis_every == 0:
                    self._visualise(batch)
                if tcfg.ckpt_every and self.iteration % tcfg.ckpt_every == 0 and not last:
                    self.save_checkpoint()
                if self.on_iteration is not None:
                    self.on_iteration(self.iteration, {"rank": env.rank, "world_size": env.world_size,
                                                       "field_ids": list(batch["field_ids"]), "applied": applied,
                                                       "losses": stacked, "trainer": self})
            if self.last_saved_iteration != self.iteration or self.last_checkpoint is None:
                self.save_checkpoint()
        finally:
            if progress is not None:
                progress.close()
        if self.sync_logs and env.rank == 0:
            self.logger.sync_to(self.output_uri)
        return PretrainResult(
            final_checkpoint=self.last_checkpoint,
            output_uri=self.output_uri,
            run_dir=self.run_dir,
            iterations=self.iteration,
            final_losses=final_losses,
            skipped_iterations=self.skipped,
            resumed_from=self.resumed_from,
        )

    def close(self) -> None:
        self.logger.close()
        if self.env.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def pretrain(cfg, on_iteration: Callable[[int, dict], None] | None = None) -> PretrainResult:
    """Run (or resume) SSL pretraining as configured; returns where the final checkpoint and logs are.

    `on_iteration(iteration, info)` is called on every rank at the end of each iteration, after its logging and
    checkpoint (info: rank, world_size, field_ids, applied, losses, trainer): a hook for monitoring and tests; an
    exception it raises ends the run like a crash (no final checkpoint).
    """
    trainer = Trainer(cfg, on_iteration=on_iteration)
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = ["DataSource", "NonFiniteLossError", "PretrainResult", "Trainer", "WorkerOrderedBatches", "pretrain"]
