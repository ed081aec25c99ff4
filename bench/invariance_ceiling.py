#!/usr/bin/env python3
"""How much layout-free field identity do the held-out fields hold? A ceiling for issue 8's retrieval criterion.

  python bench/invariance_ceiling.py --out ceiling.json [--objective infonce|dino] [--steps 2000] [--batch 64]
         [--temp 0.1] [--lr 1e-3] [--warmup 200] [--curriculum 0] [--koleo -1] [--head-bn] [--no-decay-norms] [--centering 0] [--save MODEL.pt]
         [--view-size 0] [--downsample 0] [--plates 4 --wells 24 --sites 2 --size 192 --val-fraction 0.5]
         [--config tiny] [--set KEY=VALUE ...] [--workdir DIR]

The evaluation's headline (cross-channel top-1 under independent views, dinocell.eval.view_sampling) asks a model to
find a field from another channel's view with its own crop (area 0.32-1), flip and quarter turn. This script trains
the config's backbone *directly on that task* and nothing else: InfoNCE between two views of one field, each drawn
like the evaluation's (two different views among the mean view and the fluorescent channels, an independent crop
from view_sampling.DEFAULT_SCALE / DEFAULT_RATIO, one of the 8 orientations), on the training plates of the same
synthetic bucket the ablation uses (bench/ablation_multiview.py's data flags and helpers). Every --eval-every steps
its CLS embeddings of the held-out fields are scored by the evaluation's own code (view_specs, embed_fields,
analyse_embeddings: fluorescent channel pairs, CLS top-1), next to the pixel baselines scored once.

It is not a method (it is trained on the evaluation's own view distribution, with field identity as the label) but
a ceiling for a backbone of this size on this data: if it cannot get clearly above the pixel baseline, no
self-supervised run of the same backbone on the same data can be expected to (whether the data or the backbone is
short of it, bench/invariant_statistics.py tells: hand-crafted invariant statistics of the same views); if it can,
the self-supervised objective is what falls short. Prints one JSON line per
evaluation and writes the history to --out.

`--objective dino` trains the same backbone on the same views with the training's DINO term instead (an EMA teacher,
Sinkhorn-Knopp targets, the config's prototypes, temperatures and momentum, plus KoLeo; no local crops, no iBOT),
and scores the EMA teacher's backbone and its head's bottleneck too: it tells a shortfall of the objective from one
of the training's crop pipeline. `--curriculum N` starts the training views (either objective) from whole aligned
fields and reaches the evaluation's views after N steps.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ablation_multiview import add_data_args, data_overrides, prepare_manifest  # bench/ is the script's directory

from dinocell.channels import is_fluorescent
from dinocell.config import load_config, resolve_config_path
from dinocell.data.augment_ops import sample_crop_boxes
from dinocell.eval.evaluate import load_eval_fields, view_specs
from dinocell.eval.models import EvalModel, embed_fields, reference_models
from dinocell.eval.scoring import analyse_embeddings
from dinocell.eval.view_sampling import DEFAULT_RATIO, DEFAULT_SCALE, normalised_planes, render_boxes
from dinocell.loss import DINOLoss, KoLeoLoss, sinkhorn_knopp
from dinocell.model.vit import build_vit
from dinocell.train import ema
from dinocell.train.optim import no_weight_decay
from dinocell.train.ssl_model import build_head


def _random_views(planes: torch.Tensor, size: int, g: torch.Generator, min_scale: float = DEFAULT_SCALE[0],
                  element: torch.Tensor | None = None) -> torch.Tensor:
    """planes [n, H, W] -> [n, 1, size, size]: per plane an independent crop (area min_scale-1, default the
    evaluation's) and one of the 8 orientations (`element`, default dealt at random), rendered like the
    evaluation's views."""
    n, h, w = planes.shape
    boxes = sample_crop_boxes(n, h, w, (min_scale, DEFAULT_SCALE[1]), DEFAULT_RATIO, g, planes.device)
    element = torch.randint(0, 8, (n,), generator=g) if element is None else element
    return render_boxes(planes, boxes, element // 4 == 1, element % 4, size)[:, None]


def _curriculum(step: int, steps: int) -> tuple[float, float]:
    """(crop area lower bound, probability that view 2 is forced to view 1's orientation) at `step` of a
    `steps`-long curriculum: from whole aligned fields (0.9, 1) to the evaluation's views (DEFAULT_SCALE[0], 0:
    orientations dealt independently)."""
    t = min(step / steps, 1.0) if steps > 0 else 1.0
    return 0.9 + t * (DEFAULT_SCALE[0] - 0.9), 1.0 - t


def _score(models: list[EvalModel], fields, specs, size: int, prefix: str = "") -> dict[str, float]:
    """{prefix + model id: CLS top-1 over fluorescent channel pairs, independent views `specs`}."""
    out = {}
    for m in models:
        s = analyse_embeddings(embed_fields(m, fields, size, "cpu", 64, "independent", specs))["cls"]["summary"]
        out[prefix + m.id] = float(s["top1"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file for the history")
    ap.add_argument("--workdir", default="", help="the synthetic bucket and manifest (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64, help="fields per step (two views each)")
    ap.add_argument("--objective", choices=("infonce", "dino"), default="infonce",
                    help="infonce: the ceiling; dino: the training's DINO term (+ KoLeo) on the same views, to tell "
                         "the objective apart from the crop pipeline")
    ap.add_argument("--temp", type=float, default=0.1, help="InfoNCE temperature")
    ap.add_argument("--curriculum", type=int, default=0,
                    help="steps over which the training views go from whole aligned fields to the evaluation's "
                         "(0: the evaluation's from the start)")
    ap.add_argument("--koleo", type=float, default=-1.0, help="dino: KoLeo weight (default: the config's)")
    ap.add_argument("--head-bn", action="store_true",
                    help="dino: BatchNorm on the backbone's CLS before the DINO head (as the InfoNCE head has); "
                         "the same as --set model.head_bn=true")
    ap.add_argument("--no-decay-norms", dest="decay_norms", action="store_false",
                    help="no weight decay on biases, norm weights and tokens (the shipped trainer's rule); default: "
                         "weight decay 0.05 on every parameter")
    ap.add_argument("--centering", type=float, default=0.0,
                    help="dino: teacher targets by a running centre with this momentum (e.g. 0.9, DINO v1) instead of "
                         "Sinkhorn-Knopp (0)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW peak lr (linear warm-up, then cosine to 0)")
    ap.add_argument("--warmup", type=int, default=200,
                    help="warm-up steps (without, the ViT often sat at the uniform InfoNCE plateau, loss log(batch))")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--save", default="", help="write the trained objective's state_dict (torch.save) here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--view-size", type=int, default=0, help="view side (default: the config's augment.global_size)")
    ap.add_argument("--downsample", type=int, default=0, help="preprocess.downsample (default: the config's)")
    add_data_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        manifest = prepare_manifest(args, work)
        cfg = load_config(resolve_config_path(args.config),
                          [*data_overrides(args),
                           *([f"preprocess.downsample={args.downsample}"] if args.downsample else []),
                           *(["model.head_bn=true"] if args.head_bn else [])])
        fluo = [c for c in cfg.data.channels if is_fluorescent(c)] or None
        train = load_eval_fields(manifest, cfg, fluo, 0, "train")
        val = load_eval_fields(manifest, cfg, fluo, 0, "val")
    history = train_and_score(args, cfg, train, val, g)
    Path(args.out).write_text(json.dumps({"args": vars(args), "history": history}, indent=1))
    print(f"wrote {args.out}")


class _InfoNCE(torch.nn.Module):
    """Symmetric InfoNCE between the two views of each field, the other fields of the batch as negatives."""

    def __init__(self, backbone: torch.nn.Module, temp: float):
        super().__init__()
        self.backbone, self.temp = backbone, temp
        # BatchNorm in the projection head (as SimCLR's): without it the tiny ViT often settled on constant
        # embeddings (InfoNCE loss log(batch) from the start to the end of a run).
        self.head = torch.nn.Sequential(torch.nn.Linear(backbone.embed_dim, 256), torch.nn.BatchNorm1d(256),
                                        torch.nn.GELU(), torch.nn.Linear(256, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0] // 2
        z = F.normalize(self.head(self.backbone.forward_features(x)["x_norm_clstoken"]), dim=1)
        logits = z[:batch] @ z[batch:].T / self.temp
        target = torch.arange(batch)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    def after_step(self) -> None:
        pass


class _DINOTerm(torch.nn.Module):
    """The training's DINO global term on the two views (view 1 teaches view 2 and back; an EMA teacher, its
    Sinkhorn-Knopp targets at the config's teacher_temp, student_temp, prototypes and head) plus KoLeo on the
    student CLS of each view; no local crops, no iBOT. The teacher follows at optim.momentum_teacher.

    centering > 0: DINO v1's teacher instead of Sinkhorn-Knopp (DINOv2's `centering` option): softmax of the
    teacher logits minus their running batch mean (EMA with this momentum), at teacher_temp. Sinkhorn-Knopp gives
    every prototype the same share of each batch, which for more prototypes than rows splits the views of one
    field; the running centre does not tie the assignment to one batch."""

    def __init__(self, backbone: torch.nn.Module, cfg, koleo: float, centering: float = 0.0):
        super().__init__()
        # --head-bn (model.head_bn): the shipped head's BatchNorm; the EMA update copies its running statistics
        self.student = torch.nn.ModuleDict({"backbone": backbone, "head": build_head(cfg.model, backbone.embed_dim)})
        self.teacher = ema.build_teacher(self.student, build_vit(
            cfg.model.arch, **{**cfg.model.backbone_kwargs(student=False), "in_chans": 1}))
        self.loss_cfg, self.momentum = cfg.loss, float(cfg.optim.momentum_teacher)
        self.koleo_weight = cfg.loss.koleo_weight if koleo < 0 else koleo
        self.dino, self.koleo = DINOLoss(cfg.model.n_prototypes, cfg.loss.student_temp), KoLeoLoss()
        self.centering = float(centering)
        self.register_buffer("center", torch.zeros(1, cfg.model.n_prototypes))

    def parameters(self, recurse: bool = True):
        return self.student.parameters(recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0] // 2
        with torch.no_grad():
            self.teacher.eval()
            t_cls = self.teacher["backbone"].forward_features(x)["x_norm_clstoken"]
            t_logits = _logits(self.teacher, t_cls)
            if self.centering:
                targets = F.softmax((t_logits - self.center) / self.loss_cfg.teacher_temp, dim=-1)
                self.center.mul_(self.centering).add_((1 - self.centering) * t_logits.mean(0, keepdim=True))
            else:
                targets = sinkhorn_knopp(t_logits, self.loss_cfg.teacher_temp, self.loss_cfg.sinkhorn_iterations)
            targets = targets.unflatten(0, (2, batch))
        cls = self.student["backbone"].forward_features(x)["x_norm_clstoken"]
        global_loss, _ = self.dino(_logits(self.student, cls).unflatten(0, (2, batch)), None, targets)
        return global_loss + self.koleo_weight * self.koleo(cls.unflatten(0, (2, batch)))

    @torch.no_grad()
    def after_step(self) -> None:
        ema.update_teacher(self.teacher, self.student, self.momentum)


def _bottleneck(part: torch.nn.ModuleDict, cls: torch.Tensor) -> torch.Tensor:
    """The unit-norm bottleneck z of a student or teacher (`_DINOTerm` parts) for backbone CLS tokens."""
    return part["head"].forward_bottleneck(cls)


def _logits(part: torch.nn.ModuleDict, cls: torch.Tensor) -> torch.Tensor:
    """The prototype logits of a student or teacher for backbone CLS tokens."""
    return part["head"].forward_prototypes(_bottleneck(part, cls))


class _HeadProbe(torch.nn.Module):
    """A `_DINOTerm` student or teacher as an embedding model: "CLS" = the unit-norm bottleneck z its prototypes
    score (does the head hold more field identity than the backbone's CLS?)."""

    def __init__(self, part: torch.nn.ModuleDict):
        super().__init__()
        self.part, self.in_chans = part, 1

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.part["backbone"].forward_features(x)
        return {"x_norm_clstoken": _bottleneck(self.part, out["x_norm_clstoken"]),
                "x_norm_patchtokens": out["x_norm_patchtokens"]}


def _param_groups(objective: torch.nn.Module, decay_norms: bool) -> list[dict]:
    """AdamW groups of the trained parameters: weight decay on all (the default, as the runs in bench/measured were
    made), or, with --no-decay-norms, none on biases, norm weights and tokens (the shipped trainer's rule,
    dinocell.train.optim.no_weight_decay, as DINOv2's)."""
    trained = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    if decay_norms:
        return [{"params": [p for _, p in trained]}]
    return [{"params": [p for n, p in trained if not no_weight_decay(n)]},
            {"params": [p for n, p in trained if no_weight_decay(n)], "weight_decay": 0.0}]


def train_and_score(args, cfg, train, val, g: torch.Generator) -> list[dict]:
    size, norm = int(args.view_size or cfg.augment.global_size), (float(cfg.augment.norm_mean),
                                                                  float(cfg.augment.norm_std))
    backbone = build_vit(cfg.model.arch, **{**cfg.model.backbone_kwargs(student=False), "in_chans": 1})
    objective = (_InfoNCE(backbone, args.temp) if args.objective == "infonce"
                 else _DINOTerm(backbone, cfg, args.koleo, args.centering))
    opt = torch.optim.AdamW(_param_groups(objective, args.decay_norms), lr=args.lr, weight_decay=0.05)
    stack = torch.from_numpy(np.stack(train.images))
    planes = normalised_planes(stack, train.channels, *norm)  # {view: [N, 1, H, W]}
    names = list(planes)
    allp = torch.stack([planes[v][:, 0] for v in names], dim=1)  # [N, V, H, W]
    ref = reference_models(norm, "cpu", positions=False)
    models = [EvalModel("ceiling", f"{args.objective} student", backbone, *norm, f"{args.objective} on the evaluation's views")]
    if args.objective == "dino":  # DINO evaluates its EMA teacher
        models.append(EvalModel("teacher", "EMA teacher", objective.teacher["backbone"], *norm, "EMA teacher"))
        models.append(EvalModel("teacher_z", "EMA teacher head bottleneck",
                                _HeadProbe(objective.teacher), *norm, "z"))
    print(f"training fields {len(train.images)}, held-out {len(val.images)} (chance {1 / len(val.images):.4f}), "
          f"views {names}, size {size}", flush=True)
    # held-out fields (the evaluation's) and the training fields themselves (can the task be fitted at all?)
    val_specs, train_specs = view_specs(val, seed=0), view_specs(train, seed=0)  # the evaluation's, seed 0
    history = [{"step": 0, **_score(models + ref, val, val_specs, size),
                **_score(models + ref, train, train_specs, size, "train/")}]
    print(json.dumps(history[-1]), flush=True)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        if step <= args.warmup:
            lr = args.lr * step / args.warmup
        else:
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(args.steps - args.warmup, 1)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, allp.shape[0], (args.batch,), generator=g)
        a = torch.randint(0, len(names), (args.batch,), generator=g)
        b = (a + torch.randint(1, len(names), (args.batch,), generator=g)) % len(names)  # another view
        if args.curriculum:  # past its end: the evaluation's views, the orientations dealt by the same draws
            min_scale, p_same = _curriculum(step, args.curriculum)
            ea, eb = torch.randint(0, 8, (args.batch,), generator=g), torch.randint(0, 8, (args.batch,), generator=g)
            eb = torch.where(torch.rand(args.batch, generator=g) < p_same, ea, eb)
            x = torch.cat([_random_views(allp[idx, a], size, g, min_scale, ea),
                           _random_views(allp[idx, b], size, g, min_scale, eb)])
        else:  # the evaluation's views, drawn as the ceiling runs in bench/measured were
            x = torch.cat([_random_views(allp[idx, a], size, g), _random_views(allp[idx, b], size, g)])
        objective.train()
        loss = objective(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        objective.after_step()
        if step % args.eval_every == 0 or step == args.steps:
            objective.eval()
            history.append({"step": step, "loss": round(loss.item(), 4), "s": round(time.time() - t0, 1),
                            **_score(models, val, val_specs, size),
                            **_score(models, train, train_specs, size, "train/")})
            print(json.dumps(history[-1]), flush=True)
    if args.save:
        torch.save(objective.state_dict(), args.save)
    return history

if __name__ == "__main__":
    main()
