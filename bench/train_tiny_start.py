"""Train and publish the shipped tiny start (`dinocell/assets/tiny-start`): a from-scratch tiny ViT that learned field
identity under independent views, which the tests and the demo use the way the cluster path uses DINOv3's weights.

  python bench/train_tiny_start.py --workdir /tmp/tiny-start [--iters 12000] [--threads 1]
         [--publish-to dinocell/assets] [--version 1]     # about 40 min on one core of the 2-core CI machine

Why it is shipped: on CPU a from-scratch DINO run needs 8-40 minutes before its CLS tells held-out fields apart under
the evaluation's independent views (bench/measured/multiview_recipe_2026-12-03.md), more than `make test` can give
it. The data it trains on is its own synthetic bucket (data seed 1, 6 training plates), never the fields the tests and
the demo evaluate on (their buckets are drawn from other seeds).

The recipe is the packaged `tiny_start` config (configs/tiny_start.yaml: the tiny config plus what the measured runs
showed identity needs, each change commented there). The training uses the pipeline's own steps: synthetic bucket ->
discover -> shard -> pretrain -> publish (which folds the head's input BatchNorm into the published CLS).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from ablation_multiview import add_data_args, data_overrides, prepare_data, resolve_config_path  # bench/ on the path

from dinocell.config import load_config
from dinocell.publish.publish import publish_checkpoint
from dinocell.train.step import pretrain

NAME = "tiny-start"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(ap)
    ap.set_defaults(plates=8, wells=24, sites=2, size=192, data_seed=1, site_variation=1.0, val_fraction=0.25,
                    config="tiny_start")
    ap.add_argument("--workdir", required=True, help="synthetic bucket, shards and the training run")
    ap.add_argument("--iters", type=int, default=12000)
    ap.add_argument("--seed", type=int, default=0, help="train.seed and loader.seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--publish-to", default=str(Path(__file__).resolve().parents[1] / "dinocell" / "assets"))
    ap.add_argument("--version", default="1")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    manifest, index = prepare_data(args, work)
    base = load_config(resolve_config_path(args.config))
    cfg = load_config(resolve_config_path(args.config), [
        *data_overrides(args), f"optim.epochs={max(1, args.iters // base.optim.iters_per_epoch)}",
        f"data.images_prefix={work / 'source' / 'images'}",  # the stored config (and the model card) name the source
        f"loader.shards={index}", f"data.manifest={manifest}", f"train.output_dir={work / 'runs'}",
        f"train.run_name={NAME}", f"train.max_iters={args.iters}", f"train.seed={args.seed}",
        f"loader.seed={args.seed}", "train.ckpt_every=2000", "train.vis_every=0", "train.progress=false",
        "train.log_every=200",
    ])
    t0 = time.perf_counter()
    result = pretrain(cfg)
    print(f"trained {result.iterations} iterations in {time.perf_counter() - t0:.0f}s: {result.final_checkpoint}")
    published = publish_checkpoint(result.final_checkpoint, args.publish_to, NAME, args.version)
    print(published.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
