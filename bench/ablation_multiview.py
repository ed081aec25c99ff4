#!/usr/bin/env python3
"""The multi-view ablation (issue 8 section 4): does multi-view channel consistency beat the naive crop designs?

  python bench/ablation_multiview.py --out bench/results/ablation_multiview [--iters 600] [--seeds 0 1 2]
         [--policies multiview mean_only single_only] [--plates 3] [--wells 6] [--sites 4] [--size 256]
         [--config tiny] [--set KEY=VALUE ...] [--eval-fields 256] [--threads 1] [--jobs 1] [--workdir DIR]

One synthetic JUMP-layout bucket (dinocell.synth.bucket.synth_bucket, a local directory), discovered
(dinocell.jump.step.discover: one plate in three held out) and sharded (dinocell.data.step.shard) once; then for each
seed and each `augment.crop_policy` the same training run (dinocell.train.step.pretrain: same data, config,
iterations and seed; the policies share every random draw but the channel choice, see dinocell.data.multiview),
each evaluated on the held-out plate (dinocell.eval.evaluate.run_evaluation, with the random-init baseline and
whatever pixel baselines the evaluation reports). --jobs N trains and evaluates N runs at a time, each in its own
process with --threads torch threads (the data is prepared once, before). Writes to --out:

  ablation.md    one table: a row per policy (and per baseline), mean ± sample std over the seeds (n runs)
  ablation.json  the same summary, every run's extracted metrics, the settings, and which metric keys were found
  runs/, eval/   the training runs and evaluation reports (under --workdir, default <out>/work)

The metrics come from each evaluation's metrics.json through `extract_metrics`, which reads keys defensively (the
evaluation's "table" rows, the numeric leaves of a "profiling" section) and prints what it found, so the script
follows the evaluation as it grows (pixel baselines, copairs mAP) without changes elsewhere.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from dinocell.config import load_config, resolve_config_path
from dinocell.config.augment import CROP_POLICIES

# Columns of the Markdown table (every key found is in ablation.json): keys ending with these, i.e. the held-out
# channel-consistency numbers of the evaluation's table rows ("[<sampling>/]<embedding>/<views>/<metric>"), then
# the per-model copairs mAP of the "profiling" section when the evaluation reports one.
HEADLINE = (
    "cls/fluorescent/gap",
    "cls/fluorescent/top1",
    "cls/fluorescent/mrr",
    "patch_mean/fluorescent/gap",
    "patch_mean/fluorescent/top1",
)
PROFILING_HEADLINE = (  # "profiling/<path>" keys shown as columns (the others, e.g. per control type, in the JSON)
    "profiling/activity/mean_map",
    "profiling/activity/fraction_retrieved",
    "profiling/consistency/mean_map",
    "profiling/consistency/fraction_retrieved",
)
# When the evaluation samples views both ways, the table shows independent views only: aligned views (the same box
# in every channel) are solvable from the field's layout alone (pixel baselines reach top-1 = 1.0).
PREFERRED_SAMPLING = "independent/"
# Fields of a table row that name it (in this order in the key); other string fields are appended sorted.
ROW_NAME_FIELDS = ("sampling", "embedding", "views")
NOT_IN_KEY = ("model", "model_id")
CHECKPOINT_MODEL = "checkpoint"  # the evaluated model's name in metrics.json
INIT_MODELS = ("baseline", "initial weights")  # the random-init baseline's name there (older / newer evaluation)
INIT_LABEL = "random init"


# ------------------------------------------------------------------------------------------- metric extraction


def extract_metrics(metrics: dict) -> dict[str, dict[str, float]]:
    """{model name: {key: value}} from one evaluation's metrics.json, read defensively.

    Table rows ({"model", "embedding", "views", metric: number, ...}, with "sampling" in newer evaluations) give
    "[<sampling>/]<embedding>/<views>/<metric>" for each numeric field (every string field but the model's names is
    part of the key, so no two rows collide); a "profiling" section gives "profiling/<path>" for each numeric leaf:
    per model from its "models" mapping (keyed by the rows' "model_id" or the model name), the rest (data counts)
    as "profiling/data/<path>" under the checkpoint; a section without "models" all under the checkpoint. Anything
    else is ignored;
    rows without "model" and keys seen twice (the first value is kept) are counted and reported.
    """
    found: dict[str, dict[str, float]] = {}
    rows = metrics.get("table") if isinstance(metrics, dict) else None
    unnamed, repeated = 0, []
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict) or "model" not in row:
            unnamed += 1
            continue
        names = [k for k in ROW_NAME_FIELDS if isinstance(row.get(k), str)]
        names += sorted(k for k, v in row.items() if isinstance(v, str) and k not in ROW_NAME_FIELDS + NOT_IN_KEY)
        prefix = "/".join(str(row[k]) for k in names)
        into = found.setdefault(str(row["model"]), {})
        for key, value in row.items():
            if _is_number(value):
                full = f"{prefix}/{key}" if prefix else key
                if full in into:
                    repeated.append(f"{row['model']}:{full}")
                    continue
                into[full] = float(value)
    if unnamed:
        print(f"extract_metrics: {unnamed} table rows without a 'model' key ignored", file=sys.stderr)
    if repeated:
        print(f"extract_metrics: {len(repeated)} repeated keys (first value kept), e.g. {repeated[:3]}",
              file=sys.stderr)
    profiling = metrics.get("profiling") if isinstance(metrics, dict) else None
    if isinstance(profiling, dict):
        name_of = {str(k): str(v["label"]) for k, v in (metrics.get("models") or {}).items()
                   if isinstance(v, dict) and "label" in v}  # e.g. the profiling-only CellProfiler row
        name_of.update({str(r["model_id"]): str(r["model"]) for r in rows or [] if isinstance(r, dict)
                        and "model_id" in r and "model" in r})
        models = profiling.get("models")
        if isinstance(models, dict):
            for model_id, section in models.items():
                into = found.setdefault(name_of.get(str(model_id), str(model_id)), {})
                into.update({f"profiling/{path}": v for path, v in _numeric_leaves(section)})
            rest = {k: v for k, v in profiling.items() if k != "models"}
            found.setdefault(CHECKPOINT_MODEL, {}).update(
                {f"profiling/data/{path}": v for path, v in _numeric_leaves(rest)})
        else:
            found.setdefault(CHECKPOINT_MODEL, {}).update(
                {f"profiling/{path}": v for path, v in _numeric_leaves(profiling)})
    return found


def _numeric_leaves(node, path: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numeric_leaves(value, f"{path}/{key}" if path else str(key))
    elif _is_number(node):
        yield path, float(node)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------- the table


def summarise(runs: list[dict], columns: list[str] | None = None) -> list[dict]:
    """Per label (run["policy"], in order of first appearance): {key: {"mean", "std", "n"}} over its runs;
    std is the sample standard deviation (0.0 for one run)."""
    labels = list(dict.fromkeys(r["policy"] for r in runs))
    keys = columns or list(dict.fromkeys(k for r in runs for k in r["metrics"]))
    out = []
    for label in labels:
        row: dict = {"policy": label}
        for key in keys:
            values = [r["metrics"][key] for r in runs if r["policy"] == label and key in r["metrics"]]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                row[key] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
        out.append(row)
    return out


def write_table(runs: list[dict], out_dir, meta: dict | None = None, columns: list[str] | None = None) -> list[dict]:
    """Write ablation.md (mean ± std (n) per label and column) and ablation.json; returns the summary rows."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs, columns)
    keys = columns or list(dict.fromkeys(k for r in runs for k in r["metrics"]))
    lines = ["| policy | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for row in summary:
        cells = []
        for key in keys:
            s = row.get(key)
            if s is None:
                cells.append("-")
            elif s["n"] > 1:
                cells.append(f"{s['mean']:.4f} ± {s['std']:.4f} ({s['n']})")
            else:
                cells.append(f"{s['mean']:.4f} ({s['n']})")
        lines.append(f"| {row['policy']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    header = "# Multi-view ablation\n\nHeld-out plate; mean ± sample std over seeds (number of runs).\n\n"
    if meta:
        header += "Settings: " + ", ".join(f"{k}={v}" for k, v in meta.items()) + "\n\n"
    (out_dir / "ablation.md").write_text(header + table)
    payload = {"format": "dinocell-ablation-multiview", "meta": meta or {}, "columns": keys, "summary": summary,
               "runs": runs}
    (out_dir / "ablation.json").write_text(json.dumps(payload, indent=1))
    return summary


def table_columns(runs: list[dict]) -> list[str]:
    """Keys some run has that end with a HEADLINE suffix (in HEADLINE order, then sorted; only the independent-view
    ones when there are any), then the PROFILING_HEADLINE keys present."""
    present = sorted({k for r in runs for k in r["metrics"]})
    columns = [k for suffix in HEADLINE for k in present if k == suffix or k.endswith("/" + suffix)]
    if any(k.startswith(PREFERRED_SAMPLING) for k in columns):
        columns = [k for k in columns if k.startswith(PREFERRED_SAMPLING)]
    return columns + [k for k in PROFILING_HEADLINE if k in present]


# ------------------------------------------------------------------------------------------- the runs


def add_data_args(ap: argparse.ArgumentParser) -> None:
    """The synthetic data's and the config's flags (shared with bench/invariance_ceiling.py)."""
    ap.add_argument("--plates", type=int, default=3, help="plates of the synthetic batch")
    ap.add_argument("--wells", type=int, default=6, help="wells per plate")
    ap.add_argument("--sites", type=int, default=4, help="fields per well")
    ap.add_argument("--size", type=int, default=256, help="synthetic field side in pixels")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic bucket")
    ap.add_argument("--site-variation", type=float, default=0.0,
                    help="synth site_variation: how much sites of a well differ (0 = only in cell positions)")
    ap.add_argument("--val-fraction", type=float, default=0.34, help="data.val_fraction (held-out plates)")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def data_overrides(args) -> list[str]:
    """The config overrides every step of a bench run shares: the held-out fraction, then the user's --set."""
    return [f"data.val_fraction={args.val_fraction}", *args.overrides]


def prepare_manifest(args, work: Path) -> str:
    """Synthetic bucket -> manifest with both splits (also used by bench/invariance_ceiling.py); its URI.

    args: the flags of `add_data_args`."""
    from dinocell import storage
    from dinocell.jump.step import discover
    from dinocell.synth.bucket import synth_bucket

    source = str(work / "source")
    report = synth_bucket(source, batches=1, plates_per_batch=args.plates, wells_per_plate=args.wells,
                          sites_per_well=args.sites, size=args.size, seed=args.data_seed, with_illum=False,
                          workers=2, site_variation=args.site_variation)
    print(report.summary())
    config = resolve_config_path(args.config)
    d = discover(config, data_overrides(args), manifest_uri=str(work / "manifest.parquet"),
                 images_prefix=storage.join(source, "images"))
    print(d.summary_text)
    if not d.fields_per_split.get("val") or not d.fields_per_split.get("train"):
        raise SystemExit(f"ablation: need fields in both splits, got {d.fields_per_split}; change --plates or "
                         "--val-fraction")
    return d.manifest_uri


def prepare_data(args, work: Path) -> tuple[str, str]:
    """Synthetic bucket -> manifest -> shards, once for every run; returns (manifest URI, shard index URI)."""
    from dinocell.data.step import shard

    t0 = time.perf_counter()
    manifest = prepare_manifest(args, work)
    s = shard(resolve_config_path(args.config), data_overrides(args), manifest_uri=manifest, shards_prefix=str(work / "shards"))
    print(f"data ready in {time.perf_counter() - t0:.1f}s, shards {s.totals}")
    return manifest, s.index_uri


def run_one(args, work: Path, manifest: str, index: str, policy: str, seed: int) -> dict:
    """Train one policy with one seed, evaluate it; returns the run record (metrics keyed per model)."""
    from dinocell.eval.evaluate import run_evaluation
    from dinocell.train.step import pretrain

    name = f"{policy}-seed{seed}"
    cfg = load_config(resolve_config_path(args.config), [
        *data_overrides(args),
        f"loader.shards={index}", f"data.manifest={manifest}", f"train.output_dir={work / 'runs'}",
        f"train.run_name={name}", f"train.max_iters={args.iters}", f"train.seed={seed}", f"loader.seed={seed}",
        f"augment.crop_policy={policy}", "train.ckpt_every=0", "train.vis_every=0", "train.progress=false",
    ])
    t0 = time.perf_counter()
    result = pretrain(cfg)
    train_s = time.perf_counter() - t0
    eval_dir = work / "eval" / name
    evaluation = run_evaluation(result.final_checkpoint, manifest, cfg, str(eval_dir), baseline="init",
                                max_fields=args.eval_fields, visuals=False)
    metrics_file = eval_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else evaluation.metrics
    found = extract_metrics(metrics)
    print(f"{name}: trained {result.iterations} iterations in {train_s:.0f}s, final losses "
          f"{ {k: round(v, 4) for k, v in result.final_losses.items()} }")
    print(f"  metrics.json models and metric keys found: { {model: len(v) for model, v in found.items()} }")
    return {"policy": policy, "seed": seed, "iterations": result.iterations, "train_seconds": round(train_s, 1),
            "final_losses": result.final_losses, "eval_dir": str(eval_dir), "models": found}


def _run_in_worker(args, work: Path, manifest: str, index: str, policy: str, seed: int) -> dict:
    torch.set_num_threads(args.threads)  # a spawned process starts with torch's default (every core)
    return run_one(args, work, manifest, index, policy, seed)


def run_all(args, work: Path, manifest: str, index: str, plan: list[tuple[str, int]]) -> list[dict]:
    """The records of every (policy, seed) in plan, in plan order; args.jobs runs at a time in spawned processes
    (each run is single-threaded, so runs in parallel use the cores that one run leaves idle)."""
    if args.jobs <= 1 or len(plan) == 1:
        return [run_one(args, work, manifest, index, policy, seed) for policy, seed in plan]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(args.jobs, len(plan)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_in_worker, args, work, manifest, index, policy, seed) for policy, seed in plan]
        return [f.result() for f in futures]


def rows_of(records: list[dict]) -> list[dict]:
    """Table rows: each policy's checkpoint first, then the random-init baseline (its own row, per seed: the initial
    weights follow train.seed) and every other model of metrics.json (pixel baselines: the same for every policy,
    so taken once per seed)."""
    policies, others, seen_other = [], [], set()
    for r in records:
        models = r["models"]
        if CHECKPOINT_MODEL in models:
            policies.append({"policy": r["policy"], "seed": r["seed"], "metrics": models[CHECKPOINT_MODEL]})
        else:
            print(f"ablation: {r['policy']} seed {r['seed']}: no {CHECKPOINT_MODEL!r} rows in metrics.json",
                  file=sys.stderr)
        for model, values in models.items():
            if model == CHECKPOINT_MODEL or (model, r["seed"]) in seen_other:
                continue
            seen_other.add((model, r["seed"]))
            others.append({"policy": INIT_LABEL if model in INIT_MODELS else model, "seed": r["seed"],
                           "metrics": values})
    return policies + others


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory for ablation.md / ablation.json")
    ap.add_argument("--workdir", default="", help="data, runs and evaluations (default: <out>/work)")
    ap.add_argument("--iters", type=int, default=600, help="training iterations per run (tiny config: 600)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (train.seed, loader.seed)")
    ap.add_argument("--policies", nargs="+", default=list(CROP_POLICIES), choices=list(CROP_POLICIES))
    add_data_args(ap)
    ap.add_argument("--eval-fields", type=int, default=256, help="held-out fields evaluated per run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the tiny model gains nothing from more)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained and evaluated at a time, one process each")
    args = ap.parse_args(argv)
    if args.iters < 1:
        ap.error(f"--iters must be >= 1, got {args.iters}")
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.workdir) if args.workdir else out / "work"
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    manifest, index = prepare_data(args, work)
    plan = [(policy, seed) for seed in args.seeds for policy in args.policies]
    records = run_all(args, work, manifest, index, plan)
    rows = rows_of(records)
    keys = sorted({k for r in rows for k in r["metrics"]})
    print(f"metric keys found ({len(keys)}): {keys}")
    columns = table_columns(rows)
    missing = [h for h in HEADLINE if not any(k == h or k.endswith("/" + h) for k in keys)]
    if missing:
        print(f"headline keys not in metrics.json (left out of the table): {missing}")
    meta = {"config": args.config, "iters": args.iters, "seeds": args.seeds, "policies": args.policies,
            "plates": args.plates, "wells": args.wells, "sites": args.sites, "size": args.size,
            "data_seed": args.data_seed, "site_variation": args.site_variation, "val_fraction": args.val_fraction,
            "overrides": args.overrides, "jobs": args.jobs, "torch": torch.__version__}
    write_table(rows, out, meta=meta, columns=columns or None)
    json_path = out / "ablation.json"
    payload = json.loads(json_path.read_text())
    payload.update({"records": records, "metric_keys_found": keys, "seconds": round(time.perf_counter() - t0, 1)})
    json_path.write_text(json.dumps(payload, indent=1))
    print((out / "ablation.md").read_text())
    print(f"wrote {out / 'ablation.md'} and {json_path} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
