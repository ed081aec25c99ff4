"""`dinocell evaluate`: channel consistency of a checkpoint on held-out fields, next to baselines that cannot learn.

For up to `max_fields` fields of the manifest's held-out split (chosen deterministically: ordered by the sha256 of
their field id, which spreads them over plates), every channel is embedded on its own and the mean of the
fluorescent channels as one more view (dinocell.monitor.consistency). Brightfield channels are evaluated when the
manifest has them (or `channels` names them): the seed claims transfer to brightfield, so it is measured
(brightfield views against fluorescent channels), not assumed.

Views (`view_mode`, dinocell.eval.view_sampling): "independent" (the headline) gives every view of a field its own
random crop, flip and quarter turn, seeded by `seed` and recorded per field and view in metrics.json, so two views of
a field share content, not layout; "aligned" shows every view as the whole field in one orientation, which layout
alone solves (an 8x8 pooled pixel vector finds the field); "both" (the default) reports both.

Models, scored by the same code on the same views (dinocell.eval.models): the checkpoint's teacher backbone, its
baseline (the run's initial weights, or another checkpoint), the pixel baselines (8x8 and 16x16 average-pooled
pixels) and a positions-only probe. Per model and embedding ("cls", "patch_mean"): the same-field view x view cosine
matrix, the different-field matrix (collapse guard), cross-view retrieval (top-1, MRR), the seed's single number
(mean same-field similarity) next to the same-minus-different gap (dinocell.eval.scoring). Fields that fail to load
are skipped, counted and listed in the report. Everything is written by dinocell.eval.report.
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
from dinocell.channels import is_fluorescent
from dinocell.data.fields import FieldLoader
from dinocell.eval.checkpoint_reader import BackboneInfo, load_backbone
from dinocell.eval.models import EvalModel, baseline_model, embed_fields, reference_models
from dinocell.eval.profiling import CELLPROFILER_ID, CELLPROFILER_MODEL, ProfilingOptions, run_profiling
from dinocell.eval.scoring import EMBEDDING_KEYS, analyse_embeddings, comparison_rows, table_rows
from dinocell.eval.view_sampling import (
    DEFAULT_RATIO,
    DEFAULT_SCALE,
    DERIVATION,
    ViewSpec,
    field_orientations,
    parse_view_modes,
    sample_view_spec,
)
from dinocell.jump.manifest import Manifest
from dinocell.log import get_logger
from dinocell.monitor.consistency import MEAN_VIEW
from dinocell.progress import Progress

__all__ = [
    "DEFAULT_MAX_FIELDS",
    "EMBEDDING_KEYS",
    "EvalFields",
    "EvalResult",
    "analyse_embeddings",
    "run_evaluation",
    "load_eval_fields",
    "select_fields",
    "view_specs",
]

log = get_logger(__name__)

DEFAULT_MAX_FIELDS = 256
DEFAULT_VIEW_MODE = "both"


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
    """Every channel of the manifest, in its order (discovery writes data.channels, then data.eval_channels)."""
    return list(manifest.channels)


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
    with Progress("evaluate: loading fields", total=len(picked), unit="field") as bar:
        loaded, errors = loader.load_many(picked, on_error="skip", on_field=bar.update)
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


# ----------------------------------------------------------------------------------------------- views


def view_specs(fields: EvalFields, seed: int, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO) -> list[dict[str, ViewSpec]]:
    """Per field (evaluation order): {view: ViewSpec} for "mean" (with a fluorescent channel) and every channel."""
    views = ([MEAN_VIEW] if any(is_fluorescent(c) for c in fields.channels) else []) + list(fields.channels)
    out = []
    for fid, img in zip(fields.field_ids, fields.images):
        dealt = field_orientations(seed, fid, views)
        out.append({v: sample_view_spec(seed, fid, v, tuple(img.shape[1:]), scale, ratio, dealt[v]) for v in views})
    return out


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    view_mode: str = DEFAULT_VIEW_MODE,
    seed: int = 0,
    view_scale: tuple[float, float] = DEFAULT_SCALE,
    pixel_baselines: bool = True,
    profiling: ProfilingOptions | None = None,
) -> EvalResult:
    """Evaluate `checkpoint_uri` (and `baseline`: "init", "none" or a checkpoint URI) on the manifest's `split`.

    size: side of the square views (default: the checkpoint's global crop size, else 224); a multiple of the patch
    size. view_mode: "independent", "aligned" or "both" (module docstring); seed: the independent views' seed;
    view_scale: their crop area range. pixel_baselines: also score the pixel baselines and the positions-only probe.
    profiling: options of the copairs profiling section (dinocell.eval.profiling; default options when None);
    it needs the manifest's plate-map columns, and says why it was not scored when they are missing.
    Writes the report (dinocell.eval.report) to `out_uri` (local directory or s3:// prefix).
    """
    from dinocell.eval import report

    modes = parse_view_modes(view_mode)
    device = _resolve_device(device)
    model, info = load_backbone(checkpoint_uri, which=which, in_chans=1, device=device)
    log.info("checkpoint: %s", info.load_summary)
    size = int(size or info.global_size or 224)
    if size % info.patch_size:
        raise ValueError(f"evaluate: view size {size} is not a multiple of the patch size {info.patch_size}")
    base = baseline_model(baseline, info, which, device)
    if base is not None and size % base.info.patch_size:
        raise ValueError(f"evaluate: view size {size} is not a multiple of the baseline's patch size "
                         f"{base.info.patch_size}")

    fields = load_eval_fields(manifest_uri, cfg, channels, max_fields, split)
    if len(fields.images) < 2:
        raise ValueError(f"evaluate: only {len(fields.images)} of {fields.n_selected} selected fields loaded "
                         f"({len(fields.skipped)} skipped, e.g. {fields.skipped[:3]}): need at least 2")
    log.info("evaluating on %d fields (%d skipped) x %d channels at %d px, views %s", len(fields.images),
             len(fields.skipped), len(fields.channels), size, "/".join(modes))

    entries = [EvalModel("checkpoint", "checkpoint", model, info.norm_mean, info.norm_std,
                         f"{info.section} backbone of {info.source}", info)]
    if base is not None:
        entries.append(base)
    if pixel_baselines:
        entries += reference_models((info.norm_mean, info.norm_std), device)
    specs = view_specs(fields, seed, view_scale) if "independent" in modes else None
    embeddings: dict[str, dict] = {}
    results: dict[str, dict] = {}
    bar = Progress("evaluate: embedding", total=len(modes) * len(entries), unit="model")
    for mode in modes:
        embeddings[mode], results[mode] = {}, {}
        for m in entries:
            embeddings[mode][m.id] = embed_fields(m, fields, size, device, batch_size, mode, specs)
            results[mode][m.id] = analyse_embeddings(embeddings[mode][m.id])
            bar.update(1)
    bar.close()

    differences = _preprocess_differences(cfg, info)
    for line in differences:
        log.warning("evaluate: %s", line)
    first = results[modes[0]]["checkpoint"]["cls"]
    metrics = {
        "format": "dinocell-evaluation",
        "format_version": 2,
        "checkpoint": info.to_dict(),
        "baseline": base.info.to_dict() if base is not None else None,
        "models": {m.id: {"label": m.label, "description": m.description, "learned": m.learned} for m in entries},
        "data": {
            "manifest": str(manifest_uri),
            "split": split,
            "channels": fields.channels,
            "views": first["labels"],
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
        "view_sampling": {
            "modes": modes,
            "seed": int(seed),
            "scale": list(view_scale),
            "ratio": list(DEFAULT_RATIO),
            "derivation": DERIVATION,
            # per field id, per view: the crop box (pixels of the preprocessed field), flip and quarter turns
            "records": ({fid: {v: s.to_dict() for v, s in sp.items()} for fid, sp in zip(fields.field_ids, specs)}
                        if specs is not None else {}),
        },
        "results": results,
    }
    metrics["table"] = table_rows(results, {m.id: m.label for m in entries})
    _check_finite(metrics["table"])
    metrics["comparison"] = comparison_rows(metrics["table"])
    metrics["profiling"] = run_profiling({m.id: (m.module, m.norm_mean, m.norm_std) for m in entries}, manifest_uri,
                                         cfg, fields.channels, split, size, device, batch_size, profiling,
                                         loaded=dict(zip(fields.field_ids, fields.images)),
                                         loaded_channels=fields.channels)
    if CELLPROFILER_ID in metrics["profiling"].get("models", {}):
        metrics["models"][CELLPROFILER_ID] = dict(CELLPROFILER_MODEL)

    figures = (report.build_figures(entries, embeddings, results, fields, specs, size, device, n_vis)
               if visuals else {})
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
            raise ValueError(f"evaluate: non-finite {bad} for {r['sampling']} {r['model']} {r['embedding']} "
                             f"{r['views']}")
