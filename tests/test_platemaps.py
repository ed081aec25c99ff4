"""Plate maps: the layout `dinocell synth` plants (perturbations, targets, controls, nuisance effects) and its gallery
files, and discovery reading plate maps into the manifest (gallery maps, a user CSV, missing and malformed maps);
also issue 9 section 4: the batch of load_data CSVs outside the gallery layout, and non-JUMP channels."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dinocell import storage
from dinocell.channels import FLUORESCENT_CHANNELS
from dinocell.config import DataConfig
from dinocell.jump import layout
from dinocell.jump.discover import discover_fields
from dinocell.jump.exclusions import DiscoveryError
from dinocell.jump.manifest import FieldRecord, Manifest
from dinocell.synth import nuisance
from dinocell.synth.bucket import plan_bucket, synth_bucket
from dinocell.synth.cells import Phenotype
from dinocell.synth.nuisance import edge_weight, site_effects, well_effects
from dinocell.synth.perturbations import EFFECT_SCALES, MULTIPLICATIVE, apply_effect


def read_csv(uri: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_text(uri))))


# --------------------------------------------------------------------------- the synthetic layout


def tsv(uri: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_text(uri)), delimiter="\t"))


def test_plate_maps_follow_the_jump_target_layout(tmp_path):
    """barcode_platemap.csv + platemap txt per batch and the external metadata, as in cpg0000 JUMP-Target-1."""
    report = synth_bucket(str(tmp_path / "s4"), size=16, seed=0, workers=2)  # 2 batches x 2 plates x 4 wells
    barcodes = {bc for _, bc, _ in report.plates}
    seen_barcodes, layouts = set(), []
    for uri in report.platemap_uris:
        if uri.endswith("barcode_platemap.csv"):
            rows = read_csv(uri)
            assert list(rows[0]) == ["Assay_Plate_Barcode", "Plate_Map_Name"]
            assert {r["Plate_Map_Name"] for r in rows} == {report.platemap_name}
            seen_barcodes |= {r["Assay_Plate_Barcode"] for r in rows}
        else:
            rows = tsv(uri)
            assert list(rows[0]) == ["plate_map_name", "well_position", "broad_sample", "solvent"]
            layouts.append({r["well_position"]: r["broad_sample"] for r in rows})
            assert {r["solvent"] for r in rows} == {"DMSO"}
    assert seen_barcodes == barcodes and len(layouts) == 2 and layouts[0] == layouts[1]
    (meta_uri,) = report.external_metadata_uris
    assert meta_uri.endswith(f"external_metadata/{report.platemap_name}_metadata.tsv")
    meta = {r["broad_sample"]: r for r in tsv(meta_uri)}
    assert list(next(iter(meta.values()))) == ["broad_sample", "pert_iname", "target", "pert_type", "control_type"]
    # DMSO as in the real files: an empty broad_sample, named by the metadata row with an empty broad_sample.
    assert meta[""] == {"broad_sample": "", "pert_iname": "DMSO", "target": "", "pert_type": "control",
                        "control_type": "negcon"}  # fmt: skip
    # The default 4-well layout: 2 DMSO wells + 1 perturbation x 2 replicates, the same on every plate.
    assert sorted(layouts[0].values()) == ["", "", "BRD-SYNTH-P01", "BRD-SYNTH-P01"]
    assert meta["BRD-SYNTH-P01"]["pert_type"] == "trt" and meta["BRD-SYNTH-P01"]["target"] == "SYNTH-TGT1"
    truth = report.truth()
    assert len(truth) == report.n_wells == 16
    for (plate, well), t in truth.items():
        m = meta[layouts[0][well]]
        assert plate in barcodes and (t["perturbation"], t["target"], t["control_type"], t["pert_type"]) == (
            m["pert_iname"], m["target"], m["control_type"], m["pert_type"])  # fmt: skip
    wells = {r["Metadata_Well"] for r in read_csv(report.load_data_uris[0])}
    assert wells == set(layouts[0])
    assert "plate map 2 DMSO + 0 poscon + 2 treated wells (1 perturbations, 1 targets) per plate" in report.summary()


def test_layout_replicates_targets_and_seed_streams():
    kw = {"batches": 2, "plates_per_batch": 2, "wells_per_plate": 24, "sites_per_well": 1, "seed": 4}
    plan = plan_bucket(**kw)
    perts = plan.layout.perturbations
    # The documented default for 24 wells: 4 DMSO + 10 perturbations x 2 replicates, 2 perturbations per target.
    counts = Counter(plan.perturbation(layout.well_name(r, c)).name for r, c in plan.wells)
    assert counts == {"DMSO": 4, **{f"SYNTH-P{i:02d}": 2 for i in range(1, 11)}}
    assert Counter(p.target for p in perts if p.target) == {f"SYNTH-TGT{t}": 2 for t in range(1, 6)}
    assert [p.control_type for p in perts] == ["negcon"] + [""] * 10
    # Every plate carries every perturbation on its replicate wells (different positions) with the same effect.
    by_plate = Counter((f.plate.barcode, f.perturbation.name) for f in plan.fields())
    assert set(by_plate.values()) <= {2, 4} and len(by_plate) == 4 * 11
    # Same target -> effects point the same way; different targets -> unrelated; all smaller than a positive control.
    z = {p.name: effect_units(p) for p in perts[1:]}
    same, other = [], []
    for k, p1 in enumerate(perts[1:]):
        for p2 in perts[k + 2 :]:
            (same if p1.target == p2.target else other).append(cosine(z[p1.name], z[p2.name]))
    assert min(same) > 0.3 and np.mean(same) > 0.6 and abs(np.mean(other)) < 0.25, (same, other)
    strong = plan_bucket(**{**kw, "poscon": 2}).layout.perturbations
    assert [p.name for p in strong[:3]] == ["DMSO", "SYNTH-POS1", "SYNTH-POS2"]
    assert {p.control_type for p in strong[1:3]} == {"poscon"}
    pos_norm = min(np.linalg.norm(effect_units(p)) for p in strong[1:3])
    assert pos_norm > max(np.linalg.norm(v) for v in z.values())
    # Deterministic, and the layout's stream leaves the plates alone (and the plates' stream leaves the layout alone).
    assert plan_bucket(**kw).layout == plan.layout
    other_layout = plan_bucket(**{**kw, "perturbations": 4, "targets": 2})
    assert [(p.barcode, p.phenotype) for p in other_layout.plates] == [(p.barcode, p.phenotype) for p in plan.plates]
    assert plan_bucket(**{**kw, "plates_per_batch": 3}).layout == plan.layout
    assert plan_bucket(**{**kw, "seed": 5}).layout != plan.layout


def effect_units(p) -> np.ndarray:
    """A perturbation's effect in EFFECT_SCALES units (log for the multiplicative numbers)."""
    eff = dict(p.effect)
    return np.array([(np.log(eff[k]) if k in MULTIPLICATIVE else eff[k]) / s for k, s in EFFECT_SCALES.items()])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_nuisance_batch_and_well_position_effects():
    plan = plan_bucket(batches=3, plates_per_batch=2, wells_per_plate=2, sites_per_well=1, seed=2)
    # One brightness multiplier per batch and channel, shared by its plates, different between batches.
    per_batch = {p.batch: p.batch_brightness for p in plan.plates}
    assert len(per_batch) == 3 and len(set(per_batch.values())) == 3
    assert all(p.batch_brightness == per_batch[p.batch] for p in plan.plates)
    assert all(set(dict(b)) == set(FLUORESCENT_CHANNELS) for b in per_batch.values())
    # Well position: edge wells dimmer and denser than inner ones on average; inside, a smooth per-plate gradient.
    base = Phenotype()
    edge_light, inner_light, edge_density, inner_density = [], [], [], []
    for k in range(40):
        for r in range(1, 17):
            for c in range(1, 25):
                ph = well_effects(base, 0, (k, 0), r, c, 16, 24)
                e = edge_weight(r, c, 16, 24)
                (edge_light if e == 1 else inner_light if e == 0 else []).append(np.log(ph.brightness_dna))
                (edge_density if e == 1 else inner_density if e == 0 else []).append(np.log(ph.density))
    assert np.mean(inner_light) - np.mean(edge_light) == pytest.approx(-np.log(1 - nuisance.EDGE_DIMMING), abs=0.02)
    assert np.mean(edge_density) - np.mean(inner_density) == pytest.approx(np.log(1 + nuisance.EDGE_DENSITY), abs=0.02)
    inner = [(r, c) for r in range(3, 15) for c in range(3, 23)]
    light = np.array([np.log(well_effects(base, 0, (1, 1), r, c, 16, 24).brightness_er) for r, c in inner])
    design = np.array([[1.0, r, c] for r, c in inner])
    coef, *_ = np.linalg.lstsq(design, light, rcond=None)
    assert np.abs(design @ coef - light).max() < 1e-9 and np.abs(coef[1:]).max() > 1e-4  # a plane, not flat
    # The field phenotypes of one perturbation differ between wells only by these effects (the plate map is exact),
    # and between the sites of a well only by the site's own context.
    fields = [f for f in plan.fields() if f.plate == plan.plates[0]]
    for f in fields:
        expected = well_effects(apply_effect(f.plate.phenotype, f.perturbation.effect), 2, (0, 0), f.row, f.col, 16, 24)
        assert f.phenotype == site_effects(expected, 2, (0, 0), f.row, f.col, f.site, plan.site_variation).clamped()


def test_sites_of_a_well_differ_in_population_context():
    kw = {"batches": 1, "plates_per_batch": 2, "wells_per_plate": 24, "sites_per_well": 9, "seed": 4}
    flat, varied = plan_bucket(**kw), plan_bucket(**kw, site_variation=1)
    assert flat.site_variation == 0.0  # off by default: the sites of a well share one phenotype
    assert flat.plates == varied.plates and flat.layout == varied.layout  # its own seed stream
    by_well: dict = {}
    for f0, f1 in zip(flat.fields(), varied.fields(), strict=True):
        by_well.setdefault((f0.plate.barcode, f0.well), []).append((f0.phenotype, f1.phenotype))
    log_density, log_radius = [], []
    for sites in by_well.values():
        assert len({ph0 for ph0, _ in sites}) == 1  # site_variation 0: one phenotype per well
        assert len({ph1 for _, ph1 in sites}) == len(sites)
        well = sites[0][0]
        log_density += [np.log(ph1.density / well.density) for _, ph1 in sites]
        log_radius += [np.log(ph1.cell_radius / well.cell_radius) for _, ph1 in sites]
        for _, ph1 in sites:  # what perturbations move besides density and size is the well's own
            for k in set(EFFECT_SCALES) - {"density", "cell_radius"}:
                assert getattr(ph1, k) == getattr(well, k), k
    # Confluence spreads the density as planned, and crowded sites hold smaller cells.
    assert np.std(log_density) == pytest.approx(nuisance.SITE_SIGMAS["confluence"], rel=0.15)
    assert np.corrcoef(log_density, log_radius)[0, 1] < -0.5
    assert set(nuisance.SITE_SIGMAS) - {"confluence", "cell_radius"} <= set(Phenotype().to_dict()) - set(EFFECT_SCALES)
    twice = plan_bucket(**kw, site_variation=2)
    spread = [np.log(f.phenotype.density) for f in twice.fields()]
    assert np.std(spread) > np.std([np.log(f.phenotype.density) for f in varied.fields()])
    for bad in (-0.5, 5, True, "1"):
        with pytest.raises(ValueError, match="site_variation"):
            plan_bucket(**kw, site_variation=bad)


# --------------------------------------------------------------------------- discovery: the gallery's maps

TRUTH = ("perturbation", "control_type", "target")


def synth_small(root: Path, **kw):
    """2 batches x 2 plates, 8 wells (2 DMSO, 1 positive control and 2 perturbations x 2), 2 sites, 16 x 16."""
    args = {"batches": 2, "plates_per_batch": 2, "wells_per_plate": 8, "sites_per_well": 2, "perturbations": 2,
            "poscon": 1, "negcon_wells": 2, "size": 16, "seed": 1, "workers": 2, "with_illum": False}  # fmt: skip
    return synth_bucket(str(root), **{**args, **kw})


def discover(root, **kw):
    return discover_fields(DataConfig(images_prefix=storage.join(str(root), "images") + "/", val_fraction=0.5, **kw))


def test_discovered_manifest_carries_the_planted_plate_map(s3_bucket, tmp_path):
    root = f"s3://{s3_bucket}/cpg0000-jump-pilot/source_4"
    report = synth_small(root)
    res = discover(root)
    truth = report.truth()
    manifest = res.manifest
    assert len(manifest) == report.n_fields == 64  # 4 plates x 8 wells x 2 sites
    for r in manifest.records():
        t = truth[(r.plate, r.well)]
        assert (r.perturbation, r.control_type, r.target) == tuple(t[k] for k in TRUTH), r.field_id
    assert Counter(manifest.column("control_type")) == {"negcon": 16, "poscon": 16, "": 32}
    assert set(manifest.column("perturbation")) == {"DMSO", "SYNTH-POS1", "SYNTH-P01", "SYNTH-P02"}
    pm = res.summary["plate_maps"]
    assert (pm["source"], pm["plates"], pm["plates_with_map"], pm["plates_without_map"]) == ("gallery", 4, 4, 0)
    assert (pm["wells_without_entry"], pm["fields_without_entry"], pm["perturbations"]) == (0, 0, 4)
    assert pm["fields_per_control_type"] == {"negcon": 16, "poscon": 16, "treatment": 32, "unannotated": 0}
    assert sorted(pm["files"]) == sorted(report.platemap_uris + report.external_metadata_uris)
    assert "plate maps (gallery): 4 of 4 plate(s) mapped, 4 perturbation(s)" in res.format_summary()
    # The columns survive the Parquet round trip, splits and channel selection (shards and streams use those).
    manifest.write(str(tmp_path / "m.parquet"))
    back = Manifest.read(str(tmp_path / "m.parquet"))
    assert [(r.field_id, r.perturbation, r.control_type, r.target) for r in back.records()] == [
        (r.field_id, r.perturbation, r.control_type, r.target) for r in manifest.records()]  # fmt: skip
    val = back.split("val").select_channels(["DNA"])
    assert len(val) == 32 and set(val.column("perturbation")) == {"DMSO", "SYNTH-POS1", "SYNTH-P01", "SYNTH-P02"}


def test_missing_plate_maps_and_wells_are_counted_not_fatal(tmp_path):
    root = tmp_path / "s4"
    report = synth_small(root)
    (b1, p1a, _), (_, p1b, _), (b2, *_), _ = report.plates
    pm1 = root / "workspace" / "metadata" / "platemaps" / b1
    # batch 1: plate B points at a map that does not exist, plate A's map lost one well; batch 2: no maps at all.
    (pm1 / "barcode_platemap.csv").write_text(f"Assay_Plate_Barcode,Plate_Map_Name\n{p1a},SYNTH-PLATEMAP-1\n"
                                              f"{p1b},LOST-MAP\n")  # fmt: skip
    txt = pm1 / "platemap" / "SYNTH-PLATEMAP-1.txt"
    lines = txt.read_text().splitlines()
    dropped = lines.pop(3).split("\t")[1]
    txt.write_text("\n".join(lines) + "\n")
    for f in (root / "workspace" / "metadata" / "platemaps" / b2).rglob("*"):
        if f.is_file():
            f.unlink()
    res = discover(root)
    pm = res.summary["plate_maps"]
    assert (pm["plates"], pm["plates_with_map"], pm["plates_without_map"]) == (4, 1, 3)
    reasons = pm["plates_without_map_reasons"]
    assert reasons[f"{b1}/{p1b}"] == f"plate map {pm1 / 'platemap' / 'LOST-MAP.txt'} not found"
    assert all(v.startswith("no barcode_platemap.csv under ") for k, v in reasons.items() if k.startswith(b2))
    assert (pm["wells_without_entry"], pm["fields_without_entry"]) == (1, 2)  # 1 well x 2 sites
    assert pm["wells_without_entry_examples"] == [f"{b1}/{p1a}/{dropped}"]
    assert pm["fields_per_control_type"]["unannotated"] == 2 + 3 * 16
    truth = report.truth()
    for r in res.manifest.records():
        annotated = r.plate == p1a and r.well != dropped
        expect = tuple(truth[(r.plate, r.well)][k] for k in TRUTH) if annotated else ("", "", "")
        assert (r.perturbation, r.control_type, r.target) == expect, r.field_id
    text = res.format_summary()
    assert f"no plate map for {b1}/{p1b}" in text and "1 well(s) missing from their plate map" in text


# --------------------------------------------------------------------------- discovery: hand-written maps

BATCH, PLATE = "2021_01_01_Batch1", "PLATE1"


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def load_data(root: Path, wells: list[str], channels=("DNA",), batch=BATCH, plate=PLATE, where: Path | None = None,
              extra: dict | None = None) -> str:  # fmt: skip
    """A URL-form load_data CSV (one site per well) under the gallery layout, or at `where`."""
    header = [f"URL_Orig{c}" for c in channels] + ["Metadata_Plate", "Metadata_Well", "Metadata_Site", *(extra or {})]
    rows = [",".join(header)]
    for i, w in enumerate(wells):
        urls = [f"{root}/images/{batch}/images/{plate}__t-Measurement1/Images/{w}-{c}.tiff" for c in channels]
        rows.append(",".join([*urls, plate, w, "1", *(v[i] for v in (extra or {}).values())]))
    path = where or root / "workspace" / "load_data_csv" / batch / plate / "load_data.csv"
    return write(path, "\n".join(rows) + "\n")


def gallery(root: Path, platemap: str, metadata: str | None = None, barcodes: str | None = None) -> None:
    pm = root / "workspace" / "metadata" / "platemaps" / BATCH
    write(pm / "barcode_platemap.csv", barcodes or f"Assay_Plate_Barcode,Plate_Map_Name\n{PLATE},MAP-A\n")
    write(pm / "platemap" / "MAP-A.txt", platemap)
    if metadata is not None:
        write(root / "workspace" / "metadata" / "external_metadata" / "MAP-A_metadata.tsv", metadata)


def tab(*rows: str) -> str:
    return "\n".join(r.replace("|", "\t") for r in rows) + "\n"


def annotations(res) -> dict:
    return {r.well: (r.perturbation, r.control_type, r.target) for r in res.manifest.records()}


def test_dmso_forms_control_types_and_map_columns(tmp_path):
    """Empty broad_sample (the real files) and "DMSO" both give DMSO negcon; JUMP's control types fold in."""
    load_data(tmp_path, ["A01", "A02", "A03", "A04", "A05", "A06", "A07"])
    gallery(
        tmp_path,
        tab("plate_map_name|well_position|broad_sample|solvent", "MAP-A|A1||DMSO", "MAP-A|A02|DMSO|DMSO",
            "MAP-A|A03|BRD-1|DMSO", "MAP-A|A04|BRD-2|DMSO", "MAP-A|A05|BRD-3|DMSO", "MAP-A|A06|BRD-NOMETA|DMSO"),
        tab("broad_sample|InChIKey|pert_iname|target|pert_type|control_type", "|x|DMSO||control|negcon",
            "BRD-1|x|aspirin|PTGS1|trt|trt", "BRD-2|x|nocodazole|TUBB|control|poscon_cp", "BRD-3|x|odd|T3|trt|weird"),
    )  # fmt: skip
    res = discover_fields(DataConfig(images_prefix=str(tmp_path / "images") + "/", channels=["DNA"]))
    assert annotations(res) == {
        "A01": ("DMSO", "negcon", ""),
        "A02": ("DMSO", "negcon", ""),  # broad_sample "DMSO", no metadata row: the solvent itself
        "A03": ("aspirin", "", "PTGS1"),
        "A04": ("nocodazole", "poscon", "TUBB"),
        "A05": ("odd", "", "T3"),
        "A06": ("BRD-NOMETA", "", ""),  # no metadata row: the broad_sample names it
        "A07": ("", "", ""),  # not in the map
    }
    pm = res.summary["plate_maps"]
    assert pm["unknown_control_types"] == {"weird": 1} and pm["wells_without_entry_examples"] == [f"{BATCH}/{PLATE}/A07"]
    # Without any external metadata the solvent names DMSO wells.
    (tmp_path / "workspace" / "metadata" / "external_metadata" / "MAP-A_metadata.tsv").unlink()
    res = discover_fields(DataConfig(images_prefix=str(tmp_path / "images") + "/", channels=["DNA"]))
    assert annotations(res)["A01"] == ("DMSO", "negcon", "") and annotations(res)["A03"] == ("BRD-1", "", "")


@pytest.mark.parametrize(
    "part, text, message",
    [
        ("barcodes", "Assay_Plate_Barcode,Map\nPLATE1,MAP-A\n", "barcode_platemap.csv: no column 'Plate_Map_Name'"),
        ("barcodes", "Assay_Plate_Barcode,Plate_Map_Name\nPLATE1,MAP-A\nPLATE1,MAP-B\n", "row 2: plate PLATE1 has two"),
        ("platemap", tab("plate_map_name|well|broad_sample", "MAP-A|A01|BRD-1"), "MAP-A.txt: no column 'well_position'"),
        ("platemap", tab("well_position|broad_sample", "A01|BRD-1", "Z1x|BRD-2"),
         "MAP-A.txt: row 2: column well_position: 'Z1x' is not a well name"),
        ("platemap", tab("well_position|broad_sample", "A01|BRD-1", "A1|BRD-2"), "row 2: well A01 listed twice"),
        ("metadata", tab("sample|pert_iname", "BRD-1|x"), "MAP-A_metadata.tsv: no column 'broad_sample'"),
    ],
)
def test_malformed_maps_name_the_file_column_and_row(tmp_path, part, text, message):
    load_data(tmp_path, ["A01"])
    files = {"platemap": tab("well_position|broad_sample", "A01|BRD-1"), "metadata": tab("broad_sample", "BRD-1")}
    files[part] = text
    gallery(tmp_path, files["platemap"], files["metadata"], files.get("barcodes"))
    with pytest.raises(DiscoveryError, match=message):
        discover_fields(DataConfig(images_prefix=str(tmp_path / "images") + "/", channels=["DNA"]))


def test_user_plate_metadata_csv_replaces_the_gallery(tmp_path):
    load_data(tmp_path, ["A01", "A02", "B01"])
    load_data(tmp_path, ["A01"], plate="PLATE2")
    gallery(tmp_path, tab("well_position|broad_sample", "A01|BRD-GALLERY"))
    user = write(tmp_path / "meta.csv", "Metadata_Plate,Metadata_Well,perturbation,control_type,target\n"
                 "PLATE1,A1,DMSO,negcon,\nPLATE1,A02,drug-x,,EGFR\nPLATE1,B01,staurosporine,poscon,PKC\n")  # fmt: skip
    cfg = DataConfig(images_prefix=str(tmp_path / "images") + "/", channels=["DNA"], plate_metadata=user)
    res = discover_fields(cfg)
    got = {(r.plate, r.well): (r.perturbation, r.control_type, r.target) for r in res.manifest.records()}
    assert got == {("PLATE1", "A01"): ("DMSO", "negcon", ""), ("PLATE1", "A02"): ("drug-x", "", "EGFR"),
                   ("PLATE1", "B01"): ("staurosporine", "poscon", "PKC"), ("PLATE2", "A01"): ("", "", "")}  # fmt: skip
    pm = res.summary["plate_maps"]
    assert pm["source"] == "data.plate_metadata" and pm["files"] == [user]
    assert pm["plates_without_map_reasons"] == {f"{BATCH}/PLATE2": "plate not in data.plate_metadata"}
    # A batch column restricts entries to that batch; a bad control type or a missing column is an error.
    write(tmp_path / "meta2.csv", "batch,plate,well,perturbation\nOTHER,PLATE1,A01,x\n")
    res = discover_fields(DataConfig(**{**cfg.__dict__, "plate_metadata": str(tmp_path / "meta2.csv")}))
    assert res.summary["plate_maps"]["plates_without_map"] == 2
    write(tmp_path / "bad.csv", "plate,well,perturbation,control_type\nPLATE1,A01,x,negative\n")
    with pytest.raises(DiscoveryError, match=r"bad.csv: row 1: column control_type: 'negative' is not a control"):
        discover_fields(DataConfig(**{**cfg.__dict__, "plate_metadata": str(tmp_path / "bad.csv")}))
    write(tmp_path / "nopert.csv", "plate,well,compound\nPLATE1,A01,x\n")
    with pytest.raises(DiscoveryError, match=r"nopert.csv: no column 'perturbation'"):
        discover_fields(DataConfig(**{**cfg.__dict__, "plate_metadata": str(tmp_path / "nopert.csv")}))


# --------------------------------------------------------------------------- issue 9 section 4


def test_batch_of_a_users_own_export(tmp_path):
    """Outside the gallery layout: Metadata_Batch, else data.default_batch, else the CSV's folder name."""
    export = tmp_path / "exports" / "run7"
    rel = ["A01", "A02"]

    def plain_csv(name: str, extra: dict | None = None) -> str:
        header = ["URL_OrigDNA", "Metadata_Plate", "Metadata_Well", "Metadata_Site", *(extra or {})]
        rows = [",".join(header)] + [",".join([f"plate/{w}.tiff", "P1", w, "1", *(v[i] for v in (extra or {}).values())])
                                     for i, w in enumerate(rel)]  # fmt: skip
        return write(export / name, "\n".join(rows) + "\n")

    prefix = str(tmp_path / "images") + "/"
    with_col = plain_csv("with_batch.csv", {"Metadata_Batch": ["B-meta", ""]})
    res = discover_fields(DataConfig(images_prefix=prefix, load_data=[with_col], channels=["DNA"]))
    assert res.manifest.column("batch") == ["B-meta", "run7"]  # an empty Metadata_Batch falls through
    assert res.summary["inputs"]["batch_from"] == {"Metadata_Batch": 1, "CSV folder name": 1}
    plain = plain_csv("plain.csv")
    res = discover_fields(DataConfig(images_prefix=prefix, load_data=[plain], channels=["DNA"], default_batch="B-cfg"))
    assert res.manifest.column("batch") == ["B-cfg", "B-cfg"] and res.summary["excluded_total"] == 0
    assert res.summary["inputs"]["batch_from"] == {"data.default_batch": 2}
    res = discover_fields(DataConfig(images_prefix=prefix, load_data=[plain], channels=["DNA"], batches=["run7"]))
    assert res.manifest.column("field_id") == ["run7/P1/A01/1", "run7/P1/A02/1"]
    assert res.manifest.column("uri_DNA")[0] == prefix + "plate/A01.tiff"
    assert res.summary["plate_maps"]["plates_without_map"] == 1  # no gallery here: counted, not fatal


def test_non_jump_channels_make_exactly_those_manifest_columns(tmp_path):
    channels = ["Actin", "Mito", "Phase"]  # no DNA, an extra stain, a transmitted-light channel
    src = load_data(tmp_path, ["A01", "B02"], channels=channels)
    res = discover_fields(DataConfig(images_prefix=str(tmp_path / "images") + "/", channels=channels))
    out = str(tmp_path / "m.parquet")
    res.manifest.write(out)
    back = Manifest.read(out)
    assert back.channels == channels and res.summary["channels"] == channels
    uri_cols = sorted(c for c in back.table.column_names if c.startswith(("uri_", "illum_")))
    assert uri_cols == sorted([f"uri_{c}" for c in channels] + [f"illum_{c}" for c in channels])
    assert back.record(0).uris == {c: f"{tmp_path}/images/{BATCH}/images/{PLATE}__t-Measurement1/Images/A01-{c}.tiff"
                                   for c in channels}  # fmt: skip
    # The JUMP default asks for DNA, which this CSV lacks: the error names the CSV and the channels it has.
    with pytest.raises(DiscoveryError, match=r"no column for channel 'DNA'.*channels \['Actin', 'Mito', 'Phase'\]"):
        discover_fields(DataConfig(images_prefix=str(tmp_path / "images") + "/"))
    assert src.endswith("load_data.csv")
    with pytest.raises(DiscoveryError, match=r"listing mode: channels \['Actin', 'Phase'\] have no chN"):
        discover_fields(DataConfig(images_prefix=str(tmp_path / "images") + "/", channels=channels), mode="listing")


def test_manifests_without_metadata_columns_still_load(tmp_path):
    rec = FieldRecord("B/P/A01/1", "B", "P", "A01", 1, "train", {"DNA": "s3://x/a.tiff"})
    table = Manifest.from_records([rec], ["DNA"]).table
    old = table.drop_columns(["perturbation", "control_type", "target"])
    meta = {b"dinocell.channels": b'["DNA"]', b"dinocell.manifest_version": b"1"}
    pq.write_table(old.replace_schema_metadata(meta), tmp_path / "old.parquet")
    back = Manifest.read(str(tmp_path / "old.parquet"))
    assert back.record(0) == rec and back.column("control_type") == [""]
    assert back.table.column("perturbation").type == pa.dictionary(pa.int32(), pa.string())
    tagged = FieldRecord("B/P/A01/1", "B", "P", "A01", 1, "train", {"DNA": "s3://x/a.tiff"}, {}, "DMSO", "negcon", "")
    assert Manifest.from_records([tagged], ["DNA"]).record(0) == tagged
