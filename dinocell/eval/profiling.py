"""The profiling section of `dinocell evaluate`: copairs mAP of well profiles, per model, on whole held-out plates.

For each model (checkpoint, initial weights, pixel baselines: all scored by this same code) the fields of the chosen
plates are embedded (dinocell.eval.profile_features), averaged into well profiles, normalised per plate against
the plate's negative-control wells and scored (dinocell.eval.map_scores): phenotypic activity (replicates vs
negcon, same-well-position pairs excluded; the leaky variant reported beside it) and phenotypic consistency
(perturbations sharing a target). Needs the plate-map columns of the manifest (discovery reads the gallery's
platemaps or data.plate_metadata); without negative controls the section says why it was not scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from dinocell.channels import is_fluorescent
from dinocell.data.fields import FieldLoader
from dinocell.eval.cellprofiler import CellProfilerUnavailable, cellprofiler_features
from dinocell.eval.map_scores import profile_scores
from dinocell.eval.profile_features import DEFAULT_MAX_TILES, field_features, profile_meta, select_plates
from dinocell.jump.manifest import Manifest
from dinocell.log import get_logger
from dinocell.progress import Progress

__all__ = ["DEFAULT_PROFILE_FIELDS", "ProfilingOptions", "headline", "run_profiling"]

log = get_logger(__name__)

DEFAULT_PROFILE_FIELDS = 2048
CELLPROFILER_ID = "cellprofiler"
CELLPROFILER_MODEL = {"label": "CellProfiler (cp_measure)", "learned": False,
                      "description": "CellProfiler measurements of segmented nuclei and cells (cp_measure), median per "
                                     "field: the classical anchor (profiling only)"}


@dataclass
class ProfilingOptions:
    enabled: bool = True
    max_fields: int = DEFAULT_PROFILE_FIELDS  # whole plates up to this many fields (0 = all)
    normalisation: str = "mad"  # see dinocell.eval.profiles.METHODS
    null_size: int = 10000
    seed: int = 0
    threshold: float = 0.05
    max_tiles: int = DEFAULT_MAX_TILES
    cellprofiler: bool = True  # the classical anchor: CellProfiler features via cp_measure, when installed


def _feature_channels(channels: list[str]) -> list[str]:
    fluo = [c for c in channels if is_fluorescent(c)]
    return fluo or list(channels)  # a dataset without JUMP fluorescent names: every channel


def _load_profile_fields(picked: list, cfg, feature_channels: list[str], loaded: dict[str, np.ndarray] | None,
                         loaded_channels: list[str] | None):
    """Images of `picked` (in order; failed ones left out) and the load errors. Fields the evaluation already loaded
    (`loaded`: field id -> uint8 [C, H, W] in `loaded_channels`) are sliced to the feature channels, not fetched again:
    preprocessing is per channel, so the slice equals a fresh load."""
    idx = None
    if loaded and loaded_channels and all(c in loaded_channels for c in feature_channels):
        idx = [loaded_channels.index(c) for c in feature_channels]
    reuse = {r.field_id for r in picked if idx is not None and r.field_id in loaded}
    loader = FieldLoader(cfg.preprocess, feature_channels, fetch_workers=max(1, int(cfg.loader.fetch_workers)))
    to_load = [r for r in picked if r.field_id not in reuse]
    with Progress("evaluate: loading profiling fields", total=len(to_load), unit="field") as bar:
        fresh, errors = loader.load_many(to_load, on_error="skip", on_field=bar.update)
    got = {f.field_id: f.image for f in fresh}
    got.update({fid: np.ascontiguousarray(loaded[fid][idx]) for fid in reuse})
    ids = [r.field_id for r in picked if r.field_id in got]
    return ids, [got[fid] for fid in ids], errors, len(reuse)


def run_profiling(models: dict, manifest_uri: str, cfg, channels: list[str], split: str, size: int, device,
                  batch_size: int, opts: ProfilingOptions | None = None, loaded: dict[str, np.ndarray] | None = None,
                  loaded_channels: list[str] | None = None) -> dict:
    """models: name -> (backbone, norm_mean, norm_std). Returns the JSON-ready profiling section of metrics.json.

    loaded / loaded_channels: fields the evaluation already holds (field id -> uint8 [C, H, W]), reused instead of
    fetched a second time."""
    opts = opts or ProfilingOptions()
    if not opts.enabled:
        return {"split": split, "not_scored": "profiling was turned off for this evaluation"}
    manifest = Manifest.read(manifest_uri)
    records = list(manifest.split(split).records())
    n_negcon = sum(r.control_type == "negcon" for r in records)
    n_annotated = sum(bool(r.perturbation) for r in records)
    base = {"split": split, "n_split_fields": len(records), "n_negcon_fields": n_negcon,
            "n_annotated_fields": n_annotated}
    if n_negcon == 0 or n_annotated == n_negcon:
        reason = (f"the manifest's {split!r} fields have no negative-control wells" if n_negcon == 0
                  else f"the manifest's {split!r} fields have no annotated perturbations besides negcon")
        log.warning("profiling not scored: %s (%s; discovery reads the gallery platemaps or data.plate_metadata)",
                    reason, manifest_uri)
        return {**base, "not_scored": reason}
    picked, plates = select_plates(records, opts.max_fields)
    feature_channels = _feature_channels(channels)
    t0 = time.perf_counter()
    ids, images, errors, n_reused = _load_profile_fields(picked, cfg, feature_channels, loaded, loaded_channels)
    for fid, reason in errors:
        log.warning("profiling: skipped field %s: %s", fid, reason)
    by_id = {r.field_id: r for r in picked}
    meta = profile_meta(ids, by_id)
    negcon_wells = meta[meta["control_type"] == "negcon"].groupby(["batch", "plate"])["well"].nunique()
    if not (negcon_wells >= 2).any():
        reason = (f"no chosen plate has the 2 negative-control wells per-plate normalisation needs "
                  f"({', '.join(f'{p}: {int(n)}' for (_, p), n in negcon_wells.items()) or 'none loaded'})")
        log.warning("profiling not scored: %s", reason)
        return {**base, "plates": plates, "n_fields": len(images), "not_scored": reason}
    log.info("profiling: %d fields of %d plates in %.1fs (%d reused from the consistency set, %d skipped)",
             len(images), len(plates), time.perf_counter() - t0, n_reused, len(errors))
    out = {
        **base,
        "plates": plates,
        "n_fields": len(images),
        "n_reused_fields": n_reused,  # already loaded for the channel-consistency set, not fetched again
        "n_skipped_fields": len(errors),
        "skipped_fields": [{"field_id": f, "reason": r} for f, r in errors],
        "feature_channels": feature_channels,
        "tile_size": size,
        "max_tiles": opts.max_tiles,
        "embedding": "cls, tile-averaged, channels concatenated",
        "models": {},
    }
    for name, (backbone, mean, std) in models.items():
        t0 = time.perf_counter()
        feats = field_features(backbone, images, feature_channels, feature_channels, size=size, mean=mean, std=std,
                               device=device, batch_size=batch_size, max_tiles=opts.max_tiles)
        _score(out, name, feats, meta, opts, t0)
    if opts.cellprofiler:
        out["cellprofiler"] = _score_cellprofiler(out, images, feature_channels, meta, opts)
    return out


def _score_cellprofiler(out: dict, images: list, channels: list[str], meta, opts: ProfilingOptions) -> dict:
    """Adds the "cellprofiler" model to out["models"]; returns what was measured (or why it was not scored)."""
    t0 = time.perf_counter()
    try:
        with Progress("evaluate: CellProfiler features", total=len(images), unit="field") as bar:
            cp = cellprofiler_features(images, channels, on_field=bar.update)
    except CellProfilerUnavailable as e:
        log.warning("profiling: no CellProfiler row: %s", e)
        return {"not_scored": str(e)}
    info = {"n_fields": len(cp["kept"]), "n_without_nuclei": cp["n_without_nuclei"],
            "n_measurements": len(cp["names"]), "n_dropped_measurements": cp["n_dropped_measurements"],
            "segmentation_channel": cp["segmentation_channel"], "measurements": cp["names"]}
    if cp["n_without_nuclei"]:
        log.warning("profiling: %d of %d fields have no nuclei in %s: left out of the CellProfiler profiles",
                    cp["n_without_nuclei"], len(images), cp["segmentation_channel"])
    if not cp["kept"] or not cp["names"]:
        return {**info, "not_scored": "no field had nuclei" if not cp["kept"] else "no finite measurement"}
    _score(out, CELLPROFILER_ID, cp["features"], meta.iloc[cp["kept"]].reset_index(drop=True), opts, t0)
    return info


def _score(out: dict, name: str, feats, meta, opts: ProfilingOptions, t0: float) -> None:
    """out["models"][name] = the profile scores of these field features (logged with the time since t0)."""
    out["models"][name] = profile_scores(feats, meta, opts.normalisation, null_size=opts.null_size, seed=opts.seed,
                                         threshold=opts.threshold)
    log.info("profiling %s: activity mAP %.3f, retrieved %.2f (%.1fs)", name, _get(out, name, "activity", "mean_map"),
             _get(out, name, "activity", "fraction_retrieved"), time.perf_counter() - t0)


def _get(section: dict, model: str, part: str, key: str) -> float:
    v = section["models"][model][part].get(key)
    return float("nan") if v is None else float(v)


def headline(section: dict) -> list[dict]:
    """One row per model: activity / consistency mAP and fraction retrieved, the expected null beside them."""
    rows = []
    for name, res in section.get("models", {}).items():
        act, con = res["activity"], res["consistency"]
        rows.append({
            "model": name,
            "activity_map": act.get("mean_map"),
            "activity_null_map": act.get("expected_null_map"),
            "activity_fraction_retrieved": act.get("fraction_retrieved"),
            "activity_map_same_position_included": (act.get("same_position_included") or {}).get("mean_map"),
            "consistency_map": con.get("mean_map"),
            "consistency_null_map": con.get("expected_null_map"),
            "consistency_fraction_retrieved": con.get("fraction_retrieved"),
            "n_perturbations": act.get("n_perturbations"),
            "n_targets": con.get("n_targets"),
        })
    return rows
