#!/usr/bin/env python3
"""CPU data path, three designs in one run on one machine: shard mode, raw streaming, and the naive anchor.

  python bench/bench_data.py [--fields 24] [--size 1080] [--naive ../shared/bench/naive_data_bench.py]

What is measured (all single-process, cv2 and torch on one thread, so "per core" = fields per CPU-second):
- shard mode: ShardStream (dinocell.data.shard_reader) reading shards already written (to local disk, and to a local
  S3 server), streaming the tar, checking it (sha256, or size + structure only), shuffling, and collating batches of
  64 into the uint8 [B, 5, H, W] tensor that is shipped to the GPU. Crops and augmentation are NOT on this path: they
  run batched on the GPU (dinocell.data.multiview, measured by bench/bench_augment.py);
- raw streaming: FieldLoader over the local S3 server with full preprocessing (fetch, 16-bit TIFF decode, subsampled
  percentiles, CLAHE, 2x area downsampling), cold cache (no LRU);
- the naive design: the per-field function of shared/bench/naive_data_bench.py (decode, full percentile, CLAHE,
  10 crops per field on the CPU), imported from that file and timed here the same way (CPU time, one thread; the
  script itself reports wall time, which on a busy machine includes waiting for a core).
The S3 server runs in a separate process so that its CPU time is not charged to the data path. CPU time is
`time.process_time()` of this process (all its threads). The one-off cost of writing the shards is reported too.
Prints one JSON object, then a small table.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile
import torch

from dinocell import storage
from dinocell.channels import FLUORESCENT_CHANNELS
from dinocell.config import LoaderConfig, PreprocessConfig, ShardConfig
from dinocell.data.fields import FieldLoader
from dinocell.data.shard_reader import ShardStream
from dinocell.data.shards import write_shards
from dinocell.jump.manifest import FieldRecord, Manifest, make_field_id
from dinocell.storage.local_server import LOCAL_CREDENTIALS, create_bucket, local_s3_server

REPO = Path(__file__).resolve().parents[1]
CH = list(FLUORESCENT_CHANNELS)
BATCH = 64


def serve_s3(conn) -> None:
    """Child process: run the local S3 server until the parent says stop."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
    with local_s3_server() as server:
        conn.send(server.endpoint_url)
        conn.recv()


def make_inputs(root: str, n_fields: int, size: int, seed: int = 0) -> Manifest:
    """n_fields x 5 channels of uint16 TIFF under `root`, pixels like the naive anchor's (gamma noise).

    At most 40 distinct images are generated and reused (generation is not what is measured; with no cache, every
    field is still fetched and decoded on its own)."""
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(min(40, n_fields * len(CH))):
        buf = io.BytesIO()
        tifffile.imwrite(buf, rng.gamma(2.0, 300.0, (size, size)).astype(np.uint16))
        blobs.append(buf.getvalue())
    records, writes = [], []
    for i in range(n_fields):
        plate, well, site = f"BR{i % 3:03d}", f"A{i // 9 + 1:02d}", i % 9 + 1
        uris = {}
        for j, ch in enumerate(CH):
            uri = storage.join(root, plate, f"{well}_f{site:02d}_{ch}.tiff")
            writes.append((uri, blobs[(i * len(CH) + j) % len(blobs)]))
            uris[ch] = uri
        records.append(FieldRecord(make_field_id("B1", plate, well, site), "B1", plate, well, site, "train", uris))
    storage.map_parallel(lambda w: storage.write_bytes(*w, fsync=False), writes, max_workers=8)  # setup, not timed
    return Manifest.from_records(records, CH)


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def bench_raw(manifest: Manifest) -> dict:
    loader = FieldLoader(PreprocessConfig(), CH, fetch_workers=8, cache=None)
    records = list(manifest.records())
    loader.load(records[0])  # warm up imports / clients

    def run():
        return sum(loader.load(r).image.nbytes for r in records[1:])

    nbytes, cpu, wall = timed(run)
    n = len(records) - 1
    return {"fields": n, "cpu_s": cpu, "wall_s": wall, "field_bytes": nbytes // n}


def bench_reader(index_uri: str, verify: str, min_fields: int, min_seconds: float) -> dict:
    """Iterate an infinite ShardStream in this process, collating batches of 64, for >= min_fields and min_seconds."""
    stream = ShardStream(index_uri, LoaderConfig(num_workers=0, shuffle_buffer=512), seed=0, verify=verify)
    it = iter(stream)
    ShardStream.collate([next(it) for _ in range(BATCH)])  # warm up: first shards read, clients made

    def run():
        n, t0 = 0, time.perf_counter()
        while n < min_fields or time.perf_counter() - t0 < min_seconds:
            batch = ShardStream.collate([next(it) for _ in range(BATCH)])
            n += batch["images"].shape[0]
        return n, tuple(batch["images"].shape)

    (n, shape), cpu, wall = timed(run)
    return {"fields": n, "cpu_s": cpu, "wall_s": wall, "batch_shape": list(shape), "stats": stream.stats()}


def run_naive(path: Path, fields: int) -> dict:
    """The naive anchor's own per-field function (imported from its file), timed here with CPU time like the others.

    naive_data_bench.py reports wall-clock time, which on a shared machine also counts time spent waiting for a core;
    timing its prep_field with process_time() in this process makes the ratio CPU-to-CPU."""
    if not path.exists():
        raise SystemExit(f"bench_data: naive anchor not found at {path} (pass --naive PATH)")
    spec = importlib.util.spec_from_file_location("naive_data_bench", path)
    naive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(naive)
    blobs = naive.make_tiffs(naive.CH, seed=1)
    rng = np.random.default_rng(1)
    naive.prep_field(blobs, rng)  # warm up

    def run():
        for _ in range(fields):
            naive.prep_field(blobs, rng)

    _, cpu, wall = timed(run)
    return {
        "path": str(path),
        "fields": fields,
        "cpu_s": cpu,
        "wall_s": wall,
        "field_ms_cpu": round(cpu / fields * 1e3, 1),
        "field_ms_wall": round(wall / fields * 1e3, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=24, help="fields in the synthetic data set")
    ap.add_argument("--size", type=int, default=1080, help="raw field side in pixels (the naive anchor uses 1080)")
    ap.add_argument("--naive", default=str(REPO.parent / "shared" / "bench" / "naive_data_bench.py"))
    ap.add_argument("--naive-fields", type=int, default=10, help="fields timed for the naive anchor")
    ap.add_argument("--read-fields", type=int, default=640, help="fields read per shard-reader variant (at least)")
    ap.add_argument("--read-seconds", type=float, default=2.0, help="seconds per shard-reader variant (at least)")
    a = ap.parse_args()
    if a.fields < 2:
        raise SystemExit("--fields must be >= 2")
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    for k, v in LOCAL_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=serve_s3, args=(child,), daemon=True)
    server.start()
    work = Path(tempfile.mkdtemp(prefix="dinocell-bench-data-"))
    result: dict = {"cpus": os.cpu_count(), "fields": a.fields, "size": a.size, "batch": BATCH}
    try:
        endpoint = parent.recv()
        create_bucket(endpoint, "bench")
        storage.configure(storage.StorageConfig(endpoint_url=endpoint, anonymous=False))

        manifest, _, wall = timed(lambda: make_inputs("s3://bench/raw", a.fields, a.size))
        result["setup_inputs_s"] = round(wall, 2)

        raw = bench_raw(manifest)

        per_field = 5 * (a.size // 2) ** 2
        cfg = ShardConfig(target_bytes=8 * per_field, workers=1)  # 8 fields a shard: several shards, a few epochs
        local_out = str(work / "shards")
        index, w_cpu, w_wall = timed(lambda: write_shards(manifest, local_out, cfg, PreprocessConfig()))
        for p in sorted(Path(local_out).iterdir()):  # the same shard set on the local S3 server
            storage.upload_file(str(p), f"s3://bench/shards/{p.name}")

        readers = {}
        for where, uri in (("local", index.uri), ("s3", "s3://bench/shards/index.json")):
            for verify in ("sha256", "size"):
                readers[f"shards_{where}_{verify}"] = bench_reader(uri, verify, a.read_fields, a.read_seconds)

        naive = run_naive(Path(a.naive).resolve(), a.naive_fields)
    finally:
        try:
            parent.send("stop")
        except (BrokenPipeError, OSError):
            pass
        server.join(timeout=10)
        if server.is_alive():
            server.terminate()
        shutil.rmtree(work, ignore_errors=True)

    def row(fields: int, cpu: float, wall: float) -> dict:
        fps_core = fields / max(cpu, 1e-9)
        return {
            "fields_per_s_per_core": round(fps_core, 1),
            "ms_per_field_cpu": round(1e3 / fps_core, 2),
            "fields_per_s_wall_1proc": round(fields / max(wall, 1e-9), 1),
            "cores_for_1000_fields_per_s": round(1000 / fps_core, 2),
        }

    naive_fps = naive["fields"] / max(naive["cpu_s"], 1e-9)
    modes = {
        name: {
            **row(r["fields"], r["cpu_s"], r["wall_s"]),
            "fields_read": r["fields"],
            "shards_failed": r["stats"]["shards_failed"],
        }
        for name, r in readers.items()
    }
    modes["raw_stream_s3_cold"] = row(raw["fields"], raw["cpu_s"], raw["wall_s"])
    modes["naive"] = row(naive["fields"], naive["cpu_s"], naive["wall_s"])
    for m in modes.values():
        m["ratio_vs_naive"] = round(m["fields_per_s_per_core"] / naive_fps, 1)
    result.update(
        {
            "field_shape_out": [5, a.size // 2, a.size // 2],
            "modes": modes,
            "shard_write": {
                **row(index.n_fields, w_cpu, w_wall),
                "shards": len(index.shards),
                "bytes": index.total_bytes,
            },
            "naive_anchor": naive,
            "shard_over_naive_per_core": modes["shards_local_sha256"]["ratio_vs_naive"],
            "goal_10x_met": modes["shards_local_sha256"]["ratio_vs_naive"] >= 10,
            "note": "shard/raw rows end at uint8 tensors (batches of 64) shipped to the GPU; crops + augmentation run "
            "batched on the GPU and are not part of this CPU path. The naive row includes its 10 CPU crops.",
        }
    )
    if a.size != 1080:
        result["warning"] = (
            "the naive anchor always uses 1080x1080 fields: ratios at another --size are not like for like"
        )
    print(json.dumps(result))
    print()
    print(f"{'mode':<22} {'fields/s/core':>14} {'ms/field':>9} {'x naive':>8} {'cores for 1000/s':>17}")
    for name, m in modes.items():
        print(
            f"{name:<22} {m['fields_per_s_per_core']:>14.1f} {m['ms_per_field_cpu']:>9.2f} "
            f"{m['ratio_vs_naive']:>8.1f} {m['cores_for_1000_fields_per_s']:>17.2f}"
        )
    w = result["shard_write"]
    print(f"{'(shard write, once)':<22} {w['fields_per_s_per_core']:>14.1f} {w['ms_per_field_cpu']:>9.2f}")


if __name__ == "__main__":
    main()
