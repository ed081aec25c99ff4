"""`make demo` (= `python pipeline.py demo`): the whole pipeline on a small synthetic bucket served by a local S3 server.

Starts a real S3 endpoint on 127.0.0.1, writes a synthetic cpg0000-shaped source into a public-read bucket, then runs
the Kubeflow pipeline locally (`kfp.local`, one subprocess per step: the same components a cluster runs) with the
tiny training config, and prints the evaluation table, where the model was published and the path of the HTML
report (copied to `<workdir>/eval/report.html`). With `--steps` it calls the step functions directly instead of
going through KFP (same step entries, same object-storage layout; quicker to debug).

pipeline.py passes its pipeline function in (`main(argv, pipeline_func)`), so this module never imports the
repository's pipeline.py or components/.

Default sizes are chosen to finish in a few minutes on two CPU cores: 1 batch x 3 plates x 4 wells x 2 sites of
192 px fields, 80 training iterations (2 tiny-config epochs of 40): enough for the held-out evaluation to move
away from the random-init baseline; `tests/test_learning.py` runs the full 600-iteration tiny schedule.
"""

from __future__ import annotations

import argparse
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


def synth_demo_bucket(args) -> None:
    from dinocell.synth.bucket import synth_bucket

    t0 = time.perf_counter()
    report = synth_bucket(SOURCE, batches=args.batches, plates_per_batch=args.plates, wells_per_plate=args.wells,
                          sites_per_well=args.sites, size=args.size, seed=args.seed)
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
    ap.add_argument("--config", default="tiny", help="training config (packaged name or path)")
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
    setup_logging()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the local S3 server's per-request lines
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = [*DEMO_OVERRIDES, *args.overrides]
    run_name = args.run_name or time.strftime("demo-%Y%m%d-%H%M%S", time.gmtime())
    t0 = time.perf_counter()

    with local_s3_server() as server:
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint_url  # for the KFP step subprocesses
        configure_storage(server.endpoint_url)
        create_bucket(server.endpoint_url, BUCKET, public_read=True)
        create_bucket(server.endpoint_url, OUTPUT_BUCKET)
        print(f"local S3 server: {server.endpoint_url}")
        synth_demo_bucket(args)
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
