"""Where a checkpoint keeps field identity: its CLS scored raw, per-dimension standardised, and through its head's
BatchNorm, on the evaluation's own independent views.

  python bench/embedding_space.py --checkpoint RUN/checkpoints/ckpt-N.pt --manifest MANIFEST [--config RUN/config.yaml]
         [--max-fields 96] [--seed 0] [--out space.json]

A from-scratch tiny model's final LayerNorm spreads the CLS's dimensions over a 20x range of scales, and a head
with BatchNorm (`model.head_bn`) trains its prototypes on the standardised CLS, not the raw one; so the raw score
can hide what the objective learned. For the held-out fields' independent views (dinocell.eval.evaluate.view_specs,
the evaluation's seed), this prints CLS top-1 over the fluorescent channel pairs (the headline's numbers, chance
1 / fields) in three spaces:

  raw           the final LayerNorm's CLS (what the evaluation scores without a head BatchNorm)
  standardised  every dimension z-scored over all views of all scored fields (no labels; profiling standardises
                features the same way)
  head_bn       the checkpoint teacher's DINO-head BatchNorm in eval mode (running statistics and affine) folded
                into the CLS, when the head has one (dinocell.model.cls_fold): the space its prototypes score, and
                what the evaluation and a published model use

for the checkpoint and, in the same run, the pixel baselines and the positions-only probe (dinocell.eval.models):
a space that lifts them as much as the checkpoint is no evidence of learning.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from invariant_statistics import top1  # bench/ is the script's directory

from dinocell.config import load_config
from dinocell.eval.checkpoint_reader import load_backbone
from dinocell.eval.evaluate import load_eval_fields, view_specs
from dinocell.eval.models import EvalModel, embed_fields, reference_models
from dinocell.model.cls_fold import CLS_SPACE_FOLDED
from dinocell.train.checkpoint import CheckpointManager


def standardised(embs: dict, key: str = "cls") -> dict:
    """The views' `key` embeddings with every dimension z-scored over all views and fields together."""
    every = torch.cat([torch.as_tensor(v[key]).float() for v in embs.values()])
    mean, std = every.mean(0), every.std(0).clamp_min(1e-6)
    return {view: {**v, key: (torch.as_tensor(v[key]).float() - mean) / std} for view, v in embs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a training checkpoint file (ckpt-N.pt)")
    ap.add_argument("--manifest", required=True, help="the field manifest with the held-out split")
    ap.add_argument("--config", default="", help="the run's config (preprocessing of the fields; default: defaults)")
    ap.add_argument("--max-fields", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0, help="the independent views' seed (the evaluation's default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="JSON file for the numbers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ckpt = Path(args.checkpoint)
    state = CheckpointManager(str(ckpt.parent)).load(str(ckpt))  # verifies the integrity record
    model, info = load_backbone(state, which="teacher", in_chans=1, device="cpu", fold_head_norm=False)
    folded, folded_info = load_backbone(state, which="teacher", in_chans=1, device="cpu")
    cfg = load_config(args.config or None)
    fields = load_eval_fields(args.manifest, cfg, None, args.max_fields, "val")
    specs = view_specs(fields, args.seed)
    size = int(info.global_size or cfg.augment.global_size)
    entries = [EvalModel("checkpoint", "checkpoint", model, info.norm_mean, info.norm_std, "", info)]
    entries += reference_models((info.norm_mean, info.norm_std), "cpu")

    rows = {}
    for m in entries:
        embs = embed_fields(m, fields, size, "cpu", 32, "independent", specs)
        rows[m.id] = {"raw": top1(embs), "standardised": top1(standardised(embs))}
        if m.id == "checkpoint" and folded_info.cls_space == CLS_SPACE_FOLDED:
            head = EvalModel("checkpoint", "checkpoint", folded, info.norm_mean, info.norm_std, "", folded_info)
            rows[m.id]["head_bn"] = top1(embed_fields(head, fields, size, "cpu", 32, "independent", specs))
    result = {"checkpoint": str(ckpt), "iteration": state.get("iteration"), "n_fields": len(fields.images),
              "chance_top1": 1.0 / len(fields.images), "seed": args.seed, "cls_top1": rows}
    print(f"CLS top-1, fluorescent channel pairs, independent views of {len(fields.images)} held-out fields "
          f"(chance {1.0 / len(fields.images):.4f})")
    print(f"{'model':16s} {'raw':>8s} {'standardised':>13s} {'head_bn':>8s}")
    for model_id, r in rows.items():
        hb = f"{r['head_bn']:.4f}" if "head_bn" in r else "-"
        print(f"{model_id:16s} {r['raw']:8.4f} {r['standardised']:13.4f} {hb:>8s}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
