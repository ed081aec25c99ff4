"""Streaming reader of the shard sets written by `dinocell shard` (dinocell.data.shards): `ShardStream`.

What one rank sees. Per epoch the shard list is permuted with a seed shared by every rank, then dealt to the
`world_size * num_workers` consumers (consumer = rank * num_workers + DataLoader worker id):

- at least as many shards as consumers: consumer c reads shards perm[c], perm[c + N], ... (N consumers). Consumers
  differ by at most one shard per epoch, so ranks may differ by up to `num_workers` shards of fields in an epoch:
  in infinite mode (the training default) nobody waits on anybody, each consumer simply starts its next epoch;
  in finite mode the caller must cope with uneven per-rank lengths (e.g. stop at the shortest rank);
- fewer shards than consumers (small data sets): the consumers share shards: the k consumers dealt the same shard
  read all of it and keep the fields whose index i in the shard satisfies i % k == j (j = the consumer's slot). Every
  consumer gets fields as long as each shard holds at least ceil(N / shards) fields (checked, with a clear error).
Either way every field of the index is read by exactly one consumer per epoch.

Shuffling. Each consumer pools the fields of consecutive shards until the pool holds at least
`loader.shuffle_buffer` fields (a "group": whole shards, so at least one shard), permutes the pool with a seeded RNG
(seed, epoch, consumer, group) and yields it, then moves to the next group. Because the writer already places
fields in a pseudo-random order over the whole data set (each shard is a random sample of it, not one plate) and the
shard order is re-drawn every epoch, a group is a random sample too; the group permutation removes the remaining
in-shard order. The payoff of groups over a sliding reservoir buffer is exact, cheap resume (below).

Resume. The position of a consumer is (epoch, group, offset within the group's permutation). Everything before it
is re-derived, not re-read: earlier groups are skipped from the index counts alone, and only the current group's
shards are read again (about `shuffle_buffer` fields) and re-permuted identically, so a resumed run yields exactly the
fields the interrupted run had not delivered, in the same order (as long as the shard set is unchanged). With a
multi-process DataLoader the positions live in the worker processes, so every sample carries its position
(`sample["stream_pos"]`): batch with `ShardStream.collate` (collate_fields + the positions) and call
`stream.observe(batch)` for each batch the training loop consumes; `state_dict()` then holds, per worker, the
position after the last consumed field (prefetched but unconsumed batches are simply produced again after a resume).
Iterating the stream in the current process needs no `observe`. The state is per rank: save one per rank, and load
it before the DataLoader starts its workers. A new iteration continues from the current position (it does not replay
the epoch); in finite mode call `set_epoch(e)` before each epoch, as with DistributedSampler (the epoch lives in
shared memory, so persistent workers see it).

Reading. A shard is streamed from storage (local file or S3 GET body) member by member; each field's bytes are read
(`readinto`) straight into their own uninitialised numpy buffer, which becomes the tensor (`torch.from_numpy`: no
decode, no copy after the read). The shard's sha256 is computed on the fly (verify="sha256", the default) or only its
size and structure are checked (verify="size": about 1.3 ms less CPU per 1.5 MB field, see bench/bench_data.py;
a truncated or cut shard is still caught, a flipped byte inside a payload is not): fields of a shard are released only
after the whole shard checked out, so a truncated tar or a hash mismatch drops that shard as a unit, with a warning,
counted in `stats()`; it is never fatal in infinite mode unless a whole epoch of a consumer produced nothing. The
next shard is fetched in a background thread while the current group is consumed.

Memory per consumer: one group (shuffle_buffer fields, rounded up to whole shards) plus one prefetched shard. With the
defaults (256 MB shards of ~175 fields of 5 x 540 x 540, shuffle_buffer 512) that is 4 shards, about 1 GB per
DataLoader worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from ctypes import c_int64
from multiprocessing.sharedctypes import RawArray
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dinocell import storage
from dinocell.config import LoaderConfig
from dinocell.data.epoch import SharedEpoch
from dinocell.data.fields import channel_ids_of, collate_fields
from dinocell.data.shard_format import ShardIndex, ShardInfo
from dinocell.data.shard_tar import CorruptShardError, iter_tar, open_stream, read_shard

log = logging.getLogger(__name__)

__all__ = ["STATE_FORMAT", "CorruptShardError", "ShardStream", "iter_tar", "open_stream", "read_shard"]

STATE_FORMAT = "dinocell-shardstream"
_STATE_VERSION = 1
# Per-worker counters in shared memory (summed by stats() in the main process, whatever num_workers is).
_COUNTERS = ("fields_yielded", "shards_read", "shards_failed", "bytes_read", "read_us")
_IDX = {name: i for i, name in enumerate(_COUNTERS)}


# --------------------------------------------------------------------------- the stream


def _seed_words(*parts: Any) -> list[int]:
    return [int(p) & 0xFFFFFFFF for p in parts]


class ShardStream(SharedEpoch, IterableDataset):
    """Per-field samples from a shard index for one rank; see the module docstring for the policies.

    Yields {"image": torch.uint8 [C,H,W], "channels": tuple, "channel_ids": tuple, "field_id": str, "plate": str,
    "stream_pos": {...}} (the sample of dinocell.data.fields plus the stream position used for resume).
    `seed` and `loader_cfg.seed` together seed every shuffle; both must be the same on every rank.
    """

    def __init__(
        self,
        index_uri: str | ShardIndex,
        loader_cfg: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        infinite: bool = True,
        verify: str = "sha256",
        read_retries: int = 2,
    ):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardStream: rank {rank} is not in [0, world_size={world_size})")
        if verify not in ("sha256", "size"):
            raise ValueError(f"ShardStream: verify must be 'sha256' or 'size', got {verify!r}")
        self.index = index_uri if isinstance(index_uri, ShardIndex) else ShardIndex.read(str(index_uri))
        self.shards: list[ShardInfo] = [s for s in self.index.shards if s.n_fields > 0]
        if not self.shards:
            raise ValueError(f"{self.index.uri}: the shard index holds no fields")
        self.rank, self.world_size = int(rank), int(world_size)
        self.infinite = bool(infinite)
        self.verify = verify
        self.read_retries = int(read_retries)
        self.group_fields = max(1, int(loader_cfg.shuffle_buffer))
        self.cfg_workers = max(1, int(loader_cfg.num_workers))
        self.seed = (int(loader_cfg.seed), int(seed))
        self.channels = tuple(self.index.channels)
        self.channel_ids = channel_ids_of(self.channels)
        self._init_epoch()  # shared, so persistent DataLoader workers see set_epoch
        self._n_slots = self.cfg_workers
        self._counts = RawArray(c_int64, self._n_slots * len(_COUNTERS))
        self._storage_cfg = storage.get_config()  # spawned workers do not inherit storage.configure()
        self._positions: dict[int, tuple[int, int, int]] = {}  # worker -> next (epoch, group, offset)
        self._state_workers: int | None = None  # DataLoader worker count the positions refer to
        self._index_id = hashlib.sha256(
            json.dumps([[s.name, s.sha256, s.n_fields] for s in self.index.shards]).encode()
        ).hexdigest()
        self._failed: list[tuple[str, str]] = []  # (shard, reason) seen in this process (workers log theirs)
        self.check_coverage(self.cfg_workers)

    @classmethod
    def from_uri(cls, index_uri: str, loader_cfg: LoaderConfig | None = None, **kw) -> ShardStream:
        return cls(index_uri, loader_cfg or LoaderConfig(), **kw)

    # ------------------------------------------------------------------ assignment (set_epoch / epoch: SharedEpoch)
    def shard_order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of the (non-empty) shards; the same on every rank."""
        rng = np.random.default_rng(_seed_words(*self.seed, epoch, 0x5A4D))
        return rng.permutation(len(self.shards))

    def consumer_plan(self, epoch: int, consumer: int, n_consumers: int) -> list[tuple[int, int, int]]:
        """(shard position, j, k) items of one consumer for one epoch: read the shard, keep fields with i % k == j."""
        order = self.shard_order(epoch)
        n = len(order)
        if n >= n_consumers:
            return [(int(order[p]), 0, 1) for p in range(consumer, n, n_consumers)]
        p = consumer % n
        k = n_consumers // n + (1 if p < n_consumers % n else 0)
        return [(int(order[p]), consumer // n, k)]

    def _item_fields(self, item: tuple[int, int, int]) -> int:
        s, j, k = item
        return len(range(j, self.shards[s].n_fields, k))

    def _groups(self, plan: Sequence[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
        """Consecutive plan items pooled until a pool holds >= shuffle_buffer fields (index counts: no reading)."""
        groups, cur, n = [], [], 0
        for item in plan:
            cur.append(item)
            n += self._item_fields(item)
            if n >= self.group_fields:
                groups.append(cur)
                cur, n = [], 0
        if cur:
            groups.append(cur)
        return groups

    def check_coverage(self, num_workers: int) -> None:
        """Refuse a layout in which some consumer would get no field at all (it would stall the DataLoader)."""
        n_consumers = self.world_size * max(1, num_workers)
        n = len(self.shards)
        if n >= n_consumers:
            return
        need = -(-n_consumers // n)
        small = min(s.n_fields for s in self.shards)
        if small < need:
            raise ValueError(
                f"{self.index.uri}: {n} shards (the smallest with {small} fields) cannot feed {n_consumers} consumers "
                f"({self.world_size} ranks x {num_workers} workers): each shard would be shared by up to {need} "
                "consumers and needs at least that many fields; use fewer DataLoader workers or smaller shards"
            )

    def fields_per_epoch(self, epoch: int | None = None, num_workers: int | None = None) -> int:
        """Fields this rank yields in one epoch (index counts; shards that fail to read are not subtracted)."""
        epoch = self.epoch if epoch is None else epoch
        w_count = num_workers or self._state_workers or self.cfg_workers
        n_consumers = self.world_size * w_count
        return sum(
            self._item_fields(item)
            for w in range(w_count)
            for item in self.consumer_plan(epoch, self.rank * w_count + w, n_consumers)
        )

    def __len__(self) -> int:
        return self.fields_per_epoch()

    # ------------------------------------------------------------------ reading
    def _add(self, worker: int, name: str, n: int) -> None:
        self._counts[worker * len(_COUNTERS) + _IDX[name]] += int(n)

    def _load_item(self, item: tuple[int, int, int], worker: int) -> tuple[list[tuple[dict, np.ndarray]], str | None]:
        """The kept samples of one plan item, or ([], reason) when the shard is corrupt/unreadable (after retries)."""
        s, j, k = item
        info = self.shards[s]
        uri = self.index.shard_uri(info)
        reason = None
        for attempt in range(self.read_retries + 1):
            t0 = time.perf_counter()
            try:
                samples = read_shard(uri, info.bytes, info.sha256, self.verify)
            except CorruptShardError as e:
                reason = str(e)
                break  # the bytes are wrong: reading them again will not help
            except Exception as e:  # noqa: BLE001  (I/O: network drop, throttling past the retries): try again
                reason = f"{type(e).__name__}: {e}"
                if attempt < self.read_retries:
                    time.sleep(0.5 * 2**attempt)
                continue
            self._add(worker, "shards_read", 1)
            self._add(worker, "bytes_read", info.bytes)
            self._add(worker, "read_us", (time.perf_counter() - t0) * 1e6)
            if len(samples) != info.n_fields:
                reason = f"{uri}: {len(samples)} fields, the index records {info.n_fields}"
                break
            bad = [
                m.get("field_id")
                for m, a in samples
                if tuple(m["channels"]) != self.channels or list(a.shape) != list(self.index.field_shape)
            ]
            if bad:
                reason = f"{uri}: fields {bad[:3]} do not match the index channels/shape"
                break
            return (samples if k == 1 else samples[j::k]), None
        self._add(worker, "shards_failed", 1)
        self._failed.append((info.name, reason or "?"))
        log.warning("ShardStream: skipping shard %s (worker %d): %s", info.name, worker, reason)
        return [], reason

    def _sample(self, meta: dict, arr: np.ndarray, pos: dict) -> dict:
        return {
            "image": torch.from_numpy(arr),
            "channels": self.channels,
            "channel_ids": self.channel_ids,
            "field_id": meta["field_id"],
            "plate": meta["plate"],
            "stream_pos": pos,
        }

    def _start(self, worker: int, num_workers: int) -> tuple[int, int, int]:
        if self._positions and self._state_workers not in (None, num_workers):
            raise ValueError(
                f"ShardStream: the resume state was saved with {self._state_workers} DataLoader workers per rank, "
                f"this run has {num_workers}; positions are per worker, so use the same num_workers "
                "(or load_state_dict(state, strict=False) to restart at the start of the saved epoch)"
            )
        pos = self._positions.get(worker)
        start = (self.epoch, 0, 0)
        return max(pos, start) if pos is not None else start

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None:
            return self.iter_worker(0, 1)
        return self.iter_worker(info.id, info.num_workers)

    def iter_worker(self, worker: int, num_workers: int) -> Iterator[dict]:
        """The sample sequence of one DataLoader worker of this rank (what __iter__ runs inside the worker)."""
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker {worker} is not in [0, {num_workers})")
        if num_workers > self._n_slots:
            raise ValueError(
                f"ShardStream was built for loader.num_workers={self._n_slots} but runs with {num_workers} workers: "
                "build it with the same loader config as the DataLoader"
            )
        if storage.get_config() != self._storage_cfg:
            storage.configure(self._storage_cfg)
        self.check_coverage(num_workers)
        consumer = self.rank * num_workers + worker
        n_consumers = self.world_size * num_workers
        epoch, g0, o0 = self._start(worker, num_workers)
        self._state_workers = num_workers
        while True:
            groups = self._groups(self.consumer_plan(epoch, consumer, n_consumers))
            fresh = g0 == 0 and o0 == 0
            produced = 0
            items = [(g, item) for g in range(g0, len(groups)) for item in groups[g]]
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinocell-shard-prefetch")
            try:
                nxt = pool.submit(self._load_item, items[0][1], worker) if items else None
                pos_in_items = 0
                for g in range(g0, len(groups)):
                    samples: list = []
                    for _ in groups[g]:  # collect this group's shards (the next one loads in the background)
                        got, _reason = nxt.result()
                        samples.extend(got)
                        pos_in_items += 1
                        nxt = (
                            pool.submit(self._load_item, items[pos_in_items][1], worker)
                            if pos_in_items < len(items)
                            else None
                        )
                    perm = np.random.default_rng(_seed_words(*self.seed, epoch, consumer, g, 0x6E0)).permutation(
                        len(samples)
                    )
                    for o in range(o0, len(samples)):
                        meta, arr = samples[perm[o]]
                        samples[perm[o]] = None  # hand the buffer over to the consumer
                        self._positions[worker] = (epoch, g, o + 1)
                        self._add(worker, "fields_yielded", 1)
                        produced += 1
                        pos = {"worker": worker, "num_workers": num_workers, "epoch": epoch, "group": g, "offset": o}
                        yield self._sample(meta, arr, pos)
                    o0 = 0
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
            if not self.infinite:
                return
            if fresh and produced == 0:
                failed = "; ".join(f"{n}: {r}" for n, r in self._failed[-5:])
                raise RuntimeError(
                    f"ShardStream: rank {self.rank} worker {worker} read no field in a whole epoch ({epoch}): "
                    f"every shard it was dealt failed. Last failures: {failed}"
                )
            epoch, g0, o0 = epoch + 1, 0, 0

    # ------------------------------------------------------------------ batches, resume, stats
    @staticmethod
    def collate(samples: Sequence[dict]) -> dict:
        """collate_fields + the samples' stream positions (feed the batch to `observe`)."""
        batch = collate_fields(samples)
        batch["stream_pos"] = [s["stream_pos"] for s in samples]
        return batch

    def observe(self, batch: dict) -> None:
        """Record that the training loop consumed `batch` (from `collate`): moves the resume position past it."""
        for pos in batch.get("stream_pos", ()):
            w = int(pos["worker"])
            nxt = (int(pos["epoch"]), int(pos["group"]), int(pos["offset"]) + 1)
            if w not in self._positions or nxt > self._positions[w]:
                self._positions[w] = nxt
            self._state_workers = int(pos["num_workers"])

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "version": _STATE_VERSION,
            "index_id": self._index_id,
            "rank": self.rank,
            "world_size": self.world_size,
            "seed": list(self.seed),
            "shuffle_buffer": self.group_fields,
            "num_workers": self._state_workers,
            "epoch": self.epoch,
            "positions": {str(w): list(p) for w, p in sorted(self._positions.items())},
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from a saved position. strict=False: on a configuration mismatch, restart at the start of the
        earliest saved epoch instead of raising (fields of that epoch may then be seen twice)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("ShardStream.load_state_dict: not a ShardStream state")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"ShardStream.load_state_dict: state version {state.get('version')} is not supported")
        mine = self.state_dict()
        diffs = [
            f"{k}: saved {state.get(k)!r}, now {mine[k]!r}"
            for k in ("index_id", "rank", "world_size", "seed", "shuffle_buffer")
            if state.get(k) != mine[k]
        ]
        positions = {int(w): tuple(int(x) for x in p) for w, p in state.get("positions", {}).items()}
        if diffs:
            if strict:
                raise ValueError(
                    "ShardStream.load_state_dict: the state belongs to another configuration: " + "; ".join(diffs)
                )
            log.warning("ShardStream: inexact resume (%s): restarting the saved epoch", "; ".join(diffs))
            self.set_epoch(min([p[0] for p in positions.values()] + [int(state.get("epoch", 0))]))
            self._positions, self._state_workers = {}, None
            return
        self.set_epoch(int(state.get("epoch", 0)))
        self._positions = positions
        self._state_workers = state.get("num_workers")

    def stats(self) -> dict:
        """Counters summed over every worker (exact in the main process for any num_workers: shared memory).

        Counts are events: a corrupt shard dealt again in a later epoch is counted again. Fields are counted when
        produced, which runs ahead of what the trainer consumed by the DataLoader's prefetch. `failed` names the
        shards that failed in this process; DataLoader workers log theirs (with the reason) as warnings.
        """
        n = len(_COUNTERS)
        out = {
            name: sum(int(self._counts[w * n + i]) for w in range(self._n_slots)) for i, name in enumerate(_COUNTERS)
        }
        out["read_seconds"] = round(out.pop("read_us") / 1e6, 3)
        out["failed"] = [{"shard": name, "reason": r} for name, r in self._failed]
        return out
