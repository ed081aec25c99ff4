"""`dinocell evaluate`: channel consistency of a checkpoint on held-out fields, next to its initial weights.

For up to `max_fields` fields of the manifest's held-out split (chosen deterministically: ordered by the sha256 of
their field id, which spreads them over plates), every channel is embedded on its own and the mean of the
fluorescent channels as one more view (dinocell.monitor.consistency), with the teacher backbone of the checkpoint and
with the baseline. Brightfield channels are evaluated when the manifest has them (or `channels` names them): the seed
claims transfer to brightfield, so it is measured (brightfield views against fluorescent views), not assumed.

Per model (checkpoint, baseline) and embedding ("cls", "patch_mean"): the same-field channel x channel cosine matrix,
the different-field matrix (collapse guard), cross-channel retrieval (top-1, MRR), the seed's single number
(mean off-diagonal same-field similarity) next to the same-minus-different gap. Fields that fail to load are
skipped, counted and listed in the report. Everything is written by dinocell.eval.report.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dinocell import storage
from dinocell.channels import ALL_CHANNELS, BRIGHTFIELD_CHANNELS, FLUORESCENT_CHANNELS
from dinocell.data.fields import FieldLoader
from dinocell.eval.checkpoint_reader import BackboneInfo, load_backbone, load_init_backbone
from dinocell.jump.manifest import Manifest
from dinocell.log import get_logger
from dinocell.monitor import consistency

__all__ = [
    "DEFAULT_MAX_FIELDS",
    "EMBEDDING_KEYS",
    "EvalFields",
    "EvalResult",
    "analyse_embeddings",
    "run_evaluation",
    "load_eval_fields",
    "select_fields",
]

log = get_logger(__name__)

DEFAULT_MAX_FIELDS = 256
EMBEDDING_KEYS = ("cls", "patch_mean")
MODEL_NAMES = ("checkpoint", "baseline")


@dataclass
class EvalFields:
    """The loaded held-out fields, in evaluation order."""

    images: list[np.ndarray]  # uint8 [C, H, W] each
    channels: list[str]
    field_ids: list[str]
    plates: list[str]
    batches: list[str]
    n_available: int  # fields of the split in the manifest
    n_selected: int  # after the max_fields cap
    skipped: list[dict] = field(default_factory=list)  # {"field_id", "reason"}


@dataclass
class EvalResult:
    out_uri: str
    metrics: dict  # what metrics.json holds
    scalars: dict[str, float]  # what scalars.json holds
    table: str  # the printed table
    files: list[str]  # written files, relative to out_uri


# ----------------------------------------------------------------------------------------------- fields


def select_fields(field_ids: list[str], max_fields: int) -> list[int]:
    """Indices of at most max_fields fields, ordered by sha256(field_id): deterministic and spread over plates."""
    if max_fields is not None and max_fields < 0:
        raise ValueError(f"max_fields must be >= 0 (0 = all), got {max_fields}")
    order = sorted(range(len(field_ids)), key=lambda i: hashlib.sha256(field_ids[i].encode()).hexdigest())
    return order[:max_fields] if max_fields else order


def _default_channels(manifest: Manifest) -> list[str]:
    """The manifest's known channels, fluorescent then brightfield (dinocell.ALL_CHANNELS order)."""
    return [c for c in ALL_CHANNELS if c in manifest.channels]


def load_eval_fields(
    manifest_uri: str, cfg, channels: list[str] | None = None, max_fields: int = DEFAULT_MAX_FIELDS, split: str = "val"
) -> EvalFields:
    manifest = Manifest.read(manifest_uri)
    chosen = list(channels) if channels else _default_channels(manifest)
    missing = [c for c in chosen if c not in manifest.channels]
    if missing:
        raise ValueError(f"evaluate: channels {missing} are not in the manifest {manifest_uri} (it has "
                         f"{manifest.channels})")
    if len(chosen) < 2:
        raise ValueError(f"evaluate: need at least 2 channels to compare, got {chosen} from {manifest_uri}")
    part = manifest.split(split)
    if len(part) == 0:
        raise ValueError(f"evaluate: the manifest {manifest_uri} has no {split!r} fields (its plates: "
                         f"{manifest.plates()}); set data.val_plates or data.val_fraction when discovering")
    records = list(part.records())
    picked = [records[i] for i in select_fields([r.field_id for r in records], max_fields)]
    loader = FieldLoader(cfg.preprocess, chosen, fetch_workers=max(1, int(cfg.loader.fetch_workers)))
    loaded, errors = loader.load_many(picked, on_error="skip")
    for fid, reason in errors:
        log.warning("evaluate: skipped field %s: %s", fid, reason)
    return EvalFields(
        images=[f.image for f in loaded],
        channels=chosen,
        field_ids=[f.field_id for f in loaded],
        plates=[f.plate for f in loaded],
        batches=[f.batch for f in loaded],
        n_available=len(records),
        n_selected=len(picked),
        skipped=[{"field_id": fid, "reason": reason} for fid, reason in errors],
    )


# ----------------------------------------------------------------------------------------------- embedding


def _embed(model, info: BackboneInfo, fields: EvalFields, size: int, device, batch_size: int) -> dict:
    """consistency.embed_views over all fields; fields of different sizes are embedded in groups of equal size."""
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(fields.images):
        groups.setdefault(img.shape, []).append(i)
    parts = []
    for idx in groups.values():
        stack = torch.from_numpy(np.stack([fields.images[i] for i in idx]))
        parts.append((idx, consistency.embed_views(model, stack, fields.channels, size=size, mean=info.norm_mean,
                                                   std=info.norm_std, device=device, batch_size=batch_size)))
    if len(parts) == 1:
        return parts[0][1]
    order = torch.tensor([i for idx, _ in parts for i in idx]).argsort()  # back to evaluation order
    views = parts[0][1]
    return {v: {k: torch.cat([p[v][k] for _, p in parts])[order] for k in views[v]} for v in views}


# ----------------------------------------------------------------------------------------------- metrics


def _mean(m: np.ndarray, rows: list[int], cols: list[int]) -> float:
    return float(m[np.ix_(rows, cols)].mean())


def _brightfield_transfer(labels, same, diff, ret, n_fields: int) -> dict | None:
    """Brightfield views against fluorescent views (channels and mean), both query directions for retrieval."""
    bf = [i for i, name in enumerate(labels) if name in BRIGHTFIELD_CHANNELS]
    fl = [i for i, name in enumerate(labels) if name in FLUORESCENT_CHANNELS or name == consistency.MEAN_VIEW]
    if not bf or not fl:
        return None
    same_field = _mean(same, bf, fl)
    different_field = _mean(diff, bf, fl)
    return {
        "views": [labels[i] for i in bf],
        "against": [labels[i] for i in fl],
        "same_field": same_field,
        "different_field": different_field,
        "gap": same_field - different_field,
        "top1": (_mean(ret["top1"], bf, fl) + _mean(ret["top1"], fl, bf)) / 2,
        "mrr": (_mean(ret["mrr"], bf, fl) + _mean(ret["mrr"], fl, bf)) / 2,
        "chance_top1": 1.0 / n_fields,
        "chance_mrr": sum(1.0 / k for k in range(1, n_fields + 1)) / n_fields,
    }


def analyse_embeddings(embs: dict) -> dict:
    """Per embedding key: summary, the three matrices and the brightfield transfer (None without brightfield)."""
    out = {}
    for key in EMBEDDING_KEYS:
        same, labels = consistency.same_field_matrix(embs, key)
        diff, _ = consistency.different_field_matrix(embs, key)
        ret = consistency.retrieval(embs, key)
        n_fields = int(next(iter(embs.values()))[key].shape[0])
        out[key] = {
            "summary": consistency.summary(embs, key),
            "labels": labels,
            "same_field": same.tolist(),
            "different_field": diff.tolist(),
            "retrieval_top1": ret["top1"].tolist(),
            "retrieval_mrr": ret["mrr"].tolist(),
            "brightfield": _brightfield_transfer(labels, same, diff, ret, n_fields),
        }
    return out


def table_rows(models: dict) -> list[dict]:
    """One row per model x embedding x view group: the numbers of the printed table (and the model card)."""
    rows = []
    for model_name, analysis in models.items():
        for key in EMBEDDING_KEYS:
            a = analysis[key]
            s = a["summary"]
            fluo_only = all(v in FLUORESCENT_CHANNELS or v == consistency.MEAN_VIEW for v in s["summary_views"])
            groups = [("fluorescent" if fluo_only else "all", s)]
            if a["brightfield"] is not None:
                groups.append(("brightfield-fluorescent", a["brightfield"]))
            for views, numbers in groups:
                rows.append({
                    "model": model_name,
                    "embedding": key,
                    "views": views,
                    **{m: float(numbers[m]) for m in ("same_field", "different_field", "gap", "top1", "mrr",
                                                      "chance_top1")},
                })
    return rows


# ----------------------------------------------------------------------------------------------- models


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_baseline(baseline: str | None, info: BackboneInfo, which: str, device):
    if baseline in (None, "", "none"):
        return None, None
    if baseline == "init":
        return load_init_backbone(info, in_chans=1, device=device)
    return load_backbone(baseline, which=which, in_chans=1, device=device)


def _preprocess_differences(cfg, info: BackboneInfo) -> list[str]:
    """Preprocessing fields where this evaluation differs from the checkpoint's training config."""
    trained = (info.config or {}).get("preprocess")
    if not isinstance(trained, dict):
        return []
    here = cfg.to_dict()["preprocess"]
    return [f"preprocess.{k}: trained {trained[k]!r}, evaluated {here.get(k)!r}" for k in sorted(trained)
            if k in here and trained[k] != here[k]]


# ----------------------------------------------------------------------------------------------- entry


def run_evaluation(
    checkpoint_uri,
    manifest_uri: str,
    cfg,
    out_uri: str,
    baseline: str | None = "init",
    max_fields: int = DEFAULT_MAX_FIELDS,
    channels: list[str] | None = None,
    *,
    split: str = "val",
    size: int | None = None,
    device=None,
    batch_size: int = 32,
    which: str = "teacher",
    n_vis: int = 4,
    visuals: bool = True,
) -> EvalResult:
    """Evaluate `checkpoint_uri` (and `baseline`: "init", "none" or a checkpoint URI) on the manifest's `split`.

    size: side of the square views (default: the checkpoint's global crop size, else 224); a multiple of the patch
    size. Writes the report (dinocell.eval.report) to `out_uri` (local directory or s3:// prefix).
    """
    from dinocell.eval import report

    device = _resolve_device(device)
    model, info = load_backbone(checkpoint_uri, which=which, in_chans=1, device=device)
    log.info("checkpoint: %s", info.load_summary)
    size = int(size or info.global_size or 224)
    if size % info.patch_size:
        raise ValueError(f"evaluate: view size {size} is not a multiple of the patch size {info.patch_size}")
    base_model, base_info = _load_baseline(baseline, info, which, device)
    if base_model is not None and size % base_info.patch_size:
        raise ValueError(f"evaluate: view size {size} is not a multiple of the baseline's patch size "
                         f"{base_info.patch_size}")

    fields = load_eval_fields(manifest_uri, cfg, channels, max_fields, split)
    if len(fields.images) < 2:
        raise ValueError(f"evaluate: only {len(fields.images)} of {fields.n_selected} selected fields loaded "
                         f"({len(fields.skipped)} skipped, e.g. {fields.skipped[:3]}): need at least 2")
    log.info("evaluating on %d fields (%d skipped) x %d channels at %d px", len(fields.images), len(fields.skipped),
             len(fields.channels), size)

    models = {"checkpoint": (model, info)}
    if base_model is not None:
        models["baseline"] = (base_model, base_info)
    embeddings, analyses = {}, {}
    for name, (m, i) in models.items():
        embeddings[name] = _embed(m, i, fields, size, device, batch_size)
        analyses[name] = analyse_embeddings(embeddings[name])

    differences = _preprocess_differences(cfg, info)
    for line in differences:
        log.warning("evaluate: %s", line)
    metrics = {
        "format": "dinocell-evaluation",
        "format_version": 1,
        "checkpoint": info.to_dict(),
        "baseline": base_info.to_dict() if base_info is not None else None,
        "data": {
            "manifest": str(manifest_uri),
            "split": split,
            "channels": fields.channels,
            "views": analyses["checkpoint"]["cls"]["labels"],
            "n_available": fields.n_available,
            "n_selected": fields.n_selected,
            "n_fields": len(fields.images),
            "n_skipped": len(fields.skipped),
            "skipped": fields.skipped,
            "plates": sorted(set(fields.plates)),
            "n_plates": len(set(fields.plates)),
            "batches": sorted(set(fields.batches)),
            "field_sizes": [list(hw) for hw in sorted({tuple(img.shape[1:]) for img in fields.images})],
            "size": size,
            "preprocess": cfg.to_dict()["preprocess"],
            "preprocess_differs_from_training": differences,
        },
        "models": analyses,
    }
    metrics["table"] = table_rows(analyses)
    _check_finite(metrics["table"])

    figures = report.build_figures(models, embeddings, analyses, fields, size, device, n_vis) if visuals else {}
    with tempfile.TemporaryDirectory(prefix="dinocell-eval-") as tmp:
        local = Path(tmp) if storage.is_s3(str(out_uri)) else storage.local_path(out_uri)
        files, scalars, table = report.write_report(local, metrics, figures)
        if storage.is_s3(str(out_uri)):
            for rel in files:
                storage.upload_file(local / rel, storage.join(str(out_uri), rel))
    print(table)
    return EvalResult(out_uri=str(out_uri), metrics=metrics, scalars=scalars, table=table, files=files)


def _check_finite(rows: list[dict]) -> None:
    for r in rows:
        bad = [k for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ValueError(f"evaluate: non-finite {bad} for {r['model']} {r['embedding']} {r['views']}")
