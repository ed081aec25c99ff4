#!/usr/bin/env python3
"""Object-storage streaming against a local S3 server, and the FieldLoader on top of it.

  python bench/bench_s3.py [--objects 200] [--fields 40] [--small-bytes 4096]

Measures (prints one JSON object):
- fetch: objects/s and MB/s for `storage.read_many` with 1 worker (sequential) and 16 workers (parallel), on
  `--objects` objects of a 1080x1080 uint16 uncompressed TIFF (~2.3 MB, what cpg0000 stores) and on as many small
  objects (`--small-bytes`, where per-request latency dominates);
- FieldLoader: fields/s for 5 fluorescent channels of 1080x1080, full preprocessing (decode, subsampled percentiles,
  CLAHE, 2x area downsampling), cold (empty cache; `load` one field at a time and `load_many`, which fetches the next
  field while preprocessing the current one) and warm (every channel served by the LRU cache);
- fixture: per-stage cost of the real LZW-compressed Phenix field (shared/fixtures or tests/data), one core.

The server is moto (Python) in a separate process on 127.0.0.1: absolute MB/s numbers are bounded by that server
and by the cores this machine has, not by S3. What transfers to a real bucket is the ratio: parallel requests hide
per-request latency, which matters even more against S3's tens of milliseconds a GET.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile

from dinocell import storage
from dinocell.channels import FLUORESCENT_CHANNELS
from dinocell.config import PreprocessConfig
from dinocell.data.cache import LRUCache
from dinocell.data.fields import FieldLoader
from dinocell.data.preprocess import clahe, decode_tiff, downsample2x, scale_to_uint8
from dinocell.jump.manifest import FieldRecord, make_field_id
from dinocell.storage.local_server import LOCAL_CREDENTIALS, create_bucket, local_s3_server

BUCKET = "bench-s3"
FIXTURE_NAME = "phenix_BR00121482_A01_s1"


def serve_s3(conn) -> None:
    """Run the local S3 server in this (child) process until the parent says stop."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with local_s3_server() as server:
        create_bucket(server.endpoint_url, BUCKET)
        conn.send(server.endpoint_url)
        conn.recv()


def synthetic_channel(rng: np.random.Generator, size: int = 1080) -> np.ndarray:
    """A cell-painting-like uint16 field: dim noisy background with bright blurred blobs."""
    img = rng.normal(300, 15, (size, size)).astype(np.float32)
    blobs = np.zeros((size, size), np.float32)
    ys, xs = rng.integers(0, size, 60), rng.integers(0, size, 60)
    blobs[ys, xs] = rng.uniform(2e5, 8e5, 60)
    img += cv2.GaussianBlur(blobs, (0, 0), 12)
    return np.clip(img, 0, 65535).astype(np.uint16)


def tiff_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, img)
    return buf.getvalue()


def rate(n: int, nbytes: int, seconds: float) -> dict:  # wall clock: fetching is waiting, not computing
    return {
        "seconds": round(seconds, 3),
        "objects_per_s": round(n / seconds, 1),
        "MB_per_s": round(nbytes / seconds / 1e6, 1),
    }


def bench_fetch(uris: list[str], workers: int) -> dict:
    t = time.perf_counter()
    got = storage.read_many(uris, max_workers=workers)
    return rate(len(uris), sum(len(b) for b in got), time.perf_counter() - t)


def timed(fn) -> dict:
    """Wall time and this process's CPU time (all threads) of fn(); on a shared machine CPU time is the steadier one."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c}


def per_field(n: int, t: dict) -> dict:
    return {"fields_per_s_wall": round(n / t["wall_s"], 2), "cpu_ms_per_field": round(t["cpu_s"] / n * 1e3, 1)}


def bench_loader(records: list[FieldRecord]) -> dict:
    cfg = PreprocessConfig()
    n = len(records)
    out = {}
    loader = FieldLoader(cfg, FLUORESCENT_CHANNELS, fetch_workers=8)
    out["cold_load"] = per_field(n, timed(lambda: [loader.load(r) for r in records]))

    cache = LRUCache(2 * 1024**3)
    loader = FieldLoader(cfg, FLUORESCENT_CHANNELS, fetch_workers=8, cache=cache)
    got = {}
    out["cold_load_many"] = per_field(n, timed(lambda: got.update(result=loader.load_many(records))))
    fields, errors = got["result"]
    assert not errors and len(fields) == n, errors
    out["warm_load"] = per_field(n, timed(lambda: [loader.load(r) for r in records]))
    out["warm_cache"] = {
        k: v for k, v in cache.stats().items() if k in ("hits", "misses", "hit_rate", "bytes", "items")
    }
    return out


def find_fixture() -> Path | None:
    repo = Path(__file__).resolve().parents[1]
    for p in (repo / "tests" / "data" / FIXTURE_NAME, repo.parent / "shared" / "fixtures" / FIXTURE_NAME):
        if (p / "load_data.csv").exists():
            return p
    return None


def bench_fixture(repeats: int = 5) -> dict | None:
    """Per-stage cost of preprocessing the real LZW field: the 5 fluorescent channels (ch1-ch5), one core."""
    root = find_fixture()
    if root is None:
        return None
    cfg = PreprocessConfig()
    blobs = [(root / f"r01c01f01p01-ch{i}sk1fk1fl1.tiff").read_bytes() for i in range(1, 6)]
    stages = {"decode_lzw": 0.0, "scale": 0.0, "clahe": 0.0, "downsample": 0.0}
    clock = time.thread_time  # CPU time of this thread: everything here runs on one thread
    for _ in range(repeats):
        for b in blobs:
            t0 = clock()
            raw = decode_tiff(b, "fixture")
            t1 = clock()
            u8 = scale_to_uint8(raw, cfg.percentile_low, cfg.percentile_high, cfg.percentile_subsample)
            t2 = clock()
            eq = clahe(u8, cfg.clahe_clip, cfg.clahe_tiles)
            t3 = clock()
            downsample2x(eq)
            t4 = clock()
            for k, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                stages[k] += dt
    ms = {k: round(v / repeats * 1e3, 2) for k, v in stages.items()}
    ms["total"] = round(sum(ms.values()), 2)
    return {"cpu_ms_per_field_5ch": ms, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--objects", type=int, default=200)
    ap.add_argument("--fields", type=int, default=40)
    ap.add_argument("--small-bytes", type=int, default=4096)
    args = ap.parse_args()
    cv2.setNumThreads(1)  # one core for the preprocessing (dinocell.data.preprocess also sets it on import)

    for k, v in LOCAL_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=serve_s3, args=(child,), daemon=True)
    server.start()
    endpoint = parent.recv()
    storage.configure(storage.StorageConfig(endpoint_url=endpoint, anonymous=False))
    result: dict = {"endpoint": "moto S3 server, separate process, 127.0.0.1", "cpus": os.cpu_count()}
    try:
        rng = np.random.default_rng(0)
        n_img = max(args.objects, 5 * args.fields)
        distinct = [tiff_bytes(synthetic_channel(rng)) for _ in range(10)]
        big = [f"s3://{BUCKET}/images/obj{i:04d}.tiff" for i in range(n_img)]
        small = [f"s3://{BUCKET}/small/obj{i:04d}.bin" for i in range(args.objects)]
        t = time.perf_counter()
        storage.map_parallel(
            lambda iu: storage.write_bytes(iu[1], distinct[iu[0] % len(distinct)]), list(enumerate(big)), 16
        )
        storage.map_parallel(lambda u: storage.write_bytes(u, os.urandom(args.small_bytes)), small, 16)
        result["upload_seconds"] = round(time.perf_counter() - t, 2)
        result["tiff_object_bytes"] = len(distinct[0])

        storage.read_many(big[:8], max_workers=8)  # warm the client's connection pool
        result["fetch_tiff"] = {f"workers_{w}": bench_fetch(big[: args.objects], w) for w in (1, 16)}
        result["fetch_small"] = {f"workers_{w}": bench_fetch(small, w) for w in (1, 16)}
        for kind in ("fetch_tiff", "fetch_small"):
            r = result[kind]
            r["parallel_speedup"] = round(r["workers_16"]["objects_per_s"] / r["workers_1"]["objects_per_s"], 2)

        records = []
        for i in range(args.fields):
            uris = {ch: big[5 * i + j] for j, ch in enumerate(FLUORESCENT_CHANNELS)}
            records.append(
                FieldRecord(make_field_id("BENCH", "P1", f"A{i:02d}", 1), "BENCH", "P1", f"A{i:02d}", 1, "train", uris)
            )
        result["field_loader"] = {"fields": args.fields, "channels": 5, "size": 1080, **bench_loader(records)}
    finally:
        parent.send("stop")
        server.join(timeout=10)
        if server.is_alive():
            server.terminate()
    result["fixture_lzw_one_core"] = bench_fixture()
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
