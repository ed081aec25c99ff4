"""Building the shards of a plan (dinocell.data.shard_plan): one shard per task, in this process or a process pool.

A task loads its fields with FieldLoader in small chunks (bounded memory: a few fields, not a whole shard), writes
the tar to a local temp file while hashing it, uploads it (atomic), then writes the sidecar: the shard is complete
once its sidecar exists. Fields that fail to load or do not match the shard set's dtype, shape or channels are
skipped and listed in the sidecar with their skip kind (transient / missing / corrupt, dinocell.data.shard_format):
a rerun rebuilds the shards whose skips were transient. The pool (spawn context) keeps at most 2 tasks per worker in
flight; a task that fails is reported, never fatal to the others.

Workers die with the parent: a killed `dinocell shard` (SIGKILL, OOM killer, a deleted pod) must not leave workers
that go on uploading shards and sidecars nobody waits for. Each worker asks the kernel for SIGKILL when its parent
dies (Linux prctl(PR_SET_PDEATHSIG) through ctypes; it fires when the thread that started the worker exits, and the
pool is started and drained by the one thread that calls run_pool) and then checks the parent is still the one that
started it (it may have died before the prctl). Elsewhere, or if prctl fails, a watchdog thread polls the parent pid.
The temp tar of a killed build is named `dinocell-shard-NNNNNN-<pid>-*.tar` (shard_format.temp_prefix), so the next
run removes it once its owner is provably dead (or it is older than the grace period).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinocell import storage
from dinocell.config import PreprocessConfig
from dinocell.data.shard_format import (
    SHARD_FORMAT,
    SHARD_FORMAT_VERSION,
    field_key,
    field_metadata,
    shard_name,
    temp_prefix,
)
from dinocell.data.shard_tar import HashingWriter, finish_tar, write_tar_member
from dinocell.jump.manifest import FieldRecord

log = logging.getLogger(__name__)

__all__ = ["CHUNK_FIELDS", "ShardTask", "build_shard", "die_with_parent", "run_pool"]

CHUNK_FIELDS = 8  # fields loaded at once by a shard worker (bounds its memory to a few fields, not a whole shard)


@dataclass
class ShardTask:
    number: int
    first_key: int  # plan position of the shard's first field (keys are plan positions)
    records: list[FieldRecord]
    out_prefix: str
    channels: list[str]
    shape: list[int]
    preprocess: PreprocessConfig
    signature: str
    split: str
    fingerprint: str
    storage_cfg: storage.StorageConfig
    fetch_workers: int

    @property
    def name(self) -> str:
        return shard_name(self.number)


# --------------------------------------------------------------------------- one shard (runs in a pool worker)

_worker_loaders: dict = {}


def _field_loader(preprocess: PreprocessConfig, channels: Sequence[str], fetch_workers: int):
    """One FieldLoader per worker process and configuration (it holds a thread pool)."""
    from dinocell.data.fields import FieldLoader

    key = (json.dumps(dataclasses.asdict(preprocess), sort_keys=True), tuple(channels), fetch_workers)
    loader = _worker_loaders.get(key)
    if loader is None:
        loader = _worker_loaders[key] = FieldLoader(preprocess, list(channels), fetch_workers=fetch_workers)
    return loader


def build_shard(task: ShardTask) -> dict[str, Any]:
    """Load the shard's fields, write the tar to a temp file (hashing it), upload it, then write the sidecar."""
    if storage.get_config() != task.storage_cfg.resolved():
        storage.configure(task.storage_cfg)
    loader = _field_loader(task.preprocess, task.channels, task.fetch_workers)
    expected = tuple(task.shape)
    keys = {r.field_id: task.first_key + j for j, r in enumerate(task.records)}
    skipped: list[dict[str, str]] = []
    n_fields = 0
    t0 = time.perf_counter()
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(task.name), suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as raw:
            out = HashingWriter(raw)
            written = 0
            for start in range(0, len(task.records), CHUNK_FIELDS):
                chunk = task.records[start : start + CHUNK_FIELDS]
                fields, errors = loader.load_each(chunk)
                skipped.extend(
                    {"field_id": e.field_id, "reason": str(e), "kind": e.kind, "shard": task.name} for e in errors
                )
                for fld in sorted(fields, key=lambda f: keys[f.field_id]):
                    img = np.ascontiguousarray(fld.image)
                    if img.dtype != np.uint8 or tuple(img.shape) != expected or list(fld.channels) != task.channels:
                        skipped.append(
                            {
                                "field_id": fld.field_id,
                                "reason": f"field is {img.dtype} {tuple(img.shape)} with channels {list(fld.channels)}, "
                                f"the shard set is uint8 {expected} with channels {task.channels}",
                                "kind": "corrupt",
                                "shard": task.name,
                            }
                        )
                        continue
                    key = field_key(keys[fld.field_id])
                    meta = json.dumps(field_metadata(fld, img.shape), separators=(",", ":")).encode()
                    written += write_tar_member(out, f"{key}.json", meta)
                    written += write_tar_member(out, f"{key}.u8", img)
                    n_fields += 1
            written += finish_tar(out, written)
        sha = out.sha.hexdigest()
        uri = storage.join(task.out_prefix, f"{task.name}.tar")
        storage.upload_file(tmp, uri)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    sidecar = {
        "format": SHARD_FORMAT,
        "version": SHARD_FORMAT_VERSION,
        "name": f"{task.name}.tar",
        "uri": uri,
        "n_fields": n_fields,
        "bytes": out.size,
        "sha256": sha,
        "split": task.split,
        "channels": task.channels,
        "field_shape": list(task.shape),
        "preprocess_signature": task.signature,
        "plan_sha256": task.fingerprint,
        "planned": len(task.records),
        "skipped": skipped,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    storage.write_text(storage.join(task.out_prefix, f"{task.name}.json"), json.dumps(sidecar, indent=1) + "\n")
    return sidecar


# --------------------------------------------------------------------------- the pool

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _watch_parent(parent_pid: int, interval_s: float) -> None:
    while True:
        time.sleep(interval_s)
        if os.getppid() != parent_pid:
            os._exit(1)  # noqa: SLF001 - no cleanup: the parent that would collect the result is gone


def die_with_parent(parent_pid: int, interval_s: float = 0.5) -> str:
    """Make this process exit when `parent_pid` (its parent) dies; returns how ("pdeathsig" or "watchdog").

    The pool's worker initializer (module docstring)."""
    how = "watchdog"
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
                how = "pdeathsig"
        except (OSError, AttributeError):  # no libc symbol: fall back to polling
            pass
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)  # noqa: SLF001
    if how == "watchdog":
        threading.Thread(target=_watch_parent, args=(parent_pid, interval_s), daemon=True,
                         name="dinocell-parent-watch").start()
    return how


def run_pool(todo, make_task, workers: int, sidecars: dict, failures: dict, on_done=None) -> None:
    """Build shards on a spawn-context process pool, keeping at most 2 tasks per worker in flight (bounded memory).

    Spawn, not fork: the parent may hold threads (storage pools, a local S3 server) whose locks a fork would copy.
    """
    ctx = multiprocessing.get_context("spawn")
    pending = list(todo)
    running: dict[Future, int] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        while pending or running:
            while pending and len(running) < 2 * workers:
                i = pending.pop(0)
                running[pool.submit(build_shard, make_task(i))] = i
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                i = running.pop(fut)
                try:
                    sidecars[i] = fut.result()
                    log.info("shard: %s done (%d fields)", shard_name(i), sidecars[i]["n_fields"])
                except BrokenProcessPool as e:
                    failures[i] = (
                        f"{type(e).__name__}: {e} (a worker died: out of memory? When calling write_shards from a "
                        "script, guard the call with `if __name__ == '__main__':`, the pool starts workers with spawn)"
                    )
                except Exception as e:  # noqa: BLE001  (reported with the others at the end)
                    failures[i] = f"{type(e).__name__}: {e}"
                if on_done is not None:
                    on_done()  # progress in the parent, one per finished (or failed) shard
