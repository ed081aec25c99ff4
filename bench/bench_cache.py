#!/usr/bin/env python3
"""Two kfp.local runs of the whole pipeline with caching on: the second must take discover and shard from the cache.

    python bench/bench_cache.py [--plates 3] [--size 128]

A local S3 server, a small synthetic JUMP bucket, then `run_local(..., cache=True)` twice with different run names
and the same inputs. Prints one JSON line per run (wall time, the tasks answered from the cache) and exits 1 unless
the second run reused exactly discover and shard, with the same manifest and shard URIs, while training,
evaluating and publishing its own run. (A check, not only a timing: too slow for the test suite on two cores,
1.5 to 2.5 minutes there; tests/test_caching.py covers the task specs and the step-level reuse.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plates", type=int, default=3)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args(argv)

    import pipeline as pl
    from dinocell.config.step_args import configure_storage
    from dinocell.pipeline.local import run_local
    from dinocell.storage.local_server import LOCAL_CREDENTIALS, create_bucket, local_s3_server
    from dinocell.synth.bucket import synth_bucket

    for k, v in LOCAL_CREDENTIALS.items():
        os.environ.setdefault(k, v)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp, local_s3_server() as server:
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint_url  # for the step subprocesses
        configure_storage(server.endpoint_url)
        create_bucket(server.endpoint_url, "cache")
        source = "s3://cache/cpg0000-jump-pilot/source_4"
        synth_bucket(source, batches=1, plates_per_batch=args.plates, wells_per_plate=2, sites_per_well=1,
                     size=args.size, seed=2)
        common = {"source": source, "outputs": "s3://cache/runs", "workdir": Path(tmp) / "work", "config": "tiny",
                  "overrides": ["train.max_iters=1", "train.log_every=1", "train.vis_every=0", "train.ckpt_every=0"],
                  "endpoint_url": server.endpoint_url, "model_name": "m", "cache": True,
                  "log_file": Path(tmp) / "kfp.log"}
        outcomes = []
        for name in ("first", "second"):
            t0 = time.perf_counter()
            out = run_local(pl.dinocell_pipeline, run_name=name, **common)
            outcomes.append(out)
            print(json.dumps({"run": name, "wall_s": round(time.perf_counter() - t0, 1),
                              "cached_tasks": sorted(out.cached_tasks), "manifest": out.manifest_uri,
                              "shards": out.shards_uri, "model": out.model_uri}), flush=True)
    one, two = outcomes
    problems = []
    if one.cached_tasks:
        problems.append(f"the first run took {one.cached_tasks} from an empty cache")
    if sorted(two.cached_tasks) != ["discover", "shard"]:
        problems.append(f"the second run took {sorted(two.cached_tasks)} from the cache, not discover and shard")
    if (two.manifest_uri, two.shards_uri) != (one.manifest_uri, one.shards_uri):
        problems.append("the runs trained on different data URIs")
    if not two.model_uri.endswith("/m/second") or not two.scalars:
        problems.append("the second run did not train, evaluate and publish its own model")
    for p in problems:
        print(f"bench_cache: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
