#!/usr/bin/env python3
"""`make bench`: run every benchmark in this folder with its defaults, each in its own process, and collect the
JSON lines they print into bench/results/<date>.jsonl (numbers belong in benchmarks, never in test assertions)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Order: cheapest first; each prints one or more JSON lines on stdout.
BENCHES = ["bench_augment.py", "bench_s3.py", "bench_discovery.py", "bench_cache.py", "bench_data.py", "bench_train_step.py"]


def main() -> int:
    only = set(sys.argv[1:])
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"{dt.datetime.now():%Y%m%d-%H%M%S}.jsonl"
    failed = []
    with out.open("w") as f:
        for name in BENCHES:
            if only and name not in only:
                continue
            script = HERE / name
            if not script.exists():
                print(f"[bench] {name}: not present, skipped")
                continue
            print(f"[bench] {name} ...", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=HERE.parent,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            sys.stdout.write(proc.stdout)
            if proc.returncode != 0:
                failed.append(name)
                sys.stderr.write(proc.stderr[-4000:])
            for line in proc.stdout.splitlines():
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    f.write(json.dumps({"bench": name, **rec}) + "\n")
            print(f"[bench] {name}: {'ok' if proc.returncode == 0 else 'FAILED'} in {time.perf_counter() - t0:.1f}s")
    print(f"[bench] results: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
