"""JUMP-style retrieval scores of well profiles with copairs: phenotypic activity and phenotypic consistency.

Activity: each well of a perturbation queries its replicate wells (positives) against the negative-control wells
(negatives); replicates in the same well position (on other plates) are not positives, so a representation cannot
score on position/layout alone. The same numbers with same-position pairs allowed are reported separately (the
layout-leakage variant: a large gap means position effects, not biology, drive the score).
Consistency: perturbation-level profiles (median of replicate wells) retrieve the perturbations sharing a target
against those sharing none. p-values come from copairs' permutation null (`null_size` draws, `seed`), corrected
across perturbations / targets by Benjamini-Hochberg; "retrieved" = corrected p < threshold.
Everything that cannot be scored (a single replicate, no annotation, a zero profile) is counted in "skipped".
"""

from __future__ import annotations

import contextlib
import tempfile

import numpy as np
import pandas as pd
from copairs.map import average_precision, mean_average_precision, multilabel
from copairs.matching import UnpairedException

from dinocell.eval.profiles import check_meta, normalise, well_profiles
from dinocell.log import get_logger

__all__ = ["TARGET_SEPARATOR", "expected_null_ap", "phenotypic_activity", "phenotypic_consistency", "profile_scores"]

log = get_logger(__name__)

TARGET_SEPARATOR = "|"  # a perturbation with several targets: "EGFR|ERBB2"
_NEGCON = "__negcon__"


def expected_null_ap(n_pos, n_total):
    """Mean AP of a random ranking of n_total items with n_pos positives, exactly (no sampling).

    E[AP] = (k-1)/(n-1) + (n-k) H_n / (n(n-1)), H_n the n-th harmonic number: from E[rel_r rel_s] = k(k-1)/(n(n-1))
    summed over the precision-at-r terms. It is high for small lists (1 positive among 4 gives 0.52), which is why
    small data must be read against it rather than against 0.
    """
    k = np.asarray(n_pos, dtype=np.float64)
    n = np.asarray(n_total, dtype=np.float64)
    harmonic = np.array([np.sum(1.0 / np.arange(1, int(m) + 1)) for m in np.ravel(n)]).reshape(n.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (k - 1) / (n - 1) + (n - k) * harmonic / (n * (n - 1))
    return np.where(n <= 1, 1.0, value)


def _num(x):
    """A JSON-ready number: float, or None for NaN."""
    x = float(x)
    return None if not np.isfinite(x) else x


def _queries(profiles: np.ndarray, well_meta: pd.DataFrame, what: str) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Validated inputs, minus the wells no retrieval can use (counted): unannotated treatments, zero profiles."""
    profiles = np.asarray(profiles, dtype=np.float64)
    if profiles.ndim != 2:
        raise ValueError(f"{what}: expected profiles [W, D], got shape {profiles.shape}")
    if not np.isfinite(profiles).all():
        raise ValueError(f"{what}: profiles contain NaN or inf")
    meta = check_meta(well_meta, profiles.shape[0], f"{what} well meta")
    unannotated = ((meta["perturbation"] == "") & (meta["control_type"] != "negcon")).to_numpy()
    zero = np.linalg.norm(profiles, axis=1) == 0  # cosine similarity is undefined for them
    skipped = {
        "wells_without_perturbation": int(unannotated.sum()),
        "zero_profile_wells": int((zero & ~unannotated).sum()),
    }
    for key, n in skipped.items():
        if n:
            log.warning("%s: skipping %d well(s): %s", what, n, key.replace("_", " "))
    keep = ~(unannotated | zero)
    return profiles[keep], meta[keep].reset_index(drop=True), skipped


def _map(ap: pd.DataFrame, key: str, null_size: int, threshold: float, seed: int, cache_dir) -> pd.DataFrame:
    """copairs mAP per `key` with p-values, plus the exact expected null mAP of each group's rank lists."""
    ap = ap[ap["n_pos_pairs"] > 0].copy()
    ap["null_ap"] = expected_null_ap(ap["n_pos_pairs"], ap["n_total_pairs"])
    # copairs caches null distributions on disk under a per-configuration seed that depends on which
    # configurations were drawn first; a fresh directory per call keeps results a function of the inputs only.
    ctx = tempfile.TemporaryDirectory(prefix="copairs-") if cache_dir is None else contextlib.nullcontext(cache_dir)
    with ctx as cdir:
        scores = mean_average_precision(ap, [key], null_size=null_size, threshold=threshold, seed=seed, cache_dir=cdir)
    extra = ap.groupby(key).agg(n_scored=("null_ap", "size"), expected_null_map=("null_ap", "mean")).reset_index()
    return scores.merge(extra, on=key)


def _scores(rec) -> dict:
    """The JSON-ready numbers of one row of copairs' mean_average_precision (after _map)."""
    return {
        "mean_average_precision": _num(rec.mean_average_precision),
        "expected_null_map": _num(rec.expected_null_map),
        "p_value": _num(rec.p_value),
        "corrected_p_value": _num(rec.corrected_p_value),
        "retrieved": bool(rec.below_corrected_p),
    }


def _summary(rows: list[dict]) -> dict:
    return {
        "mean_map": _num(np.mean([r["mean_average_precision"] for r in rows])) if rows else None,
        "fraction_retrieved": _num(np.mean([r["retrieved"] for r in rows])) if rows else None,
        "expected_null_map": _num(np.mean([r["expected_null_map"] for r in rows])) if rows else None,
        "n_perturbations": len(rows),
    }


def _activity_variant(feats, frame, pos_diffby, null_size, threshold, seed, cache_dir) -> tuple[list[dict], str | None]:
    try:
        pairs = {"pos_sameby": ["m_pert", "m_ref"], "neg_sameby": [], "neg_diffby": ["m_pert", "m_ref"]}
        ap = average_precision(frame, feats, pos_diffby=pos_diffby, **pairs)
    except UnpairedException as err:
        return [], f"no pairs to score: {err}"
    ap = ap[ap["m_ref"] == -1]  # the treatment queries; negcons only serve as negatives
    if not (ap["n_pos_pairs"] > 0).any():
        return [], "no perturbation has a positive pair"
    scores = _map(ap, "m_pert", null_size, threshold, seed, cache_dir)
    info = (
        frame[frame["m_ref"] == -1].groupby("m_pert").agg(control_type=("m_ctrl", "first"), n_wells=("m_ctrl", "size"))
    )
    rows = [
        {
            "perturbation": rec.m_pert,
            "control_type": info.at[rec.m_pert, "control_type"] or "treatment",
            "n_wells": int(info.at[rec.m_pert, "n_wells"]),
            "n_scored_wells": int(rec.n_scored),
            **_scores(rec),
        }
        for rec in scores.itertuples(index=False)
    ]
    return rows, None


def phenotypic_activity(
    profiles: np.ndarray,
    well_meta: pd.DataFrame,
    *,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    cache_dir=None,
) -> dict:
    """Replicate retrieval against negative controls per perturbation (see the module docstring)."""
    feats, meta, skipped = _queries(profiles, well_meta, "phenotypic activity")
    is_negcon = (meta["control_type"] == "negcon").to_numpy()
    if not is_negcon.any():
        raise ValueError("phenotypic activity: no negative-control wells (control_type == 'negcon') to rank against")
    frame = pd.DataFrame(
        {
            "m_pert": np.where(is_negcon, _NEGCON, meta["perturbation"]),
            # Each negcon its own reference: negcons never pair with each other as positives, treatments share -1.
            "m_ref": np.where(is_negcon, np.arange(len(meta)), -1),
            "m_well": meta["well"].to_numpy(),
            "m_ctrl": meta["control_type"].to_numpy(),
        }
    )
    n_wells = frame[~is_negcon].groupby("m_pert").size()
    skipped["single_well_perturbations"] = int((n_wells < 2).sum())
    result = {
        "threshold": threshold,
        "null": {"null_size": null_size, "seed": seed},
        "n_negcon_wells": int(is_negcon.sum()),
    }
    rows, reason = _activity_variant(feats, frame, ["m_well"], null_size, threshold, seed, cache_dir)
    same_rows, same_reason = _activity_variant(feats, frame, [], null_size, threshold, seed, cache_dir)
    # Replicates that only ever share a well position have no positive pair once same-position pairs are excluded.
    skipped["same_position_only_perturbations"] = int((n_wells >= 2).sum()) - len(rows)
    for key in ("single_well_perturbations", "same_position_only_perturbations"):
        if skipped[key]:
            log.warning("phenotypic activity: %d perturbation(s) not scored: %s", skipped[key], key.replace("_", " "))
    result.update(_summary(rows), per_perturbation=rows, skipped=skipped)
    result["by_control_type"] = {
        c: _summary([r for r in rows if r["control_type"] == c]) for c in sorted({r["control_type"] for r in rows})
    }
    result["same_position_included"] = dict(_summary(same_rows), per_perturbation=same_rows)
    if reason:
        result["not_scored"] = reason
    if same_reason:
        result["same_position_included"]["not_scored"] = same_reason
    return result


def phenotypic_consistency(
    profiles: np.ndarray,
    well_meta: pd.DataFrame,
    *,
    aggregate: str = "median",
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    cache_dir=None,
) -> dict:
    """Perturbations sharing a target retrieve each other against perturbations with no shared target.

    Treatments and poscons take part (negcons do not); a perturbation's profile is the `aggregate` of its wells.
    """
    if aggregate not in ("median", "mean"):
        raise ValueError(f"phenotypic consistency: aggregate must be 'median' or 'mean', got {aggregate!r}")
    feats, meta, skipped = _queries(profiles, well_meta, "phenotypic consistency")
    treat = (meta["control_type"] != "negcon").to_numpy()
    feats, meta = feats[treat], meta[treat].reset_index(drop=True)
    conflict = meta.groupby("perturbation")["target"].nunique()
    if (conflict > 1).any():
        name = conflict[conflict > 1].index[0]
        values = sorted(meta.loc[meta["perturbation"] == name, "target"].unique())
        raise ValueError(
            f"phenotypic consistency: perturbation {name!r} has conflicting targets across wells: {values}"
        )
    groups = meta.groupby("perturbation", sort=True).indices
    names = list(groups)
    agg = np.median if aggregate == "median" else np.mean
    pert_feats = np.stack([agg(feats[groups[p]], axis=0) for p in names]) if names else np.zeros((0, feats.shape[1]))
    targets = [
        sorted({t.strip() for t in meta.at[groups[p][0], "target"].split(TARGET_SEPARATOR)} - {""}) for p in names
    ]
    zero = np.linalg.norm(pert_feats, axis=1) == 0  # a median can cancel out; cosine is undefined for it
    annotated = np.array([bool(t) for t in targets], dtype=bool)
    has_target = annotated & ~zero
    counts = pd.Series([t for ts, h in zip(targets, has_target) if h for t in ts], dtype=object).value_counts()
    skipped["zero_profile_perturbations"] = int(zero.sum())
    skipped["perturbations_without_target"] = int((~annotated).sum())
    skipped["single_perturbation_targets"] = int((counts < 2).sum())
    result = {
        "threshold": threshold,
        "aggregate": aggregate,
        "null": {"null_size": null_size, "seed": seed},
        "n_perturbations_with_target": int(has_target.sum()),
        "skipped": skipped,
    }
    scorable = counts[counts >= 2]
    reason = None
    if scorable.empty:
        reason = "no target is shared by two or more perturbations"
    else:
        frame = pd.DataFrame(
            {
                "m_pert": np.array(names, dtype=object)[has_target],
                "m_target": [t for t, h in zip(targets, has_target) if h],
            }
        )
        try:
            pairs = {"pos_sameby": ["m_target"], "pos_diffby": [], "neg_sameby": [], "neg_diffby": ["m_target"]}
            ap = multilabel.average_precision(frame, pert_feats[has_target], multilabel_col="m_target", **pairs)
        except UnpairedException as err:
            reason = f"no pairs to score: {err}"
    rows = []
    if reason is None:
        scores = _map(ap, "m_target", null_size, threshold, seed, cache_dir)
        rows = [
            {"target": rec.m_target, "n_perturbations": int(counts[rec.m_target]), **_scores(rec)}
            for rec in scores.itertuples(index=False)
        ]
    summary = _summary(rows)
    summary["n_targets"] = summary.pop("n_perturbations")
    result.update(summary, per_target=rows)
    if reason:
        result["not_scored"] = reason
        log.warning("phenotypic consistency not scored: %s", reason)
    return result


def profile_scores(
    field_features: np.ndarray,
    field_meta: pd.DataFrame,
    normalisation: str = "mad",
    *,
    null_size: int = 10000,
    seed: int = 0,
    threshold: float = 0.05,
) -> dict:
    """Field embeddings -> well profiles -> per-plate normalisation -> activity and consistency, one JSON-ready dict."""
    profiles, wells = well_profiles(field_features, field_meta)
    normed, kept, skipped_plates = normalise(profiles, wells, normalisation)
    kwargs = {"null_size": null_size, "seed": seed, "threshold": threshold}
    return {
        "normalisation": normalisation,
        "n_fields": int(len(field_meta)),
        "n_wells": int(len(wells)),
        "n_plates": int(wells.groupby(["batch", "plate"]).ngroups),
        "n_wells_scored": int(len(kept)),
        "skipped_plates": skipped_plates,
        "skipped_wells_in_skipped_plates": int(sum(s["n_wells"] for s in skipped_plates)),
        "n_constant_features_zeroed": int(kept.attrs.get("n_constant_features", 0)),
        "activity": phenotypic_activity(normed, kept, **kwargs),
        "consistency": phenotypic_consistency(normed, kept, **kwargs),
    }
