"""The SSL training loop of one rank: `Trainer` (set up, resume, iterate, log, checkpoint).

One iteration on each rank: next batch of uint8 fields with its iBOT masks (both made in the DataLoader workers:
dinocell.train.batches) -> device -> multi-view crops (augmentation on the device, seeded generator) -> scheduled
lr / wd / momentum / teacher temperature / head warm-up -> forward-backward (dinocell.train.ssl_model) -> per-part gradient clipping -> finite check (all ranks agree) -> AdamW
step -> EMA teacher update (dinocell.train.ema). An epoch is `optim.iters_per_epoch` iterations (DINOv3's
convention); the data streams are endless and keep their own epochs.

Distributed (dinocell.train.distributed): every rank reads a disjoint part of the data; only rank 0 logs and writes
checkpoints, but a checkpoint holds the RNG and data positions of every rank (gathered to rank 0).

Resume: a run restarted with the same output_dir / run_name resumes from its `latest` checkpoint (the checkpoint
manager of dinocell.train.checkpoint) automatically and continues exactly: model, teacher, optimizer, iteration (the
schedules are closed-form in it), every rank's RNG states (global torch / CUDA / numpy / python, the augmentation
generator: dinocell.train.seeds; the iBOT masks are a function of the iteration) and data position
(ShardStream.state_dict; raw mode restarts its current data epoch, which is the only inexact case). Batches are consumed in a fixed worker order (iteration i takes worker
i % num_workers's next batch), so a multi-worker shard loader also resumes bit-exactly.

Head warm-up (optim.head_warmup_iters, pretrained init only): before that iteration the backbone's lr is multiplied
by optim.head_warmup_backbone_lr_mult; at 0 the student backbone gets no gradient and the teacher backbone no EMA
step, so both stay bit-exact while the heads learn. The iteration alone decides, so resuming mid-warm-up is exact.

Non-finite loss or gradient: nan_policy "stop" raises NonFiniteLossError naming the iteration, the loss terms and
the last good checkpoint (never overwritten by a bad state); "skip" drops that update (no step, no EMA), counts it,
and stops once more than max_skips updates were dropped.

Preemption (dinocell.train.preemption): on SIGTERM every rank stops at the same iteration, writes the full checkpoint
of that iteration and raises Preempted (SystemExit 143); the restarted job resumes from it exactly.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dinocell import storage
from dinocell.config.training import effective_head_warmup_iters, validate_training_config
from dinocell.data.multiview import MultiViewAugment
from dinocell.log import get_logger, setup_logging
from dinocell.model.patch_adapt import InputNorm
from dinocell.progress import Progress
from dinocell.train.batches import TrainingBatches
from dinocell.train.distributed import all_gather_objects, setup_distributed
from dinocell.train.optim import apply_schedules, build_optimizer
from dinocell.train.preemption import Preempted, SigtermFlag
from dinocell.train.schedules import TrainingSchedules
from dinocell.train.seeds import seed_rank_streams
from dinocell.train.ssl_model import LOSS_KEYS, SSLInputs, SSLMetaArch, mask_batch_to
from dinocell.train.visualize import Visualizer

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "NonFiniteLossError", "PretrainResult", "Trainer"]

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


def _run_paths(train_cfg) -> tuple[str, str, bool]:
    """(output URI of the run, local log directory, whether logs must be synced to the output)."""
    output_uri = storage.join(train_cfg.output_dir, train_cfg.name)
    if storage.is_s3(output_uri):
        base = os.environ.get("DINOCELL_LOCAL_RUN_DIR") or tempfile.mkdtemp(prefix="dinocell-run-")
        return output_uri, str(Path(base) / train_cfg.name), True
    return output_uri, str(storage.local_path(output_uri)), False


def _data_note(values: dict) -> str:
    """The data counters worth a glance in the log line: skipped inputs always, the raw-mode cache hit rate."""
    parts = []
    if "data/hit_rate" in values:
        parts.append(f"cache hit rate {values['data/hit_rate']:.2f}")
    skipped = values.get("data/skipped", 0) + values.get("data/shards_failed", 0)
    if skipped:
        parts.append(f"{int(skipped)} inputs skipped (see warnings)")
    return ("  " + ", ".join(parts)) if parts else ""


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
    """One rank's pretraining run: built from the config (model, optimizer, data, schedules, logger), resumed from
    the run's latest checkpoint when there is one; `run()` iterates to the end and writes the final checkpoint."""

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
        if cfg.model.starts_pretrained:  # validate_training_config: init=pretrained has model.pretrained set
            # the RGB kernel is folded for the grey crops exactly as this run normalises them
            norm = InputNorm((cfg.augment.norm_mean,), (cfg.augment.norm_std,))
            report = self.meta.load_pretrained(cfg.model.pretrained, input_norm=norm)
            log.info("pretrained weights: %s", report.summary())
        elif cfg.model.init == "random":
            log.info("model.init=random: the backbone starts from random weights, as configured")
        else:
            log.warning("model.pretrained is empty: the backbone starts from RANDOM weights (set model.pretrained, "
                        "or model.init=random to say that this is intended)")
        self.meta.to(env.device)
        if env.distributed:
            self.meta.wrap_ddp(env.device)
        if cfg.model.compile:
            self.meta.compile_backbones()
        self.meta.train()
        self.optimizer = build_optimizer(self.meta.student_named_parameters(), self.meta.depth, cfg.optim, env.device)

        self.data = TrainingBatches(cfg, env)
        ipe = cfg.optim.iters_per_epoch or self.data.iters_per_epoch()
        self.iters_per_epoch = ipe
        head_warmup = effective_head_warmup_iters(cfg)
        self.schedules = TrainingSchedules.from_config(cfg.optim, cfg.loss, ipe, head_warmup_iters=head_warmup)
        if head_warmup:
            mult = cfg.optim.head_warmup_backbone_lr_mult
            log.info("head warm-up: iterations 0-%d train the heads with the backbone's lr x %g%s", head_warmup - 1,
                     mult, " (frozen: student and teacher backbones stay put)" if mult == 0 else "")
        elif cfg.optim.head_warmup_iters:
            log.info("optim.head_warmup_iters=%d not applied: the backbone starts from random weights",
                     cfg.optim.head_warmup_iters)
        self.end_iteration = cfg.train.max_iters or self.schedules.total_iters
        self.augment = MultiViewAugment(cfg.augment)

        # per-rank random streams: global RNGs (drop path, RoPE rescale), augmentation (masks: with the batches)
        self.aug_gen = seed_rank_streams(cfg.train.seed, env.rank, env.device)

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
        self.sigterm = SigtermFlag()  # installed by run() around the loop
        self.stop_agreed = False  # some rank got SIGTERM (all-reduced with the finite check): stop after this iteration

    # ------------------------------------------------------------------------------------------ checkpoints
    def _rank_state(self) -> dict:
        from dinocell.train.checkpoint import capture_rng_state

        return {
            "rank": self.env.rank,
            "rng": capture_rng_state(),
            "augment_generator": self.aug_gen.get_state(),
            "data": self.data.state_dict(),
        }

    def save_checkpoint(self) -> str:
        """Write the full training state at the current iteration (every rank must call it)."""
        ranks = all_gather_objects(self.env, self._rank_state())
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
        views = self.augment(images, list(batch["channels"]), generator=self.aug_gen, iteration=self.iteration)
        masks = self.data.masks(batch, self.iteration)  # built with the batch, in the DataLoader worker
        self._last_views = views
        return SSLInputs(views.global_crops, views.local_crops, mask_batch_to(masks, self.env.device),
                         n_global_crops=views.n_global_crops)

    def _step(self, inputs: SSLInputs) -> tuple[torch.Tensor, dict, bool]:
        """(stacked losses [len(LOSS_KEYS)], schedule values, whether the update was applied)."""
        sched = self.schedules.at(self.iteration)
        apply_schedules(self.optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"], sched["backbone_lr_mult"])
        train_backbone = sched["backbone_lr_mult"] > 0  # 0: head warm-up with a frozen backbone
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.meta.forward_backward(inputs, sched["teacher_temp"], train_backbone=train_backbone)
        norms = self.meta.clip_gradients(self.cfg.optim.clip_grad)
        stacked = torch.stack([losses[k] for k in LOSS_KEYS])
        bad = (~torch.isfinite(stacked).all() | ~torch.isfinite(norms).all()).to(torch.int32)
        # the SIGTERM flag rides on the same all-reduce (no extra collective or sync): every rank stops together
        flags = torch.stack([bad, torch.tensor(int(self.sigterm.requested), dtype=torch.int32, device=bad.device)])
        if self.env.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank takes the same decisions
        bad, stop = flags.tolist()
        self.stop_agreed = self.stop_agreed or bool(stop)
        if bad:
            self._non_finite(stacked, norms)
            self.optimizer.zero_grad(set_to_none=True)
            return stacked, sched, False
        self.optimizer.step()
        self.meta.update_teacher(sched["momentum"], backbone=train_backbone)
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
            "backbone_lr_mult": sched["backbone_lr_mult"],
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
        progress = Progress("pretrain", total=self.end_iteration, initial=self.iteration, unit="it",
                            mode=tcfg.progress if env.rank == 0 else False)
        window = _Window()
        final_losses: dict[str, float] = {}
        sched = self.schedules.at(self.iteration)
        self.sigterm.install()  # SIGTERM (preemption) -> checkpoint and exit at the end of an iteration
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
                                                       "losses": stacked, "masks": batch["masks"], "trainer": self})
                if self.stop_agreed and not last:
                    self._preempted()
            if self.last_saved_iteration != self.iteration or self.last_checkpoint is None:
                self.save_checkpoint()
            if self.stop_agreed or self.sigterm.requested:
                log.info("SIGTERM during the last iteration: training is complete, not restarting")
        finally:
            self.sigterm.restore()
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

    def _preempted(self) -> None:
        """Some rank got SIGTERM: checkpoint this iteration (all ranks, like a periodic one) and exit for a restart."""
        if self.last_saved_iteration != self.iteration:
            self.save_checkpoint()
        log.info("SIGTERM: checkpointed iteration %d, exiting for restart", self.iteration)
        raise Preempted(self.iteration, self.last_checkpoint)

    def close(self, completed: bool = False) -> None:
        """Close the logs and leave the process group; `completed`: every rank finished run() (a crash skips the
        barrier: its peers may never reach it)."""
        self.logger.close()
        if self.env.initialized_here and dist.is_initialized():
            if completed:
                dist.barrier()  # no rank tears down its connections while a peer still talks to it
            # The DDP reducers hold the group: destroyed at interpreter exit instead, gloo can abort the process
            # ("terminate called without an active exception", seen once in CI on a passing 2-rank run).
            self.meta.release_wrappers()
            gc.collect()
            dist.destroy_process_group()
