"""The training batches of one rank: `TrainingBatches` (the field stream, its DataLoader, resume state and epoch
length) and `WorkerOrderedBatches` (the fixed worker order that makes a multi-worker loader resume exactly).

Two data modes (loader.mode): "shards" reads the shard set written by `dinocell shard` (dinocell.data.shard_reader,
the default: exact resume from the per-worker stream positions); "raw" reads and preprocesses fields of the manifest
on demand (dinocell.data.raw_stream: resumes at the start of its current data epoch, the only inexact case). Every
rank reads a disjoint part of the data (both streams partition by rank). The streams are endless and keep their own
epochs; the trainer's epoch is `optim.iters_per_epoch` iterations (or one pass over this rank's share when 0).

iBOT masks come with the batch: the DataLoader's collate (`CollateWithMasks`, run in the worker that makes the
batch, as DINOv3's collate does) adds `batch["masks"]`, the MaskBatch of the batch's global crops, and
`batch["masks_iteration"]`, the iteration they are for, seeded by (run seed, rank, iteration) (dinocell.train.seeds).
A worker knows that iteration without talking to anybody: after a (re)start at iteration s with W workers, the
batches go to iterations in a fixed worker order (`WorkerOrderedBatches` in shard mode: iteration i takes worker
i % W's; the DataLoader's own round robin in raw mode: worker w's k-th batch is the (s + w + k * W)-th), so worker w's
k-th batch is for iteration first(w) + k * W. The trainer checks `masks_iteration` against its iteration.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence

import torch

from dinocell.log import get_logger
from dinocell.loss.masking import MaskBatch, MaskingGenerator, collate_masks
from dinocell.train.distributed import DistEnv
from dinocell.train.seeds import LOADER, mask_rng, stream_seed

__all__ = ["CollateWithMasks", "TrainingBatches", "WorkerOrderedBatches"]

log = get_logger(__name__)


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


class CollateWithMasks:
    """The DataLoader's collate_fn: the stream's batch plus the iBOT masks of its global crops (module docstring).

    Each DataLoader worker holds its own copy (taken when the workers start) and counts the batches it makes; call
    `start(iteration, worker_ordered)` before the DataLoader starts its workers, once per DataLoader.
    """

    def __init__(self, collate: Callable[[Sequence[dict]], dict], n_global_images: int, grid: tuple[int, int],
                 mask_ratio_range: tuple[float, float], mask_probability: float, seed: int, rank: int,
                 num_workers: int):
        self.collate = collate
        self.n_global_images = int(n_global_images)
        self.grid = tuple(grid)
        self.mask_ratio_range = tuple(mask_ratio_range)
        self.mask_probability = float(mask_probability)
        self.seed, self.rank = int(seed), int(rank)
        self.num_workers = max(1, int(num_workers))
        self.masking_generator = MaskingGenerator(self.grid)
        self.next_iteration: list[int] | None = None  # per worker: the iteration its next batch is for

    def start(self, start_iteration: int, worker_ordered: bool) -> None:
        """Batches from now on go to iterations start_iteration, start_iteration + 1, ... in the workers' fixed order:
        worker_ordered (WorkerOrderedBatches): iteration i takes worker i % W's next batch; else the DataLoader's
        round robin, which restarts at worker 0."""
        w_count, s = self.num_workers, int(start_iteration)
        self.next_iteration = [s + ((w - s) % w_count if worker_ordered else w) for w in range(w_count)]

    def masks_for(self, iteration: int) -> MaskBatch:
        """The iBOT masks of `iteration` (the same wherever and whenever they are built)."""
        return collate_masks(self.n_global_images, self.grid, self.mask_ratio_range, self.mask_probability,
                             generator=mask_rng(self.seed, self.rank, iteration),
                             masking_generator=self.masking_generator)

    def __call__(self, samples: Sequence[dict]) -> dict:
        if self.next_iteration is None:
            raise RuntimeError("CollateWithMasks: start(iteration, worker_ordered) was not called before the "
                               "DataLoader started")
        from torch.utils.data import get_worker_info

        batch = self.collate(samples)
        info = get_worker_info()
        worker = info.id if info is not None else 0
        iteration = self.next_iteration[worker]
        self.next_iteration[worker] += self.num_workers
        batch["masks"] = self.masks_for(iteration)
        batch["masks_iteration"] = iteration
        return batch


class TrainingBatches:
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
        from dinocell.data.multiview import N_GLOBAL_CROPS

        self.collate = CollateWithMasks(
            collate, N_GLOBAL_CROPS * self.batch_size, (cfg.augment.global_size // cfg.model.patch_size,) * 2,
            tuple(cfg.loss.mask_ratio_min_max), cfg.loss.mask_probability, seed=cfg.train.seed, rank=env.rank,
            num_workers=self.num_workers,
        )
        self.started = False
        loader_gen = torch.Generator().manual_seed(stream_seed(cfg.train.seed, env.rank, LOADER))
        self.loader = DataLoader(
            self.stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate,
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
        """The batches of iterations start_iteration, start_iteration + 1, ... (starts the DataLoader: once)."""
        if self.started:
            raise RuntimeError("TrainingBatches.batches: the DataLoader was already started (the workers' mask "
                               "counters would be off); make a new TrainingBatches")
        self.started = True
        worker_ordered = self.mode == "shards" and self.num_workers > 1
        self.collate.start(start_iteration, worker_ordered)
        it = iter(self.loader)
        if worker_ordered:
            return WorkerOrderedBatches(it, self.num_workers, start_iteration)
        return it

    @staticmethod
    def masks(batch: dict, iteration: int) -> MaskBatch:
        """The iBOT masks that came with `batch`, checked to be those of `iteration`."""
        if batch["masks_iteration"] != iteration:
            raise RuntimeError(f"the batch of iteration {iteration} carries the iBOT masks of iteration "
                               f"{batch['masks_iteration']}: batches and masks are out of step")
        return batch["masks"]

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
