"""The `dinocell` command: one subcommand per pipeline step, each calling that step's one entry.

The same entries serve the KFP components and the demo: dinocell.jump.step.discover, dinocell.data.step.shard,
dinocell.launch.step.train (-> dinocell.train.step.pretrain), dinocell.eval.step.evaluate, dinocell.publish.step.publish.


    dinocell synth     --out s3://bucket/cpg0000-jump-pilot/source_4 [--size 256 ...]
    dinocell discover  --config C [--set data.batches=[...]] --out manifest.parquet
    dinocell shard     --config C --manifest M --out s3://.../shards
    dinocell pretrain  --config C [--set ...]           (the training process itself; torchrun runs it per GPU)
    dinocell train     --config C --output-dir D [--backend local|pytorchjob|trainjob ...]   (the pipeline's step)
    dinocell evaluate  --config C --checkpoint URI --manifest M --out DIR
    dinocell publish   --checkpoint URI --dest s3://models --name N --version V
    dinocell config    --config C [--set ...]          (print the resolved config)
    dinocell serve-s3  [--port P]                      (a local S3 server for demos)

Every subcommand takes `--config` (a path, s3:// URI or packaged name such as `tiny`) and repeated `--set key=value`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from dinocell._version import __version__
from dinocell.log import get_logger, setup_logging

log = get_logger("cli")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config: path, s3:// URI or packaged name (tiny, vits8_jump)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-4 (repeatable)")


def _load_cfg(args):
    from dinocell.config.step_args import load_step_config

    return load_step_config(args.config or "", args.overrides)


# --------------------------------------------------------------------------- subcommands


def cmd_config(args) -> int:
    print(_load_cfg(args).to_yaml(), end="")
    return 0


def cmd_synth(args) -> int:
    from dinocell.synth.bucket import SynthFaults, synth_bucket

    cfg = _load_cfg(args)
    del cfg
    faults = None
    if any((args.fault_missing, args.fault_corrupt, args.fault_truncated, args.fault_stray)):
        faults = SynthFaults(missing_channel=args.fault_missing, corrupt_tiff=args.fault_corrupt,
                             truncated_tiff=args.fault_truncated, stray_files=args.fault_stray)
    t0 = time.perf_counter()
    report = synth_bucket(
        args.out, batches=args.batches, plates_per_batch=args.plates, wells_per_plate=args.wells,
        sites_per_well=args.sites, size=args.size, seed=args.seed, csv_form=args.csv_form,
        with_illum=not args.no_illum, faults=faults, perturbations=args.perturbations, replicates=args.replicates,
        negcon_wells=args.negcon_wells, poscon=args.poscon, targets=args.targets, site_variation=args.site_variation,
    )
    print(report.summary())
    log.info("synthesised %s in %.1fs", args.out, time.perf_counter() - t0)
    return 0


def cmd_discover(args) -> int:
    from dinocell.jump.step import discover

    out = discover(args.config or "", args.overrides, manifest_uri=args.out or "", images_prefix=args.images_prefix or "",
                   load_data=list(args.load_data), mode=args.mode)
    print(out.summary_text)
    print(f"manifest: {out.manifest_uri}")
    return 0


def cmd_shard(args) -> int:
    from dinocell.data.step import shard

    out = shard(args.config or "", args.overrides, manifest_uri=args.manifest or "", shards_prefix=args.out or "",
                split=args.split or "")
    print(out.summary_text)
    return 0


def cmd_pretrain(args) -> int:
    from dinocell.train.step import pretrain

    result = pretrain(_load_cfg(args))
    if result is not None and os.environ.get("RANK", "0") == "0":
        print(f"final checkpoint: {result.final_checkpoint}\nrun directory: {result.run_dir}")
    return 0


def cmd_train(args) -> int:
    from dinocell.launch.step import train

    out = train(args.config or "", args.overrides, output_dir=args.output_dir, shards_index_uri=args.shards or "",
                manifest_uri=args.manifest or "", backend=args.backend, nodes=args.nodes,
                gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node, image=args.image or "",
                namespace=args.namespace or "", node_selector=args.node_selector or None,
                tolerations=args.tolerations or None, secret_name=args.secret_name)
    print(f"final checkpoint: {out.checkpoint_uri}\nrun outputs: {out.output_uri}")
    return 0


def cmd_evaluate(args) -> int:
    from dinocell.eval.step import evaluate

    out = evaluate(args.config or "", args.overrides, checkpoint_uri=args.checkpoint, out_uri=args.out,
                   manifest_uri=args.manifest or "", baseline=args.baseline, max_fields=args.max_fields,
                   channels=args.channels or (), split=args.split or "val", size=args.size, device=args.device,
                   view_mode=args.view_mode, seed=args.eval_seed, profiling=not args.no_profiling,
                   profile_fields=args.profile_fields, profile_normalisation=args.profile_normalisation,
                   profile_null_size=args.profile_null_size, cellprofiler=not args.no_cellprofiler)
    print(f"evaluation report: {out.report_uri}")
    return 0


def cmd_publish(args) -> int:
    from dinocell.publish.step import publish

    out = publish(args.checkpoint, dest_prefix=args.dest, name=args.name, version=args.version,
                  metrics_uri=args.metrics or "", config=args.config or "", overrides=args.overrides)
    print(out.summary)
    return 0


def cmd_serve_s3(args) -> int:
    from dinocell.storage.local_server import create_bucket, local_s3_server

    with local_s3_server(args.port) as server:
        for b in args.bucket:
            create_bucket(server.endpoint_url, b, public_read=args.public)
        print(f"S3 endpoint: {server.endpoint_url}  (export AWS_ENDPOINT_URL={server.endpoint_url})", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from dinocell.launch.step import DEFAULT_SECRET  # no torch, no kubernetes client

    ap = argparse.ArgumentParser(prog="dinocell", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"dinocell {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("synth", help="write a synthetic JUMP-layout bucket (local dir or s3:// prefix)")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="source root, e.g. s3://bucket/cpg0000-jump-pilot/source_4")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--plates", type=int, default=2, help="plates per batch")
    p.add_argument("--wells", type=int, default=4, help="wells per plate")
    p.add_argument("--sites", type=int, default=2, help="sites per well")
    p.add_argument("--size", type=int, default=1080, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv-form", choices=["url", "filename"], default="url")
    p.add_argument("--no-illum", action="store_true", help="do not write illumination functions")
    p.add_argument("--fault-missing", type=int, default=0, help="plant N missing channel files")
    p.add_argument("--fault-corrupt", type=int, default=0, help="plant N corrupt TIFFs")
    p.add_argument("--fault-truncated", type=int, default=0, help="plant N truncated TIFFs")
    p.add_argument("--fault-stray", type=int, default=0, help="plant N stray files")
    p.add_argument("--perturbations", type=int, default=None,
                   help="planted perturbations (default: as many as the wells hold)")
    p.add_argument("--replicates", type=int, default=2, help="wells per perturbation on each plate")
    p.add_argument("--negcon-wells", type=int, default=None, help="DMSO wells per plate (default: ~1 in 6)")
    p.add_argument("--poscon", type=int, default=0, help="positive-control perturbations (strong effects)")
    p.add_argument("--targets", type=int, default=None, help="targets shared by the perturbations (default: half)")
    p.add_argument("--site-variation", type=float, default=0.0,
                   help="how much sites of a well differ in confluence and cell state (0 = only in cell positions)")
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("discover", help="find fields (load_data CSVs or listing) and write the field manifest")
    _add_config_args(p)
    p.add_argument("--images-prefix", default=None, help="overrides data.images_prefix")
    p.add_argument("--load-data", action="append", default=[], help="load_data CSV URI or prefix (repeatable)")
    p.add_argument("--mode", choices=["auto", "load_data", "listing"], default="auto")
    p.add_argument("--out", default=None, help="manifest URI (default: data.manifest)")
    p.set_defaults(fn=cmd_discover)

    p = sub.add_parser("shard", help="preprocess a manifest into tar shards")
    _add_config_args(p)
    p.add_argument("--manifest", default=None)
    p.add_argument("--out", default=None, help="shard prefix (default: shard.output)")
    p.add_argument("--split", choices=["train", "val", "all"], default=None)
    p.set_defaults(fn=cmd_shard)

    p = sub.add_parser("pretrain", help="SSL continued pretraining (run under torchrun for several GPUs)")
    _add_config_args(p)
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("train", help="the pipeline's train step: write the run config, train with a backend "
                       "(local / pytorchjob / trainjob) and report the final checkpoint")
    _add_config_args(p)
    p.add_argument("--output-dir", required=True, help="run output root: <output-dir>/train/checkpoints/...")
    p.add_argument("--shards", default=None, help="shard index.json URI (default: loader.shards)")
    p.add_argument("--manifest", default=None, help="field manifest (default: data.manifest)")
    p.add_argument("--backend", choices=["local", "pytorchjob", "trainjob"], default="local")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--nproc-per-node", type=int, default=0, help="0: one per GPU (or 1)")
    p.add_argument("--image", default=None, help="CUDA training image (k8s backends)")
    p.add_argument("--namespace", default=None)
    p.add_argument("--node-selector", default=None, help='JSON mapping, e.g. {"nvidia.com/gpu.product": "..."}')
    p.add_argument("--tolerations", default=None, help="JSON list of tolerations")
    p.add_argument("--secret-name", default=DEFAULT_SECRET, help="storage credentials Secret (k8s backends)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="channel-consistency evaluation of a checkpoint")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--manifest", default=None)
    p.add_argument("--out", required=True, help="report directory or s3:// prefix")
    p.add_argument("--baseline", default="init", help="'init' (the initial weights), 'none', or a checkpoint URI")
    p.add_argument("--max-fields", type=int, default=None, help="held-out fields to embed (default 256)")
    p.add_argument("--channels", default=None, help="comma-separated channels (default: the manifest's)")
    p.add_argument("--size", type=int, default=None, help="view size in pixels (default: the global crop size)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    p.add_argument("--split", default=None, help="manifest split to evaluate (default: val)")
    p.add_argument("--view-mode", default="both", choices=["independent", "aligned", "both"],
                   help="independent: a random crop/flip/turn per view (the headline); aligned: whole fields "
                        "(layout-solvable)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the independent views and the mAP null")
    p.add_argument("--no-profiling", action="store_true", help="skip the copairs mAP of well profiles")
    p.add_argument("--profile-fields", type=int, default=None,
                   help="profiling: whole held-out plates up to this many fields (default 2048, 0 = all)")
    p.add_argument("--profile-normalisation", default="mad", choices=["mad", "spherize", "mad+spherize", "none"],
                   help="per-plate normalisation against negative controls")
    p.add_argument("--profile-null-size", type=int, default=10000, help="copairs null size for the p-values")
    p.add_argument("--no-cellprofiler", action="store_true",
                   help="profiling without the CellProfiler-features row (cp_measure; ~0.6 s per 256 px field and core)")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("publish", help="publish a checkpoint's teacher backbone as a versioned model")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dest", required=True, help="models prefix, e.g. s3://bucket/models")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--metrics", default=None, help="evaluation metrics JSON URI to include")
    p.set_defaults(fn=cmd_publish)

    p = sub.add_parser("serve-s3", help="run a local S3 server (for demos) until interrupted")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--bucket", action="append", default=[])
    p.add_argument("--public", action="store_true", help="create buckets public-read")
    p.set_defaults(fn=cmd_serve_s3)
    return ap


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that mean the input is wrong (a path, a URI, a config field, credentials): one line, no traceback."""
    from dinocell.config import ConfigError
    from dinocell.config.step_args import StepError
    from dinocell.storage import StorageError
    from dinocell.train.checkpoint import CheckpointUnreadable

    return (ConfigError, StepError, StorageError, CheckpointUnreadable, FileNotFoundError, PermissionError,
            ValueError, KeyError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("DEBUG" if args.debug else None)
    try:
        return args.fn(args) or 0
    except _user_error_types() as e:
        if args.debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"dinocell {args.command}: {message}  (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dinocell {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
