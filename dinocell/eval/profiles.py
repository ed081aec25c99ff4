"""Per-well profiles from per-field embeddings, normalised per plate against its negative controls (JUMP practice).

`well_profiles` averages the fields (sites) of each well; `normalise` then standardises each plate on its negcon
wells: "mad" (pycytominer's robustize_mad), "spherize" (regularised ZCA whitening), "mad+spherize" or "none".
A plate that cannot be normalised (too few negcon wells) is skipped and returned with its reason, never dropped
silently; when no plate can be normalised the call fails.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dinocell.log import get_logger

__all__ = [
    "CONTROL_TYPES",
    "MAD_SCALE",
    "METHODS",
    "REQUIRED_COLUMNS",
    "SPHERIZE_REG",
    "check_meta",
    "normalise",
    "well_profiles",
]

log = get_logger(__name__)

REQUIRED_COLUMNS = ("batch", "plate", "well", "perturbation", "control_type", "target")
CONTROL_TYPES = ("negcon", "poscon", "")
METHODS = ("none", "mad", "spherize", "mad+spherize")
# 1.4826 * MAD estimates the standard deviation of normal data (pycytominer's robustize_mad uses the same constant).
MAD_SCALE = 1.4826
# Added to the MAD denominator, as pycytominer's epsilon: only guards float underflow, since features whose negcon
# MAD is exactly 0 are set to 0 instead (see _mad).
MAD_EPS = 1e-12
# Spherize regulariser, relative to the mean non-zero eigenvalue of the negcon covariance (see _spherize).
SPHERIZE_REG = 0.01
_PLATE_KEY = ["batch", "plate"]
_ANNOTATION_COLUMNS = ["perturbation", "control_type", "target"]


def check_meta(meta: pd.DataFrame, n_rows: int, what: str) -> pd.DataFrame:
    """A clean copy of `meta` (REQUIRED_COLUMNS present, one row per feature row, annotations as stripped str)."""
    if not isinstance(meta, pd.DataFrame):
        raise TypeError(f"{what}: expected a pandas DataFrame, got {type(meta).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in meta.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing} (has {list(meta.columns)})")
    if len(meta) != n_rows:
        raise ValueError(f"{what}: {len(meta)} rows but the features have {n_rows}")
    meta = meta.reset_index(drop=True).copy()
    for col in ("batch", "plate", "well"):
        bad = meta[col].isna() | (meta[col].astype(str).str.strip() == "")
        if bad.any():
            raise ValueError(
                f"{what}: column {col!r} is empty in {int(bad.sum())} row(s), first row {int(bad.idxmax())}"
            )
        meta[col] = meta[col].astype(str)
    # Parquet gives None for an empty annotation: the manifest's "" (a treatment, no target) and None are the same.
    for col in _ANNOTATION_COLUMNS:
        meta[col] = meta[col].fillna("").astype(str).str.strip()
    unknown = sorted(set(meta["control_type"]) - set(CONTROL_TYPES))
    if unknown:
        raise ValueError(
            f"{what}: column 'control_type' has unknown value(s) {unknown}; allowed: {list(CONTROL_TYPES)}"
        )
    return meta


def well_profiles(features: np.ndarray, meta: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Mean of the fields of each (batch, plate, well): (profiles [W, D] float64, well meta with `n_fields`).

    Wells are ordered by batch, plate, well. The fields of one well must agree on perturbation, control_type and
    target (one well holds one treatment); a disagreement is an error naming the well.
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features: expected a non-empty [N_fields, D] array, got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.number):
        raise TypeError(f"features: expected a numeric array, got dtype {features.dtype}")
    features = features.astype(np.float64, copy=False)
    bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad_rows.size:
        raise ValueError(f"features: {bad_rows.size} row(s) contain NaN or inf, first row {int(bad_rows[0])}")
    meta = check_meta(meta, features.shape[0], "field meta")

    keys = ["batch", "plate", "well"]
    grouped = meta.groupby(keys, sort=True)
    conflicts = grouped[_ANNOTATION_COLUMNS].nunique()
    conflicts = conflicts[(conflicts > 1).any(axis=1)]
    if len(conflicts):
        (batch, plate, well), row = next(iter(conflicts.iterrows()))
        cols = [c for c in _ANNOTATION_COLUMNS if row[c] > 1]
        raise ValueError(
            f"field meta: {len(conflicts)} well(s) whose fields disagree on {cols}, "
            f"first batch={batch} plate={plate} well={well}"
        )
    codes = grouped.ngroup().to_numpy()
    counts = np.bincount(codes)
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    profiles = np.add.reduceat(features[order], starts, axis=0) / counts[:, None]
    well_meta = grouped[_ANNOTATION_COLUMNS].first().reset_index()
    well_meta["n_fields"] = counts
    return profiles, well_meta


def _negcon_mask(well_meta: pd.DataFrame) -> np.ndarray:
    return (well_meta["control_type"] == "negcon").to_numpy()


def _mad(x: np.ndarray, negcon: np.ndarray) -> tuple[np.ndarray, int]:
    """Robust z-score against the negcon wells: (x - median) / (1.4826 * MAD + eps), MAD = median |negcon - median|.

    A feature that does not vary at all among the plate's negcons (MAD exactly 0: a dead unit, a constant channel)
    has no scale to calibrate against; dividing by eps would turn its tiny treatment differences into values that
    swamp every other feature, so it is set to 0 on that plate (feature-selection-free; returned as a count).
    """
    median = np.median(negcon, axis=0)
    mad = np.median(np.abs(negcon - median), axis=0)
    constant = mad == 0
    out = (x - median) / (MAD_SCALE * mad + MAD_EPS)
    out[:, constant] = 0.0
    return out, int(constant.sum())


def _spherize(x: np.ndarray, negcon: np.ndarray, reg: float) -> np.ndarray:
    """ZCA whitening fitted on the negcon wells: (C + lam I)^(-1/2) (x - mean_negcon), C the negcon covariance.

    C comes from a thin SVD of the centred negcons (cost n^2 D, fine for D >> n). lam = reg x the mean non-zero
    eigenvalue of C: with n negcons C has rank <= n - 1, so when D >= n most directions have eigenvalue 0; lam caps
    their gain at 1/sqrt(lam), i.e. 1/sqrt(reg) (10x for reg=0.01) the gain of an average negcon direction, instead of
    the near-infinite gain of an unregularised inverse. Directions the negcons do vary along come out with variance
    s / (s + lam), close to 1 for all but the weakest ones.
    """
    mean = negcon.mean(axis=0)
    centred = negcon - mean
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    eig = sing**2 / (negcon.shape[0] - 1)
    keep = eig > eig.max() * 1e-12
    eig, vt = eig[keep], vt[keep]
    lam = reg * eig.mean()
    xc = x - mean
    proj = xc @ vt.T  # coordinates in the negcon eigenbasis
    inside = (proj / np.sqrt(eig + lam)) @ vt
    outside = (xc - proj @ vt) / np.sqrt(lam)
    return inside + outside


def normalise(
    profiles: np.ndarray,
    well_meta: pd.DataFrame,
    method: str = "mad",
    *,
    min_negcon: int = 2,
    spherize_reg: float = SPHERIZE_REG,
) -> tuple[np.ndarray, pd.DataFrame, list[dict]]:
    """Normalise each plate against its own negative-control wells.

    Returns (profiles, well meta, skipped plates): the wells of a plate with fewer than `min_negcon` negcon wells
    (2 at least: one well has no spread) are left out of both arrays, and the plate is listed in `skipped` as
    {"batch", "plate", "n_wells", "n_negcon", "reason"}. All plates skipped is an error. `method="none"` returns
    the input unchanged (no negcons needed). The output is finite for finite input. The returned meta's
    `attrs["n_constant_features"]` counts the (plate, feature) pairs that "mad" set to 0 (zero negcon MAD).
    """
    if method not in METHODS:
        raise ValueError(f"normalisation method {method!r} unknown; choose one of {list(METHODS)}")
    profiles = np.asarray(profiles, dtype=np.float64)
    if profiles.ndim != 2:
        raise ValueError(f"profiles: expected a [W, D] array, got shape {profiles.shape}")
    if not np.isfinite(profiles).all():
        raise ValueError("profiles contain NaN or inf")
    well_meta = check_meta(well_meta, profiles.shape[0], "well meta")
    if method == "none":
        well_meta.attrs["n_constant_features"] = 0
        return profiles.copy(), well_meta, []
    if min_negcon < 2:
        raise ValueError(f"min_negcon must be >= 2 (MAD and covariance need a spread), got {min_negcon}")
    if not spherize_reg > 0:
        raise ValueError(f"spherize_reg must be > 0, got {spherize_reg}")

    out = np.zeros_like(profiles)
    keep = np.zeros(len(well_meta), dtype=bool)
    skipped: list[dict] = []
    negcon_all = _negcon_mask(well_meta)
    constant_total = 0
    for (batch, plate), rows in well_meta.groupby(_PLATE_KEY, sort=True).indices.items():
        negcon = rows[negcon_all[rows]]
        x, is_negcon = profiles[rows], negcon_all[rows]
        reason, n_constant = None, 0
        if negcon.size < min_negcon:
            reason = f"{negcon.size} negcon well(s), normalisation needs >= {min_negcon}"
        else:
            if method in ("mad", "mad+spherize"):
                x, n_constant = _mad(x, x[is_negcon])
            if method in ("spherize", "mad+spherize"):
                if not np.ptp(x[is_negcon], axis=0).any():
                    reason = "negcon wells are identical: their covariance is zero"
                else:
                    x = _spherize(x, x[is_negcon], spherize_reg)
        if reason:
            skipped.append(
                {
                    "batch": batch,
                    "plate": plate,
                    "n_wells": int(rows.size),
                    "n_negcon": int(negcon.size),
                    "reason": reason,
                }
            )
            log.warning(
                "normalisation (%s): skipping plate %s/%s (%d wells): %s", method, batch, plate, rows.size, reason
            )
            continue
        constant_total += n_constant
        out[rows] = x
        keep[rows] = True
    if not keep.any():
        raise ValueError(
            f"normalisation {method!r}: no plate can be normalised, each lacks negative-control wells "
            f"(control_type == 'negcon', >= {min_negcon} per plate): "
            + "; ".join(f"{s['plate']}: {s['reason']}" for s in skipped)
        )
    if constant_total:
        log.info("normalisation (%s): %d plate-feature(s) with zero negcon MAD set to 0", method, constant_total)
    kept_meta = well_meta[keep].reset_index(drop=True)
    # Not data dropped, but data changed: the count travels with the meta for the caller's report.
    kept_meta.attrs["n_constant_features"] = constant_total
    return out[keep], kept_meta, skipped
