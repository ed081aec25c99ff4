"""Well profiles, per-plate normalisation and copairs mAP scores (dinocell.eval.profiles, dinocell.eval.map_scores).

Data are generated here with planted structure (perturbation effects, plate offsets, well-position effects), so each
test knows what the scores must show. Small null sizes keep the file fast.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from copairs.compute import random_ap

from dinocell.eval.map_scores import expected_null_ap, phenotypic_activity, phenotypic_consistency, profile_scores
from dinocell.eval.profiles import MAD_SCALE, normalise, well_profiles

NULL = 1000


def _row(plate, well, pert, ctrl="", target="", batch="B1"):
    return {"batch": batch, "plate": plate, "well": well, "perturbation": pert, "control_type": ctrl, "target": target}


def planted(
    seed, n_plates=3, n_perts=24, n_negcon=16, dim=32, effect=1.5, plate_offset=0.0, targets=None, target_effect=2.0
):
    """Well profiles: one well per perturbation per plate at a random position, `n_negcon` DMSO wells per plate.

    profile = plate offset + perturbation effect (+ its target's effect) + N(0, 1) noise.
    """
    rng = np.random.default_rng(seed)
    effects = rng.normal(size=(n_perts, dim)) * effect
    targets = targets or {}
    target_effects = {t: rng.normal(size=dim) * target_effect for t in sorted(set(targets.values()))}
    x, rows = [], []
    for p in range(n_plates):
        offset = rng.normal(size=dim) * plate_offset
        for j, pos in enumerate(rng.permutation(n_perts + n_negcon)):
            well = f"w{pos:03d}"
            if j < n_negcon:
                x.append(offset + rng.normal(size=dim))
                rows.append(_row(f"P{p}", well, "DMSO", "negcon"))
            else:
                k = j - n_negcon
                t = targets.get(f"c{k}", "")
                x.append(offset + effects[k] + target_effects.get(t, 0) + rng.normal(size=dim))
                rows.append(_row(f"P{p}", well, f"c{k}", "", t))
    return np.array(x), pd.DataFrame(rows)


# ---------------------------------------------------------------- profiles and normalisation


def test_well_profiles_average_the_fields_of_each_well():
    meta = pd.DataFrame(
        [
            _row("P1", "A02", "c1") | {"site": 1},
            _row("P1", "A01", "DMSO", "negcon") | {"site": 1},
            _row("P1", "A02", "c1") | {"site": 2},
            _row("P1", "A01", "DMSO", "negcon") | {"site": 2, "target": None},  # parquet's None is ""
            _row("P1", "A01", "DMSO", "negcon") | {"site": 3},
        ]
    )
    feats = np.array([[1.0, 2.0], [0.0, 0.0], [3.0, 6.0], [3.0, 3.0], [6.0, 0.0]], dtype=np.float32)
    profiles, wells = well_profiles(feats, meta)
    assert profiles.dtype == np.float64
    assert wells[["well", "perturbation", "control_type", "target", "n_fields"]].values.tolist() == [
        ["A01", "DMSO", "negcon", "", 3],
        ["A02", "c1", "", "", 2],
    ]
    np.testing.assert_allclose(profiles, [[3.0, 1.0], [2.0, 4.0]])


def test_mad_hand_computed_and_constant_features_zeroed():
    # Plate P1: negcon feature 0 = [1, 2, 4] -> median 2, |dev| [1, 0, 2] -> MAD 1; feature 1 constant (MAD 0).
    # Plate P2 holds the same values shifted by +10: per-plate normalisation gives the same numbers.
    base = np.array([[1.0, 5.0], [2.0, 5.0], [4.0, 5.0], [5.0, 7.0]])
    profiles = np.vstack([base, base + 10])
    wells = pd.DataFrame(
        [_row("P1", w, "DMSO", "negcon") for w in ("A01", "A02", "A03")]
        + [_row("P1", "B01", "c1")]
        + [_row("P2", w, "DMSO", "negcon") for w in ("A01", "A02", "A03")]
        + [_row("P2", "B01", "c1")]
    )
    out, kept, skipped = normalise(profiles, wells, "mad")
    expected = np.array([[-1 / MAD_SCALE, 0], [0, 0], [2 / MAD_SCALE, 0], [3 / MAD_SCALE, 0]])
    np.testing.assert_allclose(out, np.vstack([expected, expected]), rtol=1e-9, atol=1e-12)
    assert skipped == [] and len(kept) == 8
    assert kept.attrs["n_constant_features"] == 2  # feature 1 on each plate
    assert np.isfinite(out).all()


def _correlated(rng, n, dim):
    mixing = rng.normal(size=(dim, dim)) * np.linspace(0.2, 3.0, dim)
    return rng.normal(size=(n, dim)) @ mixing + 5.0


def test_spherize_whitens_the_negcons_and_stays_finite_when_features_outnumber_them():
    rng = np.random.default_rng(0)
    x = np.vstack([_correlated(rng, 400, 8), _correlated(rng, 5, 8) + 3])
    wells = pd.DataFrame(
        [_row("P1", f"n{i}", "DMSO", "negcon") for i in range(400)] + [_row("P1", f"t{i}", "c1") for i in range(5)]
    )
    out, kept, _ = normalise(x, wells, "spherize", spherize_reg=1e-9)
    neg = out[:400]
    np.testing.assert_allclose(neg.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(np.cov(neg, rowvar=False), np.eye(8), atol=1e-4)
    assert np.abs(np.cov(x[:400], rowvar=False) - np.eye(8)).max() > 1  # it was far from identity before

    # D = 64 features, 10 negcons: covariance of rank 9. Directions the negcons span come out with variance
    # s / (s + lam) (close to 1); the others get the capped gain, so nothing explodes.
    x = np.vstack([_correlated(rng, 10, 64), _correlated(rng, 4, 64)])
    x[:, 5] = 2.5  # a constant feature
    wells = pd.DataFrame(
        [_row("P1", f"n{i}", "DMSO", "negcon") for i in range(10)] + [_row("P1", f"t{i}", "c1") for i in range(4)]
    )
    for method in ("spherize", "mad+spherize"):
        out, _, _ = normalise(x, wells, method)
        assert np.isfinite(out).all()
        eig = np.linalg.eigvalsh(np.cov(out[:10], rowvar=False))
        assert eig.max() <= 1 + 1e-9 and (eig > 0.5).sum() == 9, (method, eig[-10:])
        assert np.abs(out[:, 5]).max() < 1e-9  # a constant feature stays constant (0), no division blow-up


def test_plate_without_negcons_is_skipped_and_reported():
    x, meta = planted(0, n_plates=3, n_perts=4, n_negcon=4)
    no_negcon = (meta["plate"] == "P2") & (meta["control_type"] == "negcon")
    meta.loc[no_negcon, ["perturbation", "control_type"]] = ["c9", ""]
    one_negcon = (meta["plate"] == "P1") & (meta["control_type"] == "negcon")
    meta.loc[one_negcon[one_negcon].index[1:], ["perturbation", "control_type"]] = ["c9", ""]
    out, kept, skipped = normalise(x, meta, "mad")
    assert [(s["plate"], s["n_wells"], s["n_negcon"]) for s in skipped] == [("P1", 8, 1), ("P2", 8, 0)]
    assert "needs >= 2" in skipped[0]["reason"]
    assert len(kept) == len(out) == 8 and set(kept["plate"]) == {"P0"}

    fields = meta.loc[meta.index.repeat(2)].reset_index(drop=True)  # two sites per well
    scores = profile_scores(np.repeat(x, 2, axis=0), fields, "mad", null_size=NULL)
    assert scores["n_wells"] == 24 and scores["n_wells_scored"] == 8
    assert scores["skipped_wells_in_skipped_plates"] == 16 and len(scores["skipped_plates"]) == 2


# ---------------------------------------------------------------- phenotypic activity


def test_expected_null_ap_matches_copairs_null_distribution():
    for k, n in [(1, 4), (2, 5), (3, 20), (5, 60)]:
        assert expected_null_ap(k, n) == pytest.approx(random_ap(50_000, k, n, seed=1).mean(), abs=5e-3)
    assert expected_null_ap(1, 1) == 1.0


def test_planted_perturbations_are_retrieved_after_removing_the_plate_effect():
    x, meta = planted(0, plate_offset=8.0)
    raw = phenotypic_activity(*normalise(x, meta, "none")[:2], null_size=NULL)
    mad = phenotypic_activity(*normalise(x, meta, "mad")[:2], null_size=NULL)
    # The plate offset makes same-plate negcons the nearest neighbours: replicates (other plates) rank low.
    assert raw["mean_map"] < raw["expected_null_map"] and raw["fraction_retrieved"] == 0
    assert mad["mean_map"] > 0.85 and mad["fraction_retrieved"] >= 0.95, mad
    assert mad["n_perturbations"] == 24 and mad["expected_null_map"] < 0.2
    assert all(0 < r["corrected_p_value"] < 0.05 for r in mad["per_perturbation"] if r["retrieved"])
    assert mad["by_control_type"]["treatment"]["n_perturbations"] == 24


def test_shuffled_labels_score_at_the_null():
    x, meta = planted(0, plate_offset=8.0)
    x, meta, _ = normalise(x, meta, "mad")
    treat = meta["control_type"] != "negcon"
    k = meta.loc[treat, "perturbation"].str[1:].astype(int).to_numpy()
    plate = meta.loc[treat, "plate"].str[1:].astype(int).to_numpy()
    maps, nulls, retrieved = [], [], []
    for s in range(3):
        # Relabel well (plate p, perturbation k) as k + shift[p] (distinct shifts per plate): a shuffle in which no new
        # group keeps two wells of one true perturbation. (A plain permutation keeps ~3% of true replicate pairs,
        # which rightly lifts mAP a few points above the null.)
        shift = np.random.default_rng(s).choice(24, size=3, replace=False)
        shuffled = meta.copy()
        shuffled.loc[treat, "perturbation"] = [f"c{(a + shift[b]) % 24}" for a, b in zip(k, plate)]
        res = phenotypic_activity(x, shuffled, null_size=NULL)
        maps.append(res["mean_map"])
        nulls.append(res["expected_null_map"])
        retrieved.append(res["fraction_retrieved"])
    # Unshuffled, the same data score ~0.9 against a null of ~0.11 (test above).
    assert abs(np.mean(maps) - np.mean(nulls)) < 0.04, (maps, nulls)
    assert max(retrieved) <= 0.05


def test_same_position_pairs_are_excluded_and_reported_as_leakage():
    # No biology at all: every well carries only its well position's effect. Plates come in pairs sharing a random
    # layout, so each perturbation has one same-position replicate and four at two other positions.
    rng = np.random.default_rng(0)
    n_perts, n_negcon, dim, n_positions = 20, 40, 32, 96
    position_effect = rng.normal(size=(n_positions, dim)) * 3
    x, rows = [], []
    for pair in range(3):
        layout = rng.permutation(n_positions)
        for p in (2 * pair, 2 * pair + 1):
            for j in range(n_perts + n_negcon):
                well = f"w{layout[j]:02d}"
                x.append(position_effect[layout[j]] + rng.normal(size=dim))
                rows.append(_row(f"P{p}", well, f"c{j}") if j < n_perts else _row(f"P{p}", well, "DMSO", "negcon"))
    res = phenotypic_activity(np.array(x), pd.DataFrame(rows), null_size=NULL)
    leak = res["same_position_included"]
    assert abs(res["mean_map"] - res["expected_null_map"]) < 0.03 and res["fraction_retrieved"] <= 0.1, res
    assert leak["mean_map"] > leak["expected_null_map"] + 0.1 and leak["fraction_retrieved"] >= 0.75, leak
    assert res["n_perturbations"] == leak["n_perturbations"] == n_perts
    assert {r["n_scored_wells"] for r in res["per_perturbation"]} == {6}


def test_small_data_is_finite_and_unscorable_perturbations_are_counted():
    # Demo-sized: 2 plates, 3 negcons each; c0, c1 replicated at different positions, c2 only at the same
    # position on both plates, c3 in one well, one treatment well without a perturbation name.
    rng = np.random.default_rng(1)
    rows = []
    for p in ("P1", "P2"):
        rows += [_row(p, f"A0{i}", "DMSO", "negcon") for i in range(3)]
        rows += [_row(p, "B01" if p == "P1" else "B02", "c0"), _row(p, "C01" if p == "P1" else "C02", "c1")]
        rows += [_row(p, "D01", "c2")]
    rows += [_row("P1", "E01", "c3"), _row("P2", "E01", "")]
    meta = pd.DataFrame(rows)
    x = rng.normal(size=(len(meta), 16))
    res = phenotypic_activity(*normalise(x, meta, "mad")[:2], null_size=NULL)
    assert res["skipped"] == {
        "wells_without_perturbation": 1,
        "zero_profile_wells": 0,
        "single_well_perturbations": 1,
        "same_position_only_perturbations": 1,
    }
    assert [r["perturbation"] for r in res["per_perturbation"]] == ["c0", "c1"]
    assert res["same_position_included"]["n_perturbations"] == 3
    for r in res["per_perturbation"] + res["same_position_included"]["per_perturbation"]:
        assert 0 <= r["mean_average_precision"] <= 1 and 0 < r["p_value"] <= 1 and r["n_scored_wells"] == 2


# ---------------------------------------------------------------- phenotypic consistency


def test_perturbations_sharing_a_target_retrieve_each_other():
    targets = {f"c{k}": f"T{k // 3}" for k in range(18)}  # 6 targets x 3 perturbations
    targets["c18"] = "T0|T1"  # two targets: counts for both
    targets["c19"] = "Tsolo"  # the only perturbation of its target
    # c20..c23 have no target
    x, meta = planted(2, n_perts=24, targets=targets, effect=1.0)
    x, meta, _ = normalise(x, meta, "mad")
    res = phenotypic_consistency(x, meta, null_size=NULL)
    per = {r["target"]: r for r in res["per_target"]}
    assert set(per) == {f"T{i}" for i in range(6)}
    assert per["T0"]["n_perturbations"] == 4 and per["T2"]["n_perturbations"] == 3
    assert res["skipped"]["perturbations_without_target"] == 4 and res["skipped"]["single_perturbation_targets"] == 1
    assert res["n_perturbations_with_target"] == 20 and res["n_targets"] == 6
    assert res["mean_map"] > res["expected_null_map"] + 0.3 and res["fraction_retrieved"] >= 0.8, res

    # Shuffled targets: the same data at the null.
    shuffled = meta.copy()
    treat = shuffled["control_type"] != "negcon"
    perts = sorted(targets)
    new = dict(zip(perts, np.random.default_rng(0).permutation([targets[p] for p in perts])))
    shuffled.loc[treat, "target"] = shuffled.loc[treat, "perturbation"].map(new).fillna("")
    null = phenotypic_consistency(x, shuffled, null_size=NULL)
    assert abs(null["mean_map"] - null["expected_null_map"]) < 0.1 and null["fraction_retrieved"] == 0, null


def test_consistency_reports_what_it_cannot_score():
    x, meta = planted(0, n_perts=4, targets={"c0": "T0", "c1": "T0", "c2": "T0"})
    res = phenotypic_consistency(x, meta, null_size=NULL)  # only one target: no negative pairs
    assert res["mean_map"] is None and res["n_targets"] == 0 and "no pairs" in res["not_scored"]
    x, meta = planted(0, n_perts=4, targets={"c0": "T0", "c1": "T1"})
    res = phenotypic_consistency(x, meta, null_size=NULL)
    assert res["skipped"]["single_perturbation_targets"] == 2 and "no target is shared" in res["not_scored"]


# ---------------------------------------------------------------- errors


def test_bad_input_errors_name_the_problem():
    x, meta = planted(0, n_plates=2, n_perts=3, n_negcon=2)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['control_type', 'target'\]"):
        well_profiles(x, meta.drop(columns=["control_type", "target"]))
    with pytest.raises(ValueError, match="rows but the features have"):
        well_profiles(x[:-1], meta)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf, first row 3"):
        well_profiles(bad, meta)
    with pytest.raises(ValueError, match=r"unknown value\(s\) \['DMSO'\]"):
        well_profiles(x, meta.assign(control_type=meta["control_type"].replace("negcon", "DMSO")))
    twice = pd.concat([meta, meta.assign(perturbation="other")], ignore_index=True)
    with pytest.raises(ValueError, match=r"disagree on \['perturbation'\], first batch=B1 plate=P0"):
        well_profiles(np.vstack([x, x]), twice)
    with pytest.raises(ValueError, match="normalisation method 'zscore' unknown"):
        normalise(x, meta, "zscore")
    with pytest.raises(ValueError, match="column 'well' is empty"):
        normalise(x, meta.assign(well=""), "mad")

    no_negcon = meta.assign(control_type="", perturbation=meta["perturbation"].replace("DMSO", "c9"))
    with pytest.raises(ValueError, match="no plate can be normalised.*P0: 0 negcon well"):
        normalise(x, no_negcon, "mad")
    with pytest.raises(ValueError, match="phenotypic activity: no negative-control wells"):
        phenotypic_activity(x, no_negcon, null_size=NULL)
    conflicting = meta.assign(target=np.where(meta["plate"] == "P0", "T1", "T2"))
    with pytest.raises(ValueError, match="perturbation 'c0' has conflicting targets across wells"):
        phenotypic_consistency(x, conflicting, null_size=NULL)
