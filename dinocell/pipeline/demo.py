"""`make demo` (= `python pipeline.py demo`): the whole pipeline on a small synthetic bucket served by a local S3 server.

Starts a real S3 endpoint on 127.0.0.1, writes a synthetic cpg0000-shaped source into a public-read bucket, then runs
the Kubeflow pipeline locally (`kfp.local`, one subprocess per step: the same components a cluster runs) with the
tiny training config, and prints the evaluation table, where the model was published and the path of the HTML
report (copied to `<workdir>/eval/report.html`). With `--steps` it calls the step functions directly instead of
going through KFP (same step entries, same object-storage layout; quicker to debug).

pipeline.py passes its pipeline function in (`main(argv, pipeline_func)`), so this module never imports the
repository's pipeline.py or components/.

Training continues from the shipped tiny start (`--start shipped`, the default: dinocell/assets/tiny-start, a tiny ViT
trained from scratch by bench/train_tiny_start.py with the `tiny_start` config), the way the cluster path continues
from DINOv3's weights: the start is uploaded to the local S3 server like any pretrained checkpoint and set as
model.pretrained. A from-scratch tiny model needs thousands of CPU iterations before the independent-view headline
moves (README), which a demo cannot give it; `--start none` trains from random weights instead.

Default sizes are chosen to finish in about a minute on two CPU cores: 1 batch x 3 plates x 24 wells x 2 sites of
192 px fields (one plate held out: 48 fields), site variation 0.5, 80 training iterations; `tests/test_learning.py`
runs the full 600-iteration tiny schedule from scratch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dinocell import storage
from dinocell.config.step_args import configure_storage
from dinocell.log import get_logger, setup_logging
from dinocell.pipeline.in_process import run_all_steps
from dinocell.pipeline.local import run_local
from dinocell.pipeline.outcome import copy_prefix
from dinocell.storage.local_server import create_bucket, local_s3_server

log = get_logger("demo")

BUCKET = "cellpainting-gallery"
SOURCE = f"s3://{BUCKET}/cpg0000-jump-pilot/source_4"
OUTPUT_BUCKET = "dinocell-demo"
OUTPUTS = f"s3://{OUTPUT_BUCKET}/runs"
MODELS = f"s3://{OUTPUT_BUCKET}/models"
# Training length of the demo: enough iterations to see the losses move, short enough for two CPU cores.
DEMO_OVERRIDES = ("train.max_iters=80", "train.log_every=10", "train.ckpt_every=0", "train.vis_every=0")
# The shipped start (a published model folder) and where the demo puts it, as a user puts DINOv3's weights.
SHIPPED_START = Path(__file__).resolve().parents[1] / "assets" / "tiny-start"
START_PREFIX = f"s3://{OUTPUT_BUCKET}/pretrained/tiny-start"
# Continued pretraining from the start: its architecture's untied CLS norm, and a schedule of the demo's length
# (warm-up epoch then cosine) at a tenth of the from-scratch lr, as the full config does for DINOv3's weights.
START_OVERRIDES = ("model.untie_cls_and_patch_norms=true", "optim.epochs=2", "optim.lr=5.0e-5")


def upload_start(start: Path = SHIPPED_START, prefix: str = START_PREFIX) -> str:
    """Copy the shipped start (every file, `latest` included) under `prefix`; returns its weights' URI."""
    version = json.loads((start / "latest").read_text())["version"]
    for path in sorted(p for p in start.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(prefix, *path.relative_to(start).parts), path.read_bytes())
    return storage.join(prefix, version, "model.safetensors")


def synth_demo_bucket(args) -> None:
    from dinocell.synth.bucket import synth_bucket

    t0 = time.perf_counter()
    report = synth_bucket(SOURCE, batches=args.batches, plates_per_batch=args.plates, wells_per_plate=args.wells,
                          sites_per_well=args.sites, size=args.size, seed=args.seed,
                          site_variation=args.site_variation)
    print(report.summary())
    log.info("synthetic bucket written in %.1fs", time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python pipeline.py demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo", help="local directory for the run (KFP outputs, report copy)")
    ap.add_argument("--batches", type=int, default=1)
    ap.add_argument("--plates", type=int, default=3, help="plates per batch")
    ap.add_argument("--wells", type=int, default=24,
                    help="wells per plate (24: 4 DMSO negative controls + 10 perturbations x 2 replicates on 5 "
                         "targets, the profiling layout)")
    ap.add_argument("--sites", type=int, default=2, help="sites per well")
    ap.add_argument("--size", type=int, default=192, help="field side in pixels (real JUMP: 1080)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--site-variation", type=float, default=0.5,
                    help="how much the sites of a well differ in confluence and cell state (dinocell synth "
                         "--site-variation; 0 = only in where the cells lie). 0.5 keeps the planted perturbations "
                         "visible to profiling and gives each field context of its own, as real sites have")
    ap.add_argument("--config", default="tiny_start", help="training config (packaged name or path)")
    ap.add_argument("--start", choices=("shipped", "none"), default="shipped",
                    help="continue from the shipped tiny start (its config: tiny_start), or train from random weights")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help=f"config override, applied after the demo's own ({' '.join(DEMO_OVERRIDES)})")
    ap.add_argument("--run-name", default="", help="run id under the output root (default: demo-<UTC time>)")
    ap.add_argument("--model-name", default="dinocell-demo")
    ap.add_argument("--model-version", default="", help="default: the run id")
    ap.add_argument("--steps", action="store_true", help="run the steps directly instead of through kfp.local")
    ap.add_argument("--verbose", action="store_true", help="print kfp.local's task logs here instead of <workdir>/kfp.log")
    return ap


def main(argv: list[str] | None = None, pipeline_func: Callable | None = None) -> int:
    """Run the demo; `pipeline_func` (pipeline.py's pipeline) is needed unless --steps."""
    args = build_parser().parse_args(argv)
    if not args.steps and pipeline_func is None:
        raise SystemExit("demo: the KFP path needs the pipeline: run `python pipeline.py demo` (or pass --steps)")
    if args.start == "shipped" and args.config != "tiny_start":
        raise SystemExit(f"demo: --start shipped continues the shipped tiny start, whose architecture is the "
                         f"tiny_start config's; --config {args.config} needs --start none")
    setup_logging()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the local S3 server's per-request lines
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = [*DEMO_OVERRIDES, *(START_OVERRIDES if args.start == "shipped" else ()), *args.overrides]
    run_name = args.run_name or time.strftime("demo-%Y%m%d-%H%M%S", time.gmtime())
    t0 = time.perf_counter()

    with local_s3_server() as server:
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint_url  # for the KFP step subprocesses
        configure_storage(server.endpoint_url)
        create_bucket(server.endpoint_url, BUCKET, public_read=True)
        create_bucket(server.endpoint_url, OUTPUT_BUCKET)
        print(f"local S3 server: {server.endpoint_url}")
        synth_demo_bucket(args)
        if args.start == "shipped":
            start_uri = upload_start()
            overrides.insert(len(DEMO_OVERRIDES), f"model.pretrained={start_uri}")
            print(f"pretrained start: {start_uri} (the shipped tiny start)")
        common = {"source": SOURCE, "outputs": OUTPUTS, "workdir": workdir, "config": args.config,
                  "overrides": overrides, "endpoint_url": server.endpoint_url, "run_name": run_name,
                  "model_name": args.model_name, "model_version": args.model_version, "models_prefix": MODELS}
        if args.steps:
            outcome = run_all_steps(**common)
        else:
            log_file = None if args.verbose else workdir / "kfp.log"
            if log_file is not None:
                print(f"running the pipeline with kfp.local (step logs: {log_file}) ...", flush=True)
            outcome = run_local(pipeline_func, **common, log_file=log_file)
        # The server lives in memory: keep what the run made on disk, so the model loads after the demo.
        models_dir, run_dir = workdir / "models" / args.model_name, workdir / "run"
        copy_prefix(storage.join(MODELS, args.model_name), models_dir)
        copy_prefix(outcome.layout.root, run_dir)
        # The manifest and shards live outside the run (content-addressed, shared by runs): copy them in too.
        if outcome.manifest_uri:
            copy_prefix(outcome.manifest_uri.rsplit("/", 1)[0], run_dir)
        if outcome.shards_uri:
            copy_prefix(outcome.shards_uri.rsplit("/", 1)[0], run_dir / "shards")
    print()
    print(outcome.format())
    rel = os.path.relpath(models_dir)
    print(f"on disk:         {models_dir} (published model), {run_dir} (manifest, shards, checkpoints, evaluation)")
    print(f'load it:         python -c "import dinocell; print(dinocell.load_pretrained(\'{rel}\'))"')
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
