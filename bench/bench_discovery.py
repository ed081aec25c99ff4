#!/usr/bin/env python3
"""Field discovery at scale (dinocell.jump.discover).

  python bench/bench_discovery.py [--fields 300000] [--listing-plates 4 --listing-keys 1500] [--skip-listing]

1. load_data mode: writes JUMP-like `load_data_with_illum.csv` files for N synthetic fields in a temp dir (51 plates of
   384 wells x 9 sites per batch, as many batches as needed; 8 `URL_Orig*` + 5 `URL_Illum*` columns with a stale
   `s3://` prefix to re-root, plus Metadata columns; no images), then, in a fresh process, runs discovery, writes the
   manifest and reads it back. Reports wall time, peak RSS of that process, CSV and manifest sizes, and load time.
2. listing mode: a moto S3 server (dinocell.storage.local_server.local_s3_server) in a child process, P plates x K zero-byte keys
   written in parallel, then listing-mode discovery with list_workers=1 and =16: keys/s for each.
   Loopback has no network latency, so the parallel gain here is a floor: on S3 (tens of ms a page) it is larger.

Prints one JSON line per measurement. `--fields 3000000` is the full-scale check (about 6 GB of CSV on disk).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from dinocell.channels import ALL_CHANNELS, FLUORESCENT_CHANNELS
from dinocell.jump.layout import CPJUMP1_CHANNEL_NUMBERS, image_filename, load_data_uri, plate_dir_name, well_name

BATCH_PLATES = 51
WELLS = 384
SITES = 9
STALE = "s3://cellpainting-gallery-old/projects/2019_07_11_JUMP-CP/source_4/images"
PLATE_MARK = "\x00"  # placeholders replaced by the plate barcode / batch name in a per-plate block of CSV text
BATCH_MARK = "\x01"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------- load_data CSVs


def _plate_template(wells: int, sites: int, csv_form: str) -> tuple[str, list[str]]:
    """Header and one CSV line per field of a plate, with PLATE_MARK / BATCH_MARK where barcode and batch go.

    Lines are site-major (every well's site 1, then site 2...), so discovery has to sort each CSV.
    """
    folder = f"{STALE}/{BATCH_MARK}/images/{PLATE_MARK}__2020-11-05T19_51_35-Measurement1/Images/"
    illum_folder = f"{STALE}/{BATCH_MARK}/illum/{PLATE_MARK}/"
    illum_names = [f"{PLATE_MARK}_Illum{c}.npy" for c in FLUORESCENT_CHANNELS]
    if csv_form == "url":
        header = [f"URL_Orig{c}" for c in ALL_CHANNELS] + [f"URL_Illum{c}" for c in FLUORESCENT_CHANNELS]
        illum = [illum_folder + n for n in illum_names]
    else:
        header = [f"{k}_Orig{c}" for c in ALL_CHANNELS for k in ("FileName", "PathName")]
        header += [f"{k}_Illum{c}" for c in FLUORESCENT_CHANNELS for k in ("FileName", "PathName")]
        illum = [v for n in illum_names for v in (n, illum_folder)]
    header += ["Metadata_Source", "Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Row", "Metadata_Col"]
    lines = []
    for site in range(1, sites + 1):
        for i in range(wells):
            row, col = i // 24 + 1, i % 24 + 1
            names = [image_filename(row, col, site, CPJUMP1_CHANNEL_NUMBERS[c]) for c in ALL_CHANNELS]
            paths = [folder + n for n in names] if csv_form == "url" else [v for n in names for v in (n, folder)]
            meta = ["source_4", PLATE_MARK, well_name(row, col), str(site), str(row), str(col)]
            lines.append(",".join(paths + illum + meta))
    return ",".join(header), lines


def write_load_data(root: Path, n_fields: int, csv_form: str = "url") -> dict:
    """JUMP-like load_data_with_illum.csv files for n_fields fields; returns counts and sizes."""
    per_plate = WELLS * SITES
    header, lines = _plate_template(WELLS, SITES, csv_form)
    full_block = "\n".join(lines) + "\n"
    plates, written, total_bytes = 0, 0, 0
    while written < n_fields:
        batch = f"2020_11_{plates // BATCH_PLATES:02d}_CPJUMP1"
        barcode = f"BR{plates:08d}"
        k = min(per_plate, n_fields - written)
        block = full_block if k == per_plate else "\n".join(lines[:k]) + "\n"
        text = header + "\n" + block.replace(BATCH_MARK, batch).replace(PLATE_MARK, barcode)
        path = Path(load_data_uri(str(root), batch, barcode, with_illum=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        total_bytes += len(text)
        written += k
        plates += 1
    return {"plates": plates, "batches": (plates - 1) // BATCH_PLATES + 1, "csv_bytes": total_bytes}


def _discover_child(root: str, manifest_path: str) -> dict:
    """Runs in a fresh process: discovery, write, read back. Peak RSS is this process's own."""
    from dinocell.config import DataConfig
    from dinocell.jump.discover import discover_fields, write_discovery
    from dinocell.jump.manifest import Manifest

    cfg = DataConfig(
        images_prefix="s3://cellpainting-gallery/cpg0000-jump-pilot/source_4/images/",
        load_data=[str(Path(root) / "workspace" / "load_data_csv") + "/"],
        list_workers=4,
    )
    usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    # The illum columns are present, so no illum folder is probed; nothing here touches the network.
    result = discover_fields(cfg, mode="load_data")
    t_discover = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_discover = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    t0 = time.perf_counter()
    write_discovery(result, manifest_path)
    t_write = time.perf_counter() - t0
    fields, excluded = len(result.manifest), result.summary["excluded_total"]
    sample = result.manifest.record(0).uris["DNA"]
    rss_discover = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del result
    t0 = time.perf_counter()
    back = Manifest.read(manifest_path)
    t_read = time.perf_counter() - t0
    assert len(back) == fields
    return {
        "fields": fields,
        "excluded": excluded,
        "discover_s": round(t_discover, 2),
        "discover_cpu_s": round(cpu_discover, 2),  # user + sys: comparable when other jobs share the cores
        "write_s": round(t_write, 2),
        "manifest_load_s": round(t_read, 2),
        "peak_rss_mib": round(rss_discover),
        "manifest_bytes": os.path.getsize(manifest_path),
        "manifest_arrow_mib": round(back.table.nbytes / 2**20),
        "sample_uri": sample,
    }


def bench_load_data(n_fields: int, workdir: Path, csv_form: str) -> None:
    root = workdir / "source_4"
    t0 = time.perf_counter()
    info = write_load_data(root, n_fields, csv_form)
    gen_s = time.perf_counter() - t0
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        out = pool.submit(_discover_child, str(root), str(workdir / "manifest.parquet")).result()
    assert out["fields"] == n_fields and out["excluded"] == 0, out
    # The first field in manifest order is A01 site 1 of the first plate, re-rooted off the stale prefix.
    expected = (
        "s3://cellpainting-gallery/cpg0000-jump-pilot/source_4/images/2020_11_00_CPJUMP1/images/"
        "BR00000000__2020-11-05T19_51_35-Measurement1/Images/r01c01f01p01-ch5sk1fk1fl1.tiff"
    )
    assert out["sample_uri"] == expected, out["sample_uri"]
    emit(
        {
            "bench": "discovery_load_data",
            "csv_form": csv_form,
            "requested_fields": n_fields,
            **info,
            "csv_gen_s": round(gen_s, 1),
            **out,
            "fields_per_s": round(n_fields / out["discover_s"]),
        }
    )
    shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- listing mode against a local S3 server


def _serve(port: int, ready, stop) -> None:
    """The S3 server in its own process, so that its request handling does not share the client's GIL."""
    import logging

    from dinocell.storage.local_server import local_s3_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise

    with local_s3_server(port):
        ready.set()
        stop.wait()


def bench_listing(plates: int, keys_per_plate: int, workers: int) -> None:
    from dinocell import storage
    from dinocell.config import DataConfig
    from dinocell.jump.discover import discover_fields
    from dinocell.storage.local_server import LOCAL_CREDENTIALS, create_bucket, free_port

    for k, v in LOCAL_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    ctx = mp.get_context("spawn")
    port = free_port()
    ready, stop = ctx.Event(), ctx.Event()
    server = ctx.Process(target=_serve, args=(port, ready, stop), daemon=True)
    server.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("local S3 server did not start")
        endpoint = f"http://127.0.0.1:{port}"
        create_bucket(endpoint, "bench")
        storage.configure(storage.StorageConfig(endpoint_url=endpoint, anonymous=False))
        prefix = "s3://bench/source_4/images/"
        keys = []
        for p in range(plates):
            folder = f"{prefix}B1/images/{plate_dir_name(f'BR{p:04d}', '2020-11-05T19_51_35')}/Images/"
            n = 0
            for i in range(WELLS):
                for site in range(1, 17):
                    for ch in (1, 2, 3, 4, 5):
                        if n < keys_per_plate:
                            keys.append(folder + image_filename(i // 24 + 1, i % 24 + 1, site, ch))
                            n += 1
        t0 = time.perf_counter()
        storage.map_parallel(lambda u: storage.write_bytes(u, b""), keys, max_workers=16)
        put_s = time.perf_counter() - t0
        results = {}
        for w in (1, workers):
            cfg = DataConfig(images_prefix=prefix, batches=["B1"], list_workers=w)
            t0 = time.perf_counter()
            res = discover_fields(cfg, mode="listing")
            dt = time.perf_counter() - t0
            listed = res.summary["inputs"]["keys_listed"]
            assert listed == len(keys), (listed, len(keys))
            results[w] = dt
            emit(
                {
                    "bench": "discovery_listing",
                    "plates": plates,
                    "keys": len(keys),
                    "list_workers": w,
                    "wall_s": round(dt, 2),
                    "keys_per_s": round(len(keys) / dt),
                    "fields": len(res.manifest),
                }
            )
        emit(
            {
                "bench": "discovery_listing_speedup",
                "workers": workers,
                "speedup": round(results[1] / results[workers], 2),
                "put_keys_per_s": round(len(keys) / put_s),
            }
        )
    finally:
        stop.set()
        server.join(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--fields", type=int, default=300_000, help="fields in the load_data benchmark (3000000: full scale)"
    )
    # moto stores a few hundred keys/s here, so the default stays small; 20 x 2000 is the fuller check.
    ap.add_argument("--listing-plates", type=int, default=4)
    ap.add_argument("--listing-keys", type=int, default=1500, help="keys per plate in the listing benchmark")
    ap.add_argument("--csv-form", choices=["url", "filename"], default="url", help="load_data column form")
    ap.add_argument("--listing-workers", type=int, default=16)
    ap.add_argument("--skip-listing", action="store_true")
    ap.add_argument("--skip-load-data", action="store_true")
    ap.add_argument("--workdir", default=None, help="where to write the CSVs (default: a temp dir, removed after)")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dinocell-bench-discovery-"))
    try:
        if not args.skip_load_data:
            bench_load_data(args.fields, workdir, args.csv_form)
        if not args.skip_listing:
            bench_listing(args.listing_plates, args.listing_keys, args.listing_workers)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
