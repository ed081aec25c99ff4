"""Field discovery: load_data CSVs (both column forms, the real fixture), listing on a real S3 endpoint, exclusions,
filters, splits and the manifest round trip."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from dinocell import storage
from dinocell.config import DataConfig
from dinocell.jump import exclusions
from dinocell.jump.discover import discover_fields, write_discovery
from dinocell.jump.exclusions import DiscoveryError
from dinocell.jump.layout import CPJUMP1_CHANNEL_NUMBERS, image_filename, plate_dir_name
from dinocell.jump.manifest import Manifest
from dinocell.jump.reroot import reroot_path

FLUO = ["DNA", "ER", "RNA", "AGP", "Mito"]
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "phenix_BR00121482_A01_s1"
if not FIXTURE.exists():  # the checkout may sit elsewhere than /work/main
    FIXTURE = Path("/work/shared/fixtures/phenix_BR00121482_A01_s1")


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def url_csv(
    path: Path,
    prefix: str,
    batch: str,
    plate: str,
    fields: list[tuple[str, int]],
    channels=FLUO,
    plate_dir: str | None = None,
    extra: dict | None = None,
) -> str:
    """A current-form load_data CSV: URL_Orig<Ch> full URLs under `prefix`/<batch>/images/<plate_dir>/Images/."""
    plate_dir = plate_dir or plate_dir_name(plate, "2020-11-05T19_51_35")
    header = [f"URL_Orig{c}" for c in channels] + ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    header += list(extra or {})
    rows = []
    for well, site in fields:
        r, c = ord(well[0]) - 64, int(well[1:])
        urls = [
            f"{prefix}/{batch}/images/{plate_dir}/Images/{image_filename(r, c, site, CPJUMP1_CHANNEL_NUMBERS[ch])}"
            for ch in channels
        ]
        rows.append(urls + [plate, well, str(site)] + list((extra or {}).values()))
    return write_csv(path, header, rows)


def ld_path(root: Path, batch: str, plate: str, name: str = "load_data.csv") -> Path:
    return root / "workspace" / "load_data_csv" / batch / plate / name


def wells(n_wells: int, sites: int) -> list[tuple[str, int]]:
    out = []
    for i in range(n_wells):
        out += [(f"{chr(65 + i // 24)}{i % 24 + 1:02d}", s) for s in range(1, sites + 1)]
    return out


def cfg_for(root: Path, **kw) -> DataConfig:
    kw.setdefault("images_prefix", str(root / "images") + "/")
    kw.setdefault("load_data", [str(root / "workspace" / "load_data_csv") + "/"])
    return DataConfig(**kw)


def accounted(result) -> bool:
    s = result.summary
    return s["rows_read"] == s["fields"] + s["excluded_total"] + sum(s["not_selected"].values())


# --------------------------------------------------------------------------- public names


def test_public_names_stay_importable_from_discover():
    # The split into dinocell.jump.* modules keeps dinocell.jump.discover's public names (other code imports them
    # from there), and they are the very objects defined in the modules that now hold them.
    from dinocell.jump import discover, load_data_files, reroot, summary

    assert sorted(discover.__all__) == sorted(
        [
            "LOAD_DATA_NAMES",
            "DiscoveryError",
            "DiscoveryResult",
            "Exclusion",
            "csv_location",
            "discover_fields",
            "find_load_data_csvs",
            "format_summary",
            "reroot_path",
            "write_discovery",
        ]
    )
    for name in discover.__all__:
        assert getattr(discover, name) is not None
    assert discover.DiscoveryError is DiscoveryError and discover.Exclusion is exclusions.Exclusion
    assert discover.reroot_path is reroot.reroot_path is reroot_path
    assert discover.format_summary is summary.format_summary
    assert discover.find_load_data_csvs is load_data_files.find_load_data_csvs
    assert discover.csv_location is load_data_files.csv_location
    assert discover.LOAD_DATA_NAMES is load_data_files.LOAD_DATA_NAMES


# --------------------------------------------------------------------------- load_data: URL form, re-rooting


def test_url_form_reroots_stale_prefix_onto_configured_prefix(tmp_path):
    stale = "s3://old-bucket/projects/2019_07_11_JUMP-CP/source_4/images"
    url_csv(ld_path(tmp_path, "B1", "BR0001"), stale, "B1", "BR0001", [("A01", 1), ("A01", 2), ("P24", 9)])
    res = discover_fields(cfg_for(tmp_path))
    m = res.manifest
    assert res.summary["mode"] == "load_data" and len(m) == 3 and res.summary["excluded_total"] == 0
    plate_dir = "BR0001__2020-11-05T19_51_35-Measurement1"
    rec = m.record(2)
    assert (rec.batch, rec.plate, rec.well, rec.site, rec.field_id) == ("B1", "BR0001", "P24", 9, "B1/BR0001/P24/9")
    # Hand-written: P = row 16, column 24, site 9; DNA is ch5, Mito ch1 in CPJUMP1 numbering.
    assert rec.uris["DNA"] == f"{tmp_path}/images/B1/images/{plate_dir}/Images/r16c24f09p01-ch5sk1fk1fl1.tiff"
    assert rec.uris["Mito"] == f"{tmp_path}/images/B1/images/{plate_dir}/Images/r16c24f09p01-ch1sk1fk1fl1.tiff"
    assert [r.field_id for r in m.records()] == ["B1/BR0001/A01/1", "B1/BR0001/A01/2", "B1/BR0001/P24/9"]
    assert accounted(res)


def test_reroot_path_rules():
    new = "s3://new/src/images/"
    old = "s3://old/x/images/B1/images/P__t-Measurement1/Images"
    assert reroot_path(old, new) == ("s3://new/src/images/B1/images/P__t-Measurement1/Images", "B1", None)
    # Illum folders re-root too; a local mount path as well; a URL already under the prefix is kept.
    assert reroot_path("/home/u/bucket/images/B2/illum/P", new) == ("s3://new/src/images/B2/illum/P", "B2", None)
    assert reroot_path("s3://new/src/images/B3/images/Q", new) == ("s3://new/src/images/B3/images/Q", "B3", None)
    assert reroot_path("s3://old/elsewhere/P/Images", new) == (None, None, exclusions.CANNOT_REROOT)
    assert reroot_path("s3://old/images/B1/images/../../../../etc", new) == (None, None, exclusions.ESCAPES)
    assert reroot_path("../../etc", new) == (None, None, exclusions.ESCAPES)
    assert reroot_path("s3://new/src/images/B1/../../secret", new) == (None, None, exclusions.ESCAPES)
    # Relative folders resolve under the prefix; re-rooting off keeps absolute URLs verbatim.
    assert reroot_path("B1/images/P", new) == ("s3://new/src/images/B1/images/P", "B1", None)
    assert reroot_path(old, new, reroot=False) == (old, "B1", None)


def test_unrerootable_and_traversal_rows_are_excluded_with_reasons(tmp_path):
    chans = ["DNA", "ER"]
    header = ["URL_OrigDNA", "URL_OrigER", "Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    good = "s3://old/images/B1/images/P__t-Measurement1/Images/"
    rows = [
        [good + "a.tiff", good + "b.tiff", "P", "A01", "1"],
        ["s3://old/no-anchor/a.tiff", good + "b.tiff", "P", "A01", "2"],
        [good + "../../../../../etc/passwd", good + "b.tiff", "P", "A01", "3"],
        [good + "a.tiff", good + "..", "P", "A01", "4"],
    ]
    src = write_csv(ld_path(tmp_path, "B1", "P"), header, rows)
    res = discover_fields(cfg_for(tmp_path, channels=chans))
    assert len(res.manifest) == 1
    assert res.summary["excluded_by_reason"] == {exclusions.CANNOT_REROOT: 1, exclusions.ESCAPES: 2}
    got = [(e["reason"], e["source"], e["row"]) for e in res.summary["excluded"]]
    assert got == [(exclusions.CANNOT_REROOT, src, 2), (exclusions.ESCAPES, src, 3), (exclusions.ESCAPES, src, 4)]
    assert res.summary["excluded"][0]["detail"] == "s3://old/no-anchor/a.tiff"
    assert accounted(res)


# --------------------------------------------------------------------------- load_data: the real fixture (older form)


def test_real_fixture_filename_pathname_form_maps_channels_by_column_name(tmp_path):
    src_csv = ld_path(tmp_path, "2021_03_29_Phenix", "BR00121482")
    src_csv.parent.mkdir(parents=True)
    shutil.copy(FIXTURE / "load_data.csv", src_csv)
    # The fixture's PathName is the relative `tests/data/Version1/images/`: it resolves under the images prefix,
    # where we mount the fixture folder.
    mount = tmp_path / "images" / "tests" / "data" / "Version1" / "images"
    mount.parent.mkdir(parents=True)
    os.symlink(FIXTURE, mount)
    channels = FLUO + ["Brightfield"]
    res = discover_fields(cfg_for(tmp_path, channels=channels))
    assert len(res.manifest) == 1, res.format_summary()
    rec = res.manifest.record(0)
    assert (rec.batch, rec.plate, rec.well, rec.site) == ("2021_03_29_Phenix", "BR00121482", "A01", 1)
    files = {ch: Path(u) for ch, u in rec.uris.items()}
    assert all(p.exists() and p.resolve().parent == FIXTURE.resolve() for p in files.values())
    # This acquisition numbers channels unlike CPJUMP1 (there ch6 is HighZBF): mapping must follow the column names.
    expected = {"Mito": 1, "AGP": 2, "RNA": 3, "ER": 4, "DNA": 5, "Brightfield": 6}
    assert {ch: p.name for ch, p in files.items()} == {
        ch: f"r01c01f01p01-ch{n}sk1fk1fl1.tiff" for ch, n in expected.items()
    }
    assert CPJUMP1_CHANNEL_NUMBERS["Brightfield"] != 6
    assert rec.illum == {}  # no illum columns and no illum folder
    # A channel the CSV has no column for is a clear error naming the CSV and what it has.
    with pytest.raises(
        DiscoveryError, match=r"BR00121482/load_data\.csv: no column for channel 'HighZBF'.*'Brightfield'"
    ):
        discover_fields(cfg_for(tmp_path, channels=["DNA", "HighZBF"]))


def test_pathname_traversal_refused_and_reported(tmp_path):
    header = ["FileName_OrigDNA", "PathName_OrigDNA", "Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    rows = [
        ["a.tiff", "B1/images/P__t-Measurement1/Images/", "P", "A01", "1"],
        ["passwd", "../../etc", "P", "A01", "2"],
        ["x.tiff", "/abs/images/B1/images/P__t-Measurement1/Images", "P", "A01", "3"],
        ["", "B1/images/P", "P", "A01", "4"],
    ]
    src = write_csv(ld_path(tmp_path, "B1", "P"), header, rows)
    res = discover_fields(cfg_for(tmp_path, channels=["DNA"]))
    uris = [r.uris["DNA"] for r in res.manifest.records()]
    base = f"{tmp_path}/images/B1/images/P__t-Measurement1/Images"
    assert uris == [f"{base}/a.tiff", f"{base}/x.tiff"]
    assert [(e.reason, e.source, e.row, e.detail) for e in res.exclusions] == [
        (exclusions.ESCAPES, src, 2, "../../etc/passwd"),
        ("missing channel DNA", src, 4, None),
    ]
    assert res.summary["excluded_by_reason"] == {exclusions.ESCAPES: 1, "missing channel DNA": 1}


# --------------------------------------------------------------------------- strings stay strings


def test_metadata_stays_string_and_wells_normalise(tmp_path):
    header = ["URL_OrigDNA", "Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Batch"]
    u = "s3://x/images/B9/images/P__t-Measurement1/Images/"
    rows = [
        [u + "1.tiff", "00123", "A1", "01", "B9"],
        [u + "2.tiff", "1e5", "b02", "2", "B9"],
        [u + "3.tiff", "00123", "Z99x", "1", "B9"],
        [u + "4.tiff", "00123", "A03", "one", "B9"],
    ]
    # Not under load_data_csv/<BATCH>/<BARCODE>/: the batch comes from Metadata_Batch.
    src = write_csv(tmp_path / "loose.csv", header, rows)
    res = discover_fields(cfg_for(tmp_path, load_data=[src], channels=["DNA"]))
    recs = list(res.manifest.records())
    assert [(r.plate, r.well, r.site, r.batch) for r in recs] == [("00123", "A01", 1, "B9"), ("1e5", "B02", 2, "B9")]
    assert res.summary["excluded_by_reason"] == {exclusions.BAD_WELL: 1, exclusions.BAD_SITE: 1}
    # Strings survive the Parquet round trip too.
    out = str(tmp_path / "m.parquet")
    write_discovery(res, out)
    assert Manifest.read(out).column("plate") == ["00123", "1e5"]


def test_wells_from_row_and_col_columns(tmp_path):
    header = ["URL_OrigDNA", "Metadata_Plate", "Metadata_Row", "Metadata_Col", "Metadata_Site"]
    u = "s3://x/images/B1/images/P__t-Measurement1/Images/"
    rows = [[u + "1.tiff", "P", "1", "1", "1"], [u + "2.tiff", "P", "C", "12", "1"], [u + "3.tiff", "P", "0", "1", "1"]]
    src = write_csv(ld_path(tmp_path, "B1", "P"), header, rows)
    res = discover_fields(cfg_for(tmp_path, channels=["DNA"]))
    assert res.manifest.column("well") == ["A01", "C12"]
    assert [(e.reason, e.source, e.row, e.detail) for e in res.exclusions] == [(exclusions.BAD_WELL, src, 3, "0,1")]


def test_batch_from_url_when_nothing_else_names_it(tmp_path):
    header = ["URL_OrigDNA", "Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    rows = [
        ["s3://x/images/B7/images/P__t-Measurement1/Images/a.tiff", "P", "A01", "1"],
        ["s3://x/images/B7/images/P__t-Measurement1/Images/b.tiff", "P", "A01", "2"],
    ]
    src = write_csv(tmp_path / "plain.csv", header, rows)
    res = discover_fields(cfg_for(tmp_path, load_data=[src], channels=["DNA"], reroot_urls=False))
    assert res.manifest.column("batch") == ["B7", "B7"]
    assert res.manifest.column("uri_DNA")[0] == rows[0][0]  # verbatim without re-rooting
    rows2 = [["relative/a.tiff", "P", "A01", "1"]]
    src2 = write_csv(tmp_path / "nobatch.csv", header, rows2)
    res2 = discover_fields(cfg_for(tmp_path, load_data=[src2], channels=["DNA"]))
    # Nothing names a batch: the CSV's folder does (issue 9 section 4; tests/test_platemaps.py has the other sources).
    assert res2.manifest.column("batch") == [tmp_path.name] and res2.summary["excluded_total"] == 0
    assert res2.summary["inputs"]["batch_from"] == {"CSV folder name": 1}
    assert res.summary["inputs"]["batch_from"] == {"images path": 2}


# --------------------------------------------------------------------------- exclusions and accounting


def test_missing_channel_and_duplicates_counted_first_kept(tmp_path):
    stale = "s3://old/images"
    a = url_csv(ld_path(tmp_path, "B1", "P1"), stale, "B1", "P1", [("A01", 1), ("A01", 2), ("A01", 1)])
    # The same plate appearing again in a second CSV of another folder: its repeat of A01/2 is a duplicate too.
    b = url_csv(ld_path(tmp_path, "B1", "P1x"), stale, "B1", "P1", [("A01", 2), ("B01", 1)])
    # Blank out ER on B01/1.
    with open(b, newline="") as f:
        rows = list(csv.reader(f))
    rows[2][1] = ""
    write_csv(Path(b), rows[0], rows[1:])
    res = discover_fields(cfg_for(tmp_path))
    assert res.manifest.column("field_id") == ["B1/P1/A01/1", "B1/P1/A01/2"]
    ex = [(e.reason, e.source, e.row) for e in res.exclusions]
    assert sorted(ex) == sorted(
        [("missing channel ER", b, 2), (exclusions.DUPLICATE, a, 3), (exclusions.DUPLICATE, b, 1)]
    )
    dup = next(e for e in res.exclusions if e.source == b and e.reason == exclusions.DUPLICATE)
    assert dup.detail == f"B1/P1/A01/2 already from {a}:row 2"
    assert res.summary["excluded_by_reason"] == {exclusions.DUPLICATE: 2, "missing channel ER": 1}
    assert res.summary["rows_read"] == 5 and accounted(res)
    text = res.format_summary()
    assert "duplicate" in text and "missing channel ER" in text and "P1" in text


def test_with_illum_csv_preferred_and_illum_columns_rerooted(tmp_path):
    stale = "s3://old/images"
    fields = [("A01", 1), ("A02", 1)]
    plain = url_csv(ld_path(tmp_path, "B1", "P1"), stale, "B1", "P1", fields)
    extra = {f"URL_Illum{c}": f"s3://old/images/B1/illum/P1/P1_Illum{c}.npy" for c in FLUO}
    with_illum = url_csv(
        ld_path(tmp_path, "B1", "P1", "load_data_with_illum.csv"), stale, "B1", "P1", fields, extra=extra
    )
    res = discover_fields(cfg_for(tmp_path))
    assert res.summary["inputs"]["csv_files"] == [with_illum]
    assert res.summary["inputs"]["csv_skipped"][0]["uri"] == plain
    rec = res.manifest.record(0)
    assert rec.illum == {c: f"{tmp_path}/images/B1/illum/P1/P1_Illum{c}.npy" for c in FLUO}
    assert res.summary["illum_plates"] == {"from CSV": 1}


def test_layout_illum_recorded_only_where_files_exist(tmp_path):
    stale = "s3://old/images"
    url_csv(ld_path(tmp_path, "B1", "P1"), stale, "B1", "P1", [("A01", 1)])
    url_csv(ld_path(tmp_path, "B1", "P2"), stale, "B1", "P2", [("A01", 1)])
    url_csv(ld_path(tmp_path, "B1", "P3"), stale, "B1", "P3", [("A01", 1)])
    for c in FLUO:
        storage.write_bytes(str(tmp_path / "images/B1/illum/P1" / f"P1_Illum{c}.npy"), b"x")
    storage.write_bytes(str(tmp_path / "images/B1/illum/P2/P2_IllumDNA.npy"), b"x")
    res = discover_fields(cfg_for(tmp_path))
    by_plate = {r.plate: r.illum for r in res.manifest.records()}
    assert by_plate["P1"] == {c: f"{tmp_path}/images/B1/illum/P1/P1_Illum{c}.npy" for c in FLUO}
    assert by_plate["P2"] == {"DNA": f"{tmp_path}/images/B1/illum/P2/P2_IllumDNA.npy"}
    assert by_plate["P3"] == {}
    assert res.summary["illum_plates"] == {"from layout": 1, "partial": 1, "none": 1}


def test_csv_quirks_bom_gzip_and_bad_csvs(tmp_path):
    u = "s3://x/images/B1/images/P__t-Measurement1/Images/a.tiff"
    text = "URL_OrigDNA,Metadata_Plate,Metadata_Well,Metadata_Site\n" + f"{u},P,A01,1\n"
    p = ld_path(tmp_path, "B1", "P", "load_data.csv.gz")
    p.parent.mkdir(parents=True)
    p.write_bytes(gzip.compress(("\ufeff" + text).encode()))
    res = discover_fields(cfg_for(tmp_path, channels=["DNA"]))
    assert res.manifest.column("field_id") == ["B1/P/A01/1"]
    bad = write_csv(tmp_path / "nosite.csv", ["URL_OrigDNA", "Metadata_Plate", "Metadata_Well"], [[u, "P", "A01"]])
    with pytest.raises(DiscoveryError, match=r"nosite\.csv: no Metadata_Site column"):
        discover_fields(cfg_for(tmp_path, load_data=[bad], channels=["DNA"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiscoveryError, match="no load_data CSV .* found under .*empty"):
        discover_fields(cfg_for(tmp_path, load_data=[str(tmp_path / "empty")], channels=["DNA"]))


# --------------------------------------------------------------------------- filters, max_fields, splits


def _plates_tree(root: Path, batches=("B1", "B2"), plates=3, fields=8):
    for b in batches:
        for p in range(plates):
            url_csv(ld_path(root, b, f"{b}P{p}"), "s3://old/images", b, f"{b}P{p}", wells(2, fields // 2))


def test_filters_batches_plates_channels(tmp_path):
    _plates_tree(tmp_path)
    res = discover_fields(cfg_for(tmp_path, batches=["B2"], plates=["B2P0", "B2P2", "B1P1"], channels=["DNA", "Mito"]))
    m = res.manifest
    assert m.channels == ["DNA", "Mito"] and "uri_ER" not in m.table.column_names
    assert set(m.column("plate")) == {"B2P0", "B2P2"} and len(m) == 16
    # Whole CSVs outside the selection are never read, and are listed.
    assert len(res.summary["inputs"]["csv_not_selected"]) == 4 and len(res.summary["inputs"]["csv_files"]) == 2
    assert res.summary["rows_read"] == 16 and accounted(res)
    with pytest.raises(DiscoveryError, match=r"selected batches \['B3'\]"):
        discover_fields(cfg_for(tmp_path, batches=["B2", "B3"]))


def test_max_fields_round_robin_deterministic(tmp_path):
    _plates_tree(tmp_path, batches=("B1",), plates=3, fields=8)
    full = discover_fields(cfg_for(tmp_path))
    res = discover_fields(cfg_for(tmp_path, max_fields=7))
    again = discover_fields(cfg_for(tmp_path, max_fields=7))
    ids = res.manifest.column("field_id")
    assert ids == again.manifest.column("field_id") and len(ids) == 7
    per_plate = res.summary["fields_per_plate"]["B1"]
    assert sorted(per_plate.values()) == [2, 2, 3]  # round robin: 2 rounds over 3 plates, then the first plate
    assert set(ids) <= set(full.manifest.column("field_id"))
    assert ids == sorted(ids, key=full.manifest.column("field_id").index)  # manifest order kept
    assert res.summary["not_selected"] == {"max_fields": 17} and accounted(res)
    # A larger subset contains the smaller one (same per-plate order).
    bigger = discover_fields(cfg_for(tmp_path, max_fields=13)).manifest.column("field_id")
    assert set(ids) <= set(bigger)
    # Another seed picks other fields within the plates.
    other = discover_fields(cfg_for(tmp_path, max_fields=7, split_seed=5)).manifest.column("field_id")
    assert other != ids


def test_max_fields_per_plate_picks_do_not_depend_on_other_plates(tmp_path):
    _plates_tree(tmp_path, batches=("B1",), plates=3, fields=8)
    three = discover_fields(cfg_for(tmp_path, max_fields=6)).manifest  # 2 per plate
    _plates_tree(tmp_path, batches=("B1",), plates=4, fields=8)  # adds plate B1P3
    four = discover_fields(cfg_for(tmp_path, max_fields=8)).manifest  # still 2 per plate
    assert set(three.column("field_id")) == {f for f in four.column("field_id") if not f.startswith("B1/B1P3/")}


def test_split_is_by_plate_and_deterministic(tmp_path):
    _plates_tree(tmp_path, batches=("B1",), plates=10, fields=4)
    a = discover_fields(cfg_for(tmp_path, val_fraction=0.3, split_seed=3))
    b = discover_fields(cfg_for(tmp_path, val_fraction=0.3, split_seed=3))
    split_of_plate: dict[str, set] = {}
    for p, s in zip(a.manifest.column("plate"), a.manifest.column("split")):
        split_of_plate.setdefault(p, set()).add(s)
    assert all(len(s) == 1 for s in split_of_plate.values())  # no plate in both splits
    assert a.manifest.column("split") == b.manifest.column("split")
    assert len(a.summary["plates_per_split"]["val"]) == 3
    assert a.summary["fields_per_split"] == {"train": 28, "val": 12}
    c = discover_fields(cfg_for(tmp_path, val_plates=["B1P4", "B1P7"]))
    assert c.summary["plates_per_split"]["val"] == ["B1P4", "B1P7"]
    assert {p for p, s in zip(c.manifest.column("plate"), c.manifest.column("split")) if s == "val"} == {"B1P4", "B1P7"}


# --------------------------------------------------------------------------- auto mode


def test_auto_mode_finds_csvs_under_source_root_else_lists(tmp_path):
    url_csv(ld_path(tmp_path, "B1", "P1"), "s3://old/images", "B1", "P1", [("A01", 1)])
    res = discover_fields(DataConfig(images_prefix=str(tmp_path / "images") + "/", channels=["DNA"]))
    assert res.summary["mode"] == "load_data" and len(res.manifest) == 1
    # No CSVs for the selected batch: auto falls back to listing, which needs the image folders.
    img = tmp_path / "images" / "B2" / "images" / plate_dir_name("P9", "t") / "Images"
    storage.write_bytes(str(img / image_filename(1, 1, 1, 5)), b"")
    res2 = discover_fields(DataConfig(images_prefix=str(tmp_path / "images") + "/", channels=["DNA"], batches=["B2"]))
    assert res2.summary["mode"] == "listing" and res2.manifest.column("field_id") == ["B2/P9/A01/1"]


# --------------------------------------------------------------------------- listing mode on real S3


def _put_all(uris: list[str]) -> None:
    storage.map_parallel(lambda u: storage.write_bytes(u, b""), uris, max_workers=16)


def test_listing_mode_s3_pagination_grouping_and_exclusions(s3_bucket):
    prefix = f"s3://{s3_bucket}/cpg/source_4/images"
    batch = "2020_11_04_CPJUMP1"
    big = f"{prefix}/{batch}/images/{plate_dir_name('BR1', '2020-11-05T19_51_35')}/Images/"
    small = f"{prefix}/{batch}/images/{plate_dir_name('BR2', '2020-11-06T10_00_00')}/Images/"
    again = f"{prefix}/{batch}/images/{plate_dir_name('BR2', '2020-11-07T10_00_00', 2)}/Images/"
    keys = []
    # BR1: 24 wells x 9 sites x 5 fluorescent channels = 1,080 keys (> 1,000: two listing pages) + brightfield ch6.
    for col in range(1, 25):
        for site in range(1, 10):
            keys += [big + image_filename(1, col, site, n) for n in (1, 2, 3, 4, 5, 6)]
    # BR2 reuses the same well/site names: its fields must stay distinct from BR1's.
    for site in (1, 2):
        keys += [small + image_filename(1, 1, site, n) for n in (1, 2, 3, 4, 5)]
    keys += [again + image_filename(1, 1, 1, n) for n in (1, 2, 3, 4, 5)]  # re-imaged plate -> duplicate field
    keys.remove(big + image_filename(1, 24, 9, 4))  # ER missing on A24/9
    strays = [big + "Index.idx.xml", small + "thumbs/r01c01.png"]
    unparsable = [big + "r01c01f01-ch1.tiff"]
    junk_dir = f"{prefix}/{batch}/images/not_a_plate_folder/Images/x.tiff"
    _put_all(keys + strays + unparsable + [junk_dir])
    assert sum(1 for _ in storage.list_objects(big)) > 1000

    cfg = DataConfig(images_prefix=prefix + "/", list_workers=8, val_fraction=0.5)
    res = discover_fields(cfg, mode="listing")
    m = res.manifest
    assert res.summary["mode"] == "listing"
    assert len(m) == 24 * 9 - 1 + 2
    assert res.summary["fields_per_plate"] == {batch: {"BR1": 215, "BR2": 2}}
    assert {"BR1", "BR2"} == set(m.column("plate"))
    rec = next(r for r in m.records() if r.plate == "BR2" and r.site == 1)
    assert rec.uris["DNA"] == small + "r01c01f01p01-ch5sk1fk1fl1.tiff"  # the first plate folder wins
    assert rec.uris["Mito"] == small + "r01c01f01p01-ch1sk1fk1fl1.tiff"
    assert res.summary["excluded_by_reason"] == {
        exclusions.DUPLICATE: 1,
        "missing channel ER": 1,
        exclusions.STRAY_FILE: 2,
        exclusions.UNPARSABLE_NAME: 1,
        exclusions.UNPARSABLE_PLATE_DIR: 1,
    }
    by_reason = {e.reason: e for e in res.exclusions}
    assert by_reason[exclusions.UNPARSABLE_NAME].source == unparsable[0]
    assert by_reason["missing channel ER"].source == big + "r01c24f09"
    assert by_reason[exclusions.DUPLICATE].source == again
    assert res.summary["inputs"]["ignored_files"] == {"channel not requested": 24 * 9}
    # Split by plate: the two plates land in different splits with val_fraction 0.5.
    assert sorted(res.summary["plates_per_split"]["train"] + res.summary["plates_per_split"]["val"]) == ["BR1", "BR2"]

    # Sequential listing gives the same manifest.
    seq = discover_fields(DataConfig(images_prefix=prefix + "/", list_workers=1, val_fraction=0.5), mode="listing")
    assert seq.manifest.table.equals(m.table)

    # Round trip via S3.
    out = f"s3://{s3_bucket}/out/manifest.parquet"
    summary_uri = write_discovery(res, out)
    assert summary_uri == out + ".summary.json"
    back = Manifest.read(out)
    assert back.table.equals(m.table) and back.channels == FLUO
    assert json.loads(storage.read_text(summary_uri))["fields"] == len(m)


def test_listing_channel_mapping_is_configurable(tmp_path):
    img = tmp_path / "images" / "B" / "images" / plate_dir_name("P", "t") / "Images"
    for n in (5, 6):
        storage.write_bytes(str(img / image_filename(1, 1, 1, n)), b"")
    cfg = DataConfig(images_prefix=str(tmp_path / "images"), channels=["DNA", "Brightfield"])
    res = discover_fields(cfg, mode="listing", channel_numbers={"DNA": 5, "Brightfield": 6})
    assert res.manifest.record(0).uris["Brightfield"].endswith("-ch6sk1fk1fl1.tiff")
    with pytest.raises(DiscoveryError, match="no chN number"):
        discover_fields(DataConfig(images_prefix=str(tmp_path / "images"), channels=["Nucleus"]), mode="listing")
    with pytest.raises(DiscoveryError, match="share a chN number"):
        discover_fields(cfg, mode="listing", channel_numbers={"DNA": 5, "Brightfield": 5})


def test_listing_anonymous_public_ok_private_refused(s3_server, public_bucket, s3_bucket):
    for bucket in (public_bucket, s3_bucket):
        d = f"s3://{bucket}/images/B/images/{plate_dir_name('P', 't')}/Images/"
        _put_all([d + image_filename(1, 1, 1, n) for n in (1, 2, 3, 4, 5)])
    storage.configure(storage.StorageConfig(endpoint_url=s3_server.endpoint_url, anonymous=True))
    res = discover_fields(DataConfig(images_prefix=f"s3://{public_bucket}/images/"), mode="listing")
    assert res.manifest.column("field_id") == ["B/P/A01/1"]
    with pytest.raises(storage.StorageError, match="private"):
        discover_fields(DataConfig(images_prefix=f"s3://{s3_bucket}/images/"), mode="listing")


# --------------------------------------------------------------------------- integration with dinocell synth


def test_synth_bucket_both_modes_agree_on_s3(s3_bucket):
    from dinocell.synth.bucket import SynthFaults, synth_bucket

    root = f"s3://{s3_bucket}/cpg0000-jump-pilot/source_4"
    report = synth_bucket(
        root,
        batches=2,
        plates_per_batch=2,
        wells_per_plate=3,
        sites_per_well=2,
        size=16,
        seed=1,
        workers=8,
        csv_form="filename",
        url_prefix_override="s3://old-bucket/projects/cpg0000-jump-pilot/source_4",
        faults=SynthFaults(missing_channel=3, stray_files=5, seed=2),
    )
    prefix = f"{root}/images/"
    by_csv = discover_fields(DataConfig(images_prefix=prefix, val_fraction=0.25))  # auto: finds the CSVs
    listed = discover_fields(DataConfig(images_prefix=prefix, val_fraction=0.25), mode="listing")
    assert by_csv.summary["mode"] == "load_data" and listed.summary["mode"] == "listing"
    # load_data mode: every CSV row is a field (it checks no objects), URLs re-rooted from the stale prefix.
    assert len(by_csv.manifest) == report.n_fields == 24 and by_csv.summary["excluded_total"] == 0
    assert by_csv.summary["inputs"]["csv_files"] == sorted(report.load_data_with_illum_uris)
    written = {o.uri for o in storage.list_objects(prefix)}
    uris = {u for c in FLUO for u in by_csv.manifest.column(f"uri_{c}")}
    missing = {f.uri for f in report.faults_of("missing_channel")}
    assert uris - written == {u for u in missing if u in uris}
    illums = {u for c in FLUO for u in by_csv.manifest.column(f"illum_{c}")}
    assert illums == {u for u in report.illum_uris if any(u.endswith(f"_Illum{c}.npy") for c in FLUO)}
    # Listing mode: fields with a planted missing fluorescent channel are excluded; strays under Images/ counted.
    missing_fluo = [f for f in report.faults_of("missing_channel") if f.channel in FLUO]
    broken = {f"{f.batch}/{f.plate}/{f.well}/{f.site}" for f in missing_fluo}
    assert set(listed.manifest.column("field_id")) == set(by_csv.manifest.column("field_id")) - broken
    reasons = listed.summary["excluded_by_reason"]
    assert sum(v for k, v in reasons.items() if k.startswith("missing channel")) == len(broken)
    strays = [f.uri for f in report.faults_of("stray_file") if "/Images/" in f.uri]
    assert reasons.get(exclusions.STRAY_FILE, 0) == len(strays)
    assert sorted(e.source for e in listed.exclusions if e.reason == exclusions.STRAY_FILE) == sorted(strays)
    # Same fields, same URIs, same splits (both split by plate with the same seed).
    csv_rows = {r.field_id: r for r in by_csv.manifest.records()}
    for r in listed.manifest.records():
        # (load_data mode also records the brightfield channels for the evaluation: data.eval_channels)
        other = csv_rows[r.field_id]
        assert r.uris == {c: other.uris[c] for c in r.uris} and r.split == other.split
        assert r.illum == {c: other.illum[c] for c in r.illum}  # listing finds the layout's illum files


def test_synth_local_url_form_file_urls_resolve(tmp_path):
    from dinocell.synth.bucket import synth_bucket

    root = tmp_path / "source_4"
    report = synth_bucket(
        str(root),
        batches=1,
        plates_per_batch=2,
        wells_per_plate=2,
        sites_per_well=1,
        size=16,
        workers=2,
        csv_form="url",
        with_illum=False,
    )
    res = discover_fields(DataConfig(images_prefix=str(root / "images") + "/", channels=["DNA", "Brightfield"]))
    assert len(res.manifest) == report.n_fields == 4
    for r in res.manifest.records():
        assert Path(r.uris["DNA"]).exists() and r.uris["DNA"].startswith(str(root / "images") + "/")
        assert r.uris["Brightfield"].endswith("-ch8sk1fk1fl1.tiff")  # CPJUMP1: Brightfield is ch8
    assert res.summary["illum_plates"] == {"none": 2}


def test_brightfield_is_kept_for_evaluation_when_every_field_has_it(tmp_path, buckets):
    """Discovery records the brightfield planes for the evaluation (data.eval_channels), not for training."""
    from dinocell.channels import BRIGHTFIELD_CHANNELS, FLUORESCENT_CHANNELS
    from dinocell.config import DataConfig
    from dinocell.jump.discover import discover_fields

    report = buckets.synth(tmp_path / "src", batches=1, plates_per_batch=1, wells_per_plate=2, sites_per_well=1,
                           size=64)
    result = discover_fields(DataConfig(images_prefix=storage.join(report.source_root, "images"), val_fraction=0.0))
    assert result.manifest.channels == [*FLUORESCENT_CHANNELS, *BRIGHTFIELD_CHANNELS]
    assert result.summary["eval_channels"] == {"kept": list(BRIGHTFIELD_CHANNELS), "dropped": {}}
    assert result.summary["excluded_total"] == 0
    none = discover_fields(DataConfig(images_prefix=storage.join(report.source_root, "images"), val_fraction=0.0,
                                      eval_channels=[]))
    assert none.manifest.channels == list(FLUORESCENT_CHANNELS)
    # a field whose brightfield entry is empty: the field stays (training does not need it), the channel goes
    csv = report.load_data_with_illum_uris[0]
    text = storage.read_text(csv).splitlines()
    col = text[0].split(",").index("URL_OrigBrightfield")
    cells = text[1].split(",")
    cells[col] = ""
    text[1] = ",".join(cells)
    storage.write_bytes(csv, ("\n".join(text) + "\n").encode())
    partial = discover_fields(DataConfig(images_prefix=storage.join(report.source_root, "images"), val_fraction=0.0))
    assert len(partial.manifest) == len(result.manifest) and partial.summary["excluded_total"] == 0
    assert partial.summary["eval_channels"] == {"kept": ["HighZBF", "LowZBF"], "dropped": {"Brightfield": 1}}
