"""Raw streaming: read fields on demand from object storage, preprocess them in the DataLoader workers.

The other data mode (pre-built shards) is the default for training; this one needs no preparation step and is meant
for small datasets, quick experiments and debugging. Both yield the same per-field sample (fields.field_to_sample).

Order and partitioning
- The fields of the split are dealt once, by a permutation seeded with `seed` alone, to the world_size x num_workers
  (rank, worker) pairs: every field belongs to exactly one worker of one rank, and to the same one every epoch. Keeping
  the assignment fixed is what gives a per-worker cache a chance: a field can only hit in the cache of the worker that
  read it before.
- Each epoch every worker reads its share in a fresh random order seeded by (seed, epoch, rank, worker). The DataLoader
  interleaves the workers, so batches mix fields from all shares. Shares differ in size by at most one field, so in
  finite mode ranks may see one field more or less; training uses `iter_epochs=True` (an endless stream) where that
  does not matter.
- `set_epoch(e)` writes the epoch to shared memory, so persistent workers see it at their next `iter()`.

Caching: each worker process lazily creates its own FieldLoader with a byte-bounded LRUCache of preprocessed channels
(`loader_cfg.cache_bytes` per worker, so RAM use is num_workers x cache_bytes). The cache only survives epochs inside
one process: use `persistent_workers=True` (or `iter_epochs=True`, or num_workers=0). Expect a hit rate of about
c + (1 - c) ln(1 - c) for a worker whose cache holds a fraction c of its share (dinocell.data.cache explains why).

Honest counters: every worker adds its counters (fields yielded, fields skipped, cache hits/misses/evictions/rejected)
and its cache's current size to its own slot of a shared-memory array after every field, and writes the first
`MAX_REASONS_PER_WORKER` skip reasons to a shared buffer. `stats()` in the main process sums the slots, so it is exact
at any time, for any num_workers (0 included), also after the workers have exited. It counts what the workers have
loaded, which runs ahead of what the trainer consumed by at most the DataLoader's prefetch (prefetch_factor x workers).
Failed fields are skipped, never silently: counted, their reasons kept (capped) and logged (capped per worker).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from ctypes import c_int64
from dataclasses import dataclass
from dataclasses import field as dc_field
from multiprocessing.sharedctypes import RawArray

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from dinocell import storage
from dinocell.config import LoaderConfig, PreprocessConfig
from dinocell.data.cache import LRUCache
from dinocell.data.epoch import SharedEpoch
from dinocell.data.fields import FieldLoader, FieldLoadError, field_to_sample
from dinocell.jump.manifest import Manifest

__all__ = ["MAX_REASONS_PER_WORKER", "RawFieldStream"]

log = logging.getLogger(__name__)

# Counters in each worker's shared slot. The first group is added to (deltas), the second overwritten (gauges).
_ADDITIVE = ("fields", "skipped", "hits", "misses", "evictions", "rejected")
_GAUGES = ("cache_bytes", "cache_items", "epoch", "active", "reasons_stored")
_COUNTERS = _ADDITIVE + _GAUGES
_IDX = {name: i for i, name in enumerate(_COUNTERS)}
MAX_REASONS_PER_WORKER = 8
_REASON_BYTES = 400
_LOGGED_SKIPS_PER_WORKER = 10


@dataclass
class _ProcState:
    """Per-process state, created lazily inside each DataLoader worker (never pickled)."""

    pid: int
    loader: FieldLoader
    published: dict = dc_field(default_factory=dict)  # cache counters already added to the shared slot
    logged_skips: int = 0


class RawFieldStream(SharedEpoch, IterableDataset):
    """Fields of one manifest split, read from storage on demand and preprocessed in the workers.

    Yields dicts {"image": torch.uint8 [C, H, W], "channels": tuple, "channel_ids": tuple, "field_id": str,
    "plate": str}; batch them with `dinocell.data.fields.collate_fields`.
    `loader_cfg.num_workers` sizes the shared counter slots: a DataLoader with more workers than that is refused.
    """

    def __init__(
        self,
        manifest: Manifest,
        loader_cfg: LoaderConfig,
        preprocess_cfg: PreprocessConfig,
        channels: Sequence[str],
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        iter_epochs: bool = False,
    ):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.manifest = manifest.split(split).select_channels(list(channels))
        if len(self.manifest) == 0:
            raise ValueError(f"the manifest has no fields in split {split!r}")
        self.split = split
        self.channels = tuple(channels)
        self.loader_cfg = loader_cfg
        self.preprocess_cfg = preprocess_cfg
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.iter_epochs = iter_epochs
        # Fail now, in the main process, on a bad channel list or preprocessing config (not in every worker).
        FieldLoader(preprocess_cfg, self.channels, loader_cfg.fetch_workers)
        self._n_slots = max(1, loader_cfg.num_workers)
        self._counters = RawArray(c_int64, self._n_slots * len(_COUNTERS))
        self._reasons = RawArray("c", self._n_slots * MAX_REASONS_PER_WORKER * _REASON_BYTES)
        self._init_epoch()
        # Spawned workers do not inherit storage.configure(); they re-apply this one.
        self._storage_cfg = storage.get_config()
        self._proc: _ProcState | None = None
        # The fixed deal of fields to (rank, worker) shares.
        self._deal = np.random.default_rng(self.seed).permutation(len(self.manifest))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_proc"] = None  # loaders, caches and locks stay in their process
        return state

    # ------------------------------------------------------------------ order (set_epoch / epoch: SharedEpoch)
    def epoch_order(self, epoch: int, worker_id: int = 0, num_workers: int = 1) -> np.ndarray:
        """Manifest row indices (within the split) that this rank's worker reads in `epoch`, in reading order."""
        total = self.world_size * num_workers
        share_id = self.rank * num_workers + worker_id
        share = self._deal[share_id::total]
        return np.random.default_rng((self.seed, int(epoch), self.rank, worker_id)).permutation(share)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers > self._n_slots:
            raise RuntimeError(
                f"RawFieldStream was built for loader.num_workers={self.loader_cfg.num_workers} but the DataLoader "
                f"runs {num_workers} workers: build it with the same loader config as the DataLoader"
            )
        proc = self._process_state()
        epoch = self.epoch
        while True:
            self._set(worker_id, "epoch", epoch)
            self._set(worker_id, "active", 1)
            for idx in self.epoch_order(epoch, worker_id, num_workers):
                record = self.manifest.record(int(idx))
                try:
                    field = proc.loader.load(record)
                except FieldLoadError as e:
                    self._skip(proc, worker_id, str(e))
                    continue
                self._add(worker_id, "fields", 1)
                self._publish_cache(proc, worker_id)
                yield field_to_sample(field)
            if not self.iter_epochs:
                return
            epoch += 1

    def _process_state(self) -> _ProcState:
        if self._proc is not None and self._proc.pid == os.getpid():
            return self._proc
        if storage.get_config() != self._storage_cfg:
            storage.configure(self._storage_cfg)
        # OpenCV is already single-threaded (dinocell.data.preprocess sets it at import, before any fork: calling
        # cv2.setNumThreads here, in a forked worker, can hang) and DataLoader workers run torch with one thread.
        cache = LRUCache(self.loader_cfg.cache_bytes)
        loader = FieldLoader(self.preprocess_cfg, self.channels, self.loader_cfg.fetch_workers, cache)
        self._proc = _ProcState(os.getpid(), loader)
        return self._proc

    # ------------------------------------------------------------------ shared counters
    def _slot(self, worker_id: int) -> int:
        return worker_id * len(_COUNTERS)

    def _add(self, worker_id: int, name: str, n: int) -> None:
        self._counters[self._slot(worker_id) + _IDX[name]] += n

    def _set(self, worker_id: int, name: str, value: int) -> None:
        self._counters[self._slot(worker_id) + _IDX[name]] = value

    def _get(self, worker_id: int, name: str) -> int:
        return int(self._counters[self._slot(worker_id) + _IDX[name]])

    def _publish_cache(self, proc: _ProcState, worker_id: int) -> None:
        st = proc.loader.cache.stats()
        for name in ("hits", "misses", "evictions", "rejected"):
            delta = st[name] - proc.published.get(name, 0)
            if delta:
                self._add(worker_id, name, delta)
            proc.published[name] = st[name]
        self._set(worker_id, "cache_bytes", st["bytes"])
        self._set(worker_id, "cache_items", st["items"])

    def _skip(self, proc: _ProcState, worker_id: int, reason: str) -> None:
        self._add(worker_id, "skipped", 1)
        self._publish_cache(proc, worker_id)
        stored = self._get(worker_id, "reasons_stored")
        if stored < MAX_REASONS_PER_WORKER:
            raw = reason.encode("utf-8")[: _REASON_BYTES - 1]
            start = (worker_id * MAX_REASONS_PER_WORKER + stored) * _REASON_BYTES
            self._reasons[start : start + _REASON_BYTES] = raw.ljust(_REASON_BYTES, b"\0")
            self._set(worker_id, "reasons_stored", stored + 1)  # after the bytes: a reader never sees half a reason
        if proc.logged_skips < _LOGGED_SKIPS_PER_WORKER:
            proc.logged_skips += 1
            more = (
                " (further skips of this worker are counted, not logged)"
                if proc.logged_skips == _LOGGED_SKIPS_PER_WORKER
                else ""
            )
            log.warning("rank %d worker %d skipped a field: %s%s", self.rank, worker_id, reason, more)

    def stats(self) -> dict:
        """Totals over this rank's workers (exact as of the last field each worker finished) plus per-worker rows."""
        per_worker = []
        reasons: list[str] = []
        for w in range(self._n_slots):
            row = {name: self._get(w, name) for name in _COUNTERS}
            if not row["active"]:
                continue
            row["worker"] = w
            per_worker.append(row)
            for r in range(row["reasons_stored"]):
                start = (w * MAX_REASONS_PER_WORKER + r) * _REASON_BYTES
                reasons.append(
                    bytes(self._reasons[start : start + _REASON_BYTES]).rstrip(b"\0").decode("utf-8", "replace")
                )
        totals = {name: sum(row[name] for row in per_worker) for name in _ADDITIVE + ("cache_bytes", "cache_items")}
        lookups = totals["hits"] + totals["misses"]
        totals["hit_rate"] = totals["hits"] / lookups if lookups else 0.0
        totals["skip_reasons"] = reasons  # at most MAX_REASONS_PER_WORKER per worker; `skipped` is the full count
        totals["rank"] = self.rank
        totals["epoch"] = max((row["epoch"] for row in per_worker), default=self.epoch)
        totals["workers"] = per_worker
        return totals
