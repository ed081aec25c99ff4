"""The `dinocell` command: one subcommand per pipeline step, each a thin layer over the package.

    dinocell synth     --out s3://bucket/cpg0000-jump-pilot/source_4 [--size 256 ...]
    dinocell discover  --config C [--set data.batches=[...]] --out manifest.parquet
    dinocell shard     --config C --manifest M --out s3://.../shards
    dinocell pretrain  --config C [--set ...]
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

from dinocell.log import get_logger, setup_logging

log = get_logger("cli")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config: path, s3:// URI or packaged name (tiny, vits8_jump)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=1e-4 (repeatable)")


def _load_cfg(args):
    from dinocell import storage
    from dinocell.config import load_config, resolve_config_path

    path = resolve_config_path(args.config) if args.config else None
    cfg = load_config(path, args.overrides)
    storage.configure(cfg.storage)
    return cfg


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
        with_illum=not args.no_illum, faults=faults,
    )
    print(report.summary())
    log.info("synthesised %s in %.1fs", args.out, time.perf_counter() - t0)
    return 0


def cmd_discover(args) -> int:
    from dinocell.jump.discover import discover_fields, write_discovery

    cfg = _load_cfg(args)
    if args.images_prefix:
        cfg.data.images_prefix = args.images_prefix
    if args.load_data:
        cfg.data.load_data = list(args.load_data)
    out = args.out or cfg.data.manifest
    if not out:
        raise SystemExit("dinocell discover: give --out or data.manifest (where to write the field manifest)")
    result = discover_fields(cfg.data, mode=args.mode)
    write_discovery(result, out)
    print(result.format_summary())
    print(f"manifest: {out}")
    return 0


def cmd_shard(args) -> int:
    from dinocell.data.shards import write_shards
    from dinocell.jump.manifest import Manifest

    cfg = _load_cfg(args)
    manifest_uri = args.manifest or cfg.data.manifest
    out = args.out or cfg.shard.output
    if not manifest_uri or not out:
        raise SystemExit("dinocell shard: give --manifest (or data.manifest) and --out (or shard.output)")
    if args.split:
        cfg.shard.split = args.split
    manifest = Manifest.read(manifest_uri)
    index = write_shards(manifest, out, cfg.shard, cfg.preprocess)
    print(index.format_summary())
    return 0


def cmd_pretrain(args) -> int:
    from dinocell.train.trainer import pretrain

    cfg = _load_cfg(args)
    result = pretrain(cfg)
    if result is not None and os.environ.get("RANK", "0") == "0":
        print(f"final checkpoint: {result.final_checkpoint}\nrun directory: {result.run_dir}")
    return 0


def cmd_evaluate(args) -> int:
    from dinocell.eval.run import evaluate_cli

    cfg = _load_cfg(args)
    if args.channels:
        args.channels = [c.strip() for c in args.channels.split(",") if c.strip()]
    return evaluate_cli(cfg, args)


def cmd_publish(args) -> int:
    from dinocell.publish.publish import publish_cli

    cfg = _load_cfg(args)
    return publish_cli(cfg, args)


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
    ap = argparse.ArgumentParser(prog="dinocell", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    from dinocell.config import ConfigError

    try:
        return args.fn(args) or 0
    except ConfigError as e:
        print(f"dinocell {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
