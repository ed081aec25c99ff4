"""`dinocell synth`: key layout, CSV forms, illumination, image model, determinism, faults, S3."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from dinocell import storage
from dinocell.channels import ALL_CHANNELS, FLUORESCENT_CHANNELS
from dinocell.jump import layout
from dinocell.synth.bucket import (
    REAL_SOURCE4_BATCHES,
    SynthFaults,
    load_data_columns,
    plan_bucket,
    synth_bucket,
)
from dinocell.synth.cells import Phenotype, VignetteParams, render_field, vignetting

SIZE = 128
CH_NUMBER = layout.CPJUMP1_CHANNEL_NUMBERS

BATCH = r"(?P<batch>\d{4}_\d{2}_\d{2}_[A-Za-z0-9_]+)"
BARCODE = r"(?P<barcode>BR0011\d{4})"
IMAGE_KEY = re.compile(
    rf"^images/{BATCH}/images/{BARCODE}__(?P<ts>\d{{4}}-\d{{2}}-\d{{2}}T\d{{2}}_\d{{2}}_\d{{2}})-Measurement1/Images/"
    r"r(?P<row>\d{2})c(?P<col>\d{2})f(?P<site>\d{2})p01-ch(?P<ch>[1-8])sk1fk1fl1\.tiff$"
)
ILLUM_KEY = re.compile(rf"^images/{BATCH}/illum/{BARCODE}/(?P=barcode)_Illum(?P<channel>[A-Za-z]+)\.npy$")
CSV_KEY = re.compile(rf"^workspace/load_data_csv/{BATCH}/{BARCODE}/load_data(_with_illum)?\.csv$")
PLATEMAP_KEY = re.compile(
    rf"^workspace/metadata/(platemaps/{BATCH}/(barcode_platemap\.csv|platemap/SYNTH-PLATEMAP-1\.txt)"
    r"|external_metadata/SYNTH-PLATEMAP-1_metadata\.tsv)$"
)


def rel_keys(root: str) -> dict[str, int]:
    """Every object under a root, as root-relative '/'-separated keys -> size."""
    out = {}
    for info in storage.list_objects(root):
        rel = info.uri[len(root) :].lstrip("/") if storage.is_s3(root) else Path(info.uri).relative_to(root).as_posix()
        out[rel] = info.size
    return out


def read_csv(uri: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_text(uri))))


def fg_mask(img: np.ndarray, k: float) -> np.ndarray:
    """Foreground of an illumination-corrected image: brighter than k x its (background-dominated) 10th percentile."""
    return img > np.percentile(img, 10) * k


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


@pytest.fixture(scope="module")
def url_bucket(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_url") / "cpg0000-jump-pilot" / "source_4"
    report = synth_bucket(str(root), size=SIZE, seed=0, workers=2)
    return root, report


@pytest.fixture(scope="module")
def corrected_fields(url_bucket):
    """Every field of the url bucket, illumination-corrected: list of (csv row, {channel: float32 image})."""
    _, report = url_bucket
    out = []
    for uri in report.load_data_with_illum_uris:
        for row in read_csv(uri):
            imgs = {}
            for ch in ALL_CHANNELS:
                raw = tifffile.imread(io.BytesIO(storage.read_bytes(row[f"URL_Orig{ch}"]))).astype(np.float32)
                imgs[ch] = raw / np.load(io.BytesIO(storage.read_bytes(row[f"URL_Illum{ch}"])))
            out.append((row, imgs))
    return out


# --------------------------------------------------------------------------- layout


def test_every_key_follows_the_cpg0000_layout(url_bucket):
    root, report = url_bucket
    keys = rel_keys(str(root))
    images, illum, csvs, platemaps = {}, set(), set(), set()
    for key in keys:
        if m := IMAGE_KEY.match(key):
            field = (m["batch"], m["barcode"], m["row"], m["col"], m["site"])
            images.setdefault(field, set()).add(int(m["ch"]))
            assert m["ts"] in key and layout.parse_plate_dir(key.split("/")[3]) == (m["barcode"], m["ts"], 1)
        elif m := ILLUM_KEY.match(key):
            assert m["channel"] in ALL_CHANNELS, key
            illum.add((m["batch"], m["barcode"], m["channel"]))
        elif CSV_KEY.match(key):
            csvs.add(key)
        elif PLATEMAP_KEY.match(key):
            platemaps.add(key)
        else:
            pytest.fail(f"unexpected key {key!r}")
    # 2 batches x 2 plates x 4 wells x 2 sites, 8 channels each (ch1..ch8), all channels of a field in one folder
    assert len(images) == 32 and all(chs == set(range(1, 9)) for chs in images.values())
    assert len(illum) == 4 * 8 and len(csvs) == 4 * 2 and len(platemaps) == 2 * 2 + 1  # + the perturbation metadata
    batches = {b for b, *_ in report.plates}
    assert batches == set(REAL_SOURCE4_BATCHES[:2])
    barcodes = [bc for _, bc, _ in report.plates]
    assert len(set(barcodes)) == 4
    timestamps = [layout.parse_plate_dir(pd)[1] for *_, pd in report.plates]
    assert len(set(timestamps)) == 4  # one acquisition per plate
    assert {(b, bc) for b, bc, *_ in images} == {(b, bc) for b, bc, _ in report.plates}
    assert (report.n_batches, report.n_plates, report.n_wells, report.n_fields, report.n_images) == (2, 4, 16, 32, 256)
    assert report.n_bytes == sum(keys.values())
    assert report.image_bytes == sum(v for k, v in keys.items() if k.endswith(".tiff"))


def test_images_are_uncompressed_uint16_with_fixture_like_ranges(url_bucket):
    _root, report = url_bucket
    rows = read_csv(report.load_data_uris[0])
    levels = {ch: [] for ch in ALL_CHANNELS}
    for row in rows:
        for ch in ALL_CHANNELS:
            with tifffile.TiffFile(storage.local_path(row[f"URL_Orig{ch}"])) as tif:
                assert len(tif.pages) == 1
                page = tif.pages[0]
                assert page.compression == 1 and page.dtype == np.uint16 and page.shape == (SIZE, SIZE)
                img = page.asarray()
            levels[ch].append((np.median(img), np.percentile(img, 99.5)))
    for ch in FLUORESCENT_CHANNELS:  # background: a few hundred counts; cells: thousands (fixture: 2k-35k)
        med, hi = np.mean(levels[ch], axis=0)
        assert 100 < med < 1500 and 2500 < hi < 65535, (ch, med, hi)
    for ch in ("HighZBF", "LowZBF", "Brightfield"):  # fixture brightfield: ~21,000 with low contrast
        med, hi = np.mean(levels[ch], axis=0)
        assert 15000 < med < 25000 and hi < 1.15 * med, (ch, med, hi)


def test_url_form_csv_columns_and_every_url_resolves(url_bucket):
    root, report = url_bucket
    fields = set()
    for uri, illum in [(u, False) for u in report.load_data_uris] + [
        (u, True) for u in report.load_data_with_illum_uris
    ]:
        text = storage.read_text(uri)
        assert text.splitlines()[0].split(",") == load_data_columns("url", illum)
        for row in read_csv(uri):
            m = re.fullmatch(r"([A-P])(\d{2})", row["Metadata_Well"])
            assert m and layout.well_row_col(row["Metadata_Well"]) == (
                int(row["Metadata_Row"]),
                int(row["Metadata_Col"]),
            )
            for ch in ALL_CHANNELS:
                url = row[f"URL_Orig{ch}"]
                assert url.startswith("file://" + str(root) + "/images/")
                name = layout.parse_image_filename(url.rsplit("/", 1)[1])
                assert (name.row, name.col, name.site, name.channel) == (
                    int(row["Metadata_Row"]),
                    int(row["Metadata_Col"]),
                    int(row["Metadata_Site"]),
                    CH_NUMBER[ch],
                )
                assert row[f"Metadata_ChannelID_Orig{ch}"] == str(CH_NUMBER[ch])
                assert f"/{row['Metadata_Plate']}__" in url
                assert storage.exists(url), url
                if illum:
                    assert storage.exists(row[f"URL_Illum{ch}"])
                    assert row[f"URL_Illum{ch}"].endswith(
                        f"/illum/{row['Metadata_Plate']}/{row['Metadata_Plate']}_Illum{ch}.npy"
                    )
            fields.add((row["Metadata_Plate"], row["Metadata_Well"], row["Metadata_Site"], illum))
    assert len(fields) == 2 * 32


def test_filename_form_and_stale_prefix(tmp_path, buckets):
    root = tmp_path / "source_4"
    report = buckets.synth(root, csv_form="filename", workers=1)  # 1 batch, 1 plate, 2 wells, 1 site, 64 x 64
    assert (report.n_plates, report.n_fields, report.size) == (1, 2, 64)
    rows = read_csv(report.load_data_with_illum_uris[0])
    assert list(rows[0]) == load_data_columns("filename", True)
    for row in rows:
        for kind in ("Orig", "Illum"):
            for ch in ALL_CHANNELS:
                path = row[f"PathName_{kind}{ch}"]
                assert path.startswith(str(root) + "/images/") and path.endswith("/")
                assert (Path(path) / row[f"FileName_{kind}{ch}"]).is_file()

    stale = "s3://old-bucket/projects/cpg0000-jump-pilot/source_4"
    for form, col in (("url", "URL_OrigDNA"), ("filename", "PathName_OrigDNA")):
        root2 = tmp_path / f"stale_{form}"
        rep = buckets.synth(root2, csv_form=form, url_prefix_override=stale + "/", workers=1)
        for row in read_csv(rep.load_data_uris[0]):
            value = row[col]
            assert value.startswith(stale + "/images/")
            rel = value[len(stale) + 1 :] + ("" if form == "url" else row["FileName_OrigDNA"])
            assert (root2 / rel).is_file()  # the same relative key exists under the real root: re-rooting works


# The plate maps and the planted layout: tests/test_platemaps.py.


# --------------------------------------------------------------------------- illumination


def test_illum_functions_match_the_vignetting_and_flatten_it(url_bucket, corrected_fields):
    _root, report = url_bucket
    illum = np.load(storage.local_path(report.illum_uris[0]))
    assert illum.dtype == np.float32 and illum.shape == (SIZE, SIZE)
    assert abs(float(illum.mean()) - 1.0) < 1e-3
    c = SIZE // 2
    assert illum[0, 0] < 0.8 * illum[c, c]  # fluorescent vignetting like the fixture (corner ~half the centre)

    def corner_centre(img):
        k = 16  # background level (10th percentile) of the four corner patches over the centre patch
        corners = [img[:k, :k], img[:k, -k:], img[-k:, :k], img[-k:, -k:]]
        centre = img[c - k // 2 : c + k // 2, c - k // 2 : c + k // 2]
        return np.mean([np.percentile(p, 10) for p in corners]) / np.percentile(centre, 10)

    before, after = [], []
    for row, corrected in corrected_fields:
        for ch in FLUORESCENT_CHANNELS:
            raw = tifffile.imread(storage.local_path(row[f"URL_Orig{ch}"])).astype(np.float32)
            before.append(corner_centre(raw))
            after.append(corner_centre(corrected[ch]))
    assert np.median(before) < 0.75
    assert 0.9 < np.median(after) < 1.1


def test_vignetting_is_the_documented_radial_falloff():
    v = vignetting(65, VignetteParams(cx=0.0, cy=0.0, a=0.3, b=0.1))
    assert v.dtype == np.float32 and v.shape == (65, 65)
    assert v[32, 32] == pytest.approx(1.0, abs=1e-3)
    r2 = (1 - 1 / 65) ** 2  # corner pixel centre at x = y = -(1 - 1/65); r^2 = (x^2 + y^2) / 2
    assert v[0, 0] == pytest.approx(1 - 0.3 * r2 - 0.1 * r2 * r2, abs=1e-5)
    np.testing.assert_allclose(v, v.T, atol=1e-7)
    np.testing.assert_allclose(v, v[::-1, ::-1], atol=1e-6)


# --------------------------------------------------------------------------- image model


def test_all_channels_show_the_same_cells(corrected_fields):
    within, across, rna_in_nuclei, dna_in_cells, bf = [], [], [], [], []
    for i, (_, im) in enumerate(corrected_fields[:8]):
        cells = {ch: fg_mask(im[ch], 2.0) for ch in ("ER", "RNA", "AGP", "Mito")}
        nuclei = fg_mask(im["DNA"], 4.0)
        within += [corr(cells["ER"], cells[ch]) for ch in ("RNA", "AGP", "Mito")]
        other = corrected_fields[i + 9][1]  # another plate / well
        across += [corr(cells["ER"], fg_mask(other[ch], 2.0)) for ch in ("RNA", "AGP", "Mito")]
        # nucleoli: the brightest RNA pixels sit inside DNA-stained nuclei
        top = im["RNA"] > np.percentile(im["RNA"], 99.7)
        near_nuclei = cv2.dilate(nuclei.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        rna_in_nuclei.append((top & near_nuclei).sum() / top.sum())
        dna_in_cells.append((nuclei & cells["ER"]).sum() / nuclei.sum())  # nuclei lie inside ER-stained cells
        # cells darken brightfield a little (high-passed: the slow mottle of the lamp field is not about cells)
        flat = im["Brightfield"] - cv2.GaussianBlur(im["Brightfield"], (0, 0), 8)
        bf.append(corr(-cv2.GaussianBlur(flat, (0, 0), 1.5), cells["ER"]))
    assert min(within) > 0.6, within
    assert max(np.abs(across)) < 0.2, across
    assert np.mean(rna_in_nuclei) > 0.8, rna_in_nuclei
    assert min(dna_in_cells) > 0.95, dna_in_cells
    assert min(bf) > 0.25, bf


def field_features(im: dict) -> tuple[list[float], int]:
    """Per-field profile from corrected images: nucleus count and size, cell area per nucleus, log intensities."""
    nuclei = fg_mask(im["DNA"], 4.0)
    cells = fg_mask(im["ER"], 2.0)
    _, _, cc, _ = cv2.connectedComponentsWithStats(nuclei.astype(np.uint8), connectivity=8)
    sizes = cc[1:, cv2.CC_STAT_AREA]
    sizes = sizes[sizes >= 4]  # noise specks are not nuclei
    feats = [len(sizes), sizes.mean(), cells.sum() / max(len(sizes), 1)]
    feats += [np.log(np.median(im[ch][cells])) for ch in FLUORESCENT_CHANNELS]
    return feats, len(sizes)


def leave_one_out_accuracy(features: list, labels: list) -> float:
    """Nearest-centroid classification of each field with the centroids of all the other fields (z-scored features)."""
    z = np.array(features, dtype=np.float64)
    z = (z - z.mean(0)) / z.std(0)
    labels = np.array(labels)
    hits = 0
    for i in range(len(labels)):
        keep = np.arange(len(labels)) != i
        centroids = {c: z[keep & (labels == c)].mean(0) for c in set(labels)}
        hits += min(centroids, key=lambda c: np.sum((z[i] - centroids[c]) ** 2)) == labels[i]
    return hits / len(labels)


def corrected_fluorescence(report) -> list[tuple[dict, dict]]:
    out = []
    for uri in report.load_data_with_illum_uris:
        for row in read_csv(uri):
            im = {
                ch: tifffile.imread(storage.local_path(row[f"URL_Orig{ch}"])).astype(np.float32)
                / np.load(storage.local_path(row[f"URL_Illum{ch}"]))
                for ch in FLUORESCENT_CHANNELS
            }
            out.append((row, im))
    return out


def test_plates_differ_measurably_as_planned(tmp_path):
    """All-control plates (no treatments): held-out fields are told apart by plate, counts follow planned densities."""
    kw = {"batches": 2, "plates_per_batch": 2, "wells_per_plate": 2, "sites_per_well": 4, "perturbations": 0, "seed": 3}
    plan = plan_bucket(**kw)
    report = synth_bucket(str(tmp_path / "s4"), size=SIZE, workers=2, **kw)
    feats, plates, counts = [], [], {}
    for row, im in corrected_fluorescence(report):
        f, n = field_features(im)
        feats.append(f)
        plates.append(row["Metadata_Plate"])
        counts.setdefault(row["Metadata_Plate"], []).append(n)
    assert leave_one_out_accuracy(feats, plates) > 0.8  # chance: 1/4
    density = {p.barcode: p.phenotype.density for p in plan.plates}
    by_density = sorted(counts, key=density.get)
    mean_counts = [np.mean(counts[p]) for p in by_density]
    assert mean_counts == sorted(mean_counts), (by_density, mean_counts)


def test_planted_perturbations_are_told_apart_within_a_plate(tmp_path):
    """Replicate wells of a perturbation (at other positions) look alike; a positive control is far from DMSO."""
    # site_variation 0 (the default, said here because it matters): the sites of a well differ only in where their
    # cells lie, so what is left is the planted effect (at 1, each site's own confluence brings these hand features
    # down to 0.41 on single fields, chance 0.25)
    report = synth_bucket(str(tmp_path / "s4"), batches=1, plates_per_batch=1, wells_per_plate=8, sites_per_well=4,
                          perturbations=2, poscon=1, negcon_wells=2, targets=2, size=SIZE, seed=0, workers=2,
                          site_variation=0)  # fmt: skip
    truth = report.truth()
    feats, perts = [], []
    for row, im in corrected_fluorescence(report):
        feats.append(field_features(im)[0])
        perts.append(truth[(row["Metadata_Plate"], row["Metadata_Well"])]["perturbation"])
    assert Counter(perts) == {"DMSO": 8, "SYNTH-POS1": 8, "SYNTH-P01": 8, "SYNTH-P02": 8}  # 2 wells x 4 sites
    assert leave_one_out_accuracy(feats, perts) > 0.5  # chance: 1/4; fields are classified by perturbation, not well
    ctrl = [i for i, p in enumerate(perts) if p in ("DMSO", "SYNTH-POS1")]
    assert leave_one_out_accuracy([feats[i] for i in ctrl], [perts[i] for i in ctrl]) > 0.85  # chance: 1/2


def test_render_field_is_deterministic_and_seed_dependent():
    ph = Phenotype()
    a, truth = render_field(ph, 96, np.random.default_rng(5))
    b, _ = render_field(ph, 96, np.random.default_rng(5))
    c, _ = render_field(ph, 96, np.random.default_rng(6))
    assert list(a) == list(ALL_CHANNELS)
    assert all(np.array_equal(a[ch], b[ch]) for ch in ALL_CHANNELS)
    assert all(not np.array_equal(a[ch], c[ch]) for ch in ALL_CHANNELS)
    assert truth.n_cells > 0 and truth.labels.max() <= truth.n_cells and truth.nucleus.any()
    # DNA is bright exactly where the geometry put nuclei
    dna = a["DNA"].astype(np.float32)
    assert np.median(dna[truth.nucleus]) > 5 * np.median(dna[truth.labels == 0])
    with pytest.raises(ValueError, match="too small"):
        render_field(ph, 8, np.random.default_rng(0))


def test_large_fields_render_at_half_resolution_without_losing_structure():
    imgs, truth = render_field(Phenotype(density=80), 600, np.random.default_rng(0))
    assert imgs["DNA"].shape == (600, 600) and truth.labels.shape == (300, 300)
    nuclei = cv2.resize(truth.nucleus.astype(np.uint8), (600, 600), interpolation=cv2.INTER_NEAREST).astype(bool)
    dna = imgs["DNA"].astype(np.float32)
    assert np.median(dna[nuclei]) > 5 * np.median(dna[~nuclei])


# --------------------------------------------------------------------------- determinism, faults, S3


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, buckets):
    kw = {"plates_per_batch": 2, "workers": 2}  # and 1 batch, 2 wells, 1 site, 64 x 64
    roots = [tmp_path / name / "source_4" for name in ("a", "b", "c")]
    assert buckets.synth(roots[0], seed=1, **kw).n_fields == 4
    buckets.synth(roots[1], seed=1, **{**kw, "workers": 1})  # the thread count must not matter
    buckets.synth(roots[2], seed=2, **kw)

    def contents(root):  # CSVs name their own root: compare them with it removed
        return {k: (root / k).read_bytes().replace(str(root).encode(), b"ROOT") for k in rel_keys(str(root))}

    a, b, c = (contents(r) for r in roots)
    assert a == b
    assert set(a) != set(c)  # other barcodes / timestamps / wells
    imgs_a = sorted(v for k, v in a.items() if k.endswith(".tiff"))
    imgs_c = sorted(v for k, v in c.items() if k.endswith(".tiff"))
    assert len(imgs_a) == len(imgs_c) and not set(imgs_a) & set(imgs_c)


def test_faults_are_planted_exactly_as_reported(tmp_path, buckets):
    root = tmp_path / "source_4"
    faults = SynthFaults(missing_channel=2, corrupt_tiff=2, truncated_tiff=2, stray_files=3, seed=7)
    report = buckets.synth(root, plates_per_batch=2, sites_per_well=2, csv_form="filename", faults=faults, workers=2)
    kinds = {k: report.faults_of(k) for k in ("missing_channel", "corrupt_tiff", "truncated_tiff", "stray_file")}
    assert [len(v) for v in kinds.values()] == [2, 2, 2, 3]
    assert len({f.uri for f in report.faults}) == 9  # all distinct
    assert report.n_images == 8 * 8 - 2

    listed = set()  # every image the CSVs name, missing ones included (a stale index)
    for uri in report.load_data_uris:
        for row in read_csv(uri):
            listed |= {row[f"PathName_Orig{ch}"] + row[f"FileName_Orig{ch}"] for ch in ALL_CHANNELS}
    assert {f.uri for f in kinds["missing_channel"]} <= listed
    unreadable = set()
    for uri in sorted(listed):
        if not Path(uri).exists():
            continue
        try:
            tifffile.imread(uri)
        except (ValueError, tifffile.TiffFileError):  # what tifffile raises for a bad header or short data
            unreadable.add(uri)
    assert {u for u in listed if not Path(u).exists()} == {f.uri for f in kinds["missing_channel"]}
    assert unreadable == {f.uri for f in kinds["corrupt_tiff"] + kinds["truncated_tiff"]}
    good = next(u for u in listed if Path(u).exists() and u not in unreadable)
    for f in kinds["truncated_tiff"]:
        assert 0 < Path(f.uri).stat().st_size < Path(good).stat().st_size
        assert Path(f.uri).read_bytes()[:4] == b"II*\x00"  # a real TIFF start, cut short
    for f in report.faults:
        assert f.batch == REAL_SOURCE4_BATCHES[0] and f.plate in {bc for _, bc, _ in report.plates}
        if f.kind == "stray_file":
            assert Path(f.uri).is_file() and layout.parse_image_filename(Path(f.uri).name) is None
            assert f.well is None and f.channel is None
        else:
            assert layout.parse_image_filename(Path(f.uri).name).channel == CH_NUMBER[f.channel]
            assert f"r{layout.well_row_col(f.well)[0]:02d}c{layout.well_row_col(f.well)[1]:02d}f{f.site:02d}" in f.uri
    d = json.loads(json.dumps(report.to_dict()))
    assert len(d["faults"]) == 9 and d["n_images"] == 62
    assert "2 missing_channel" in report.summary() and "3 stray_file" in report.summary()

    with pytest.raises(ValueError, match="image faults requested"):
        buckets.synth(tmp_path / "x", wells_per_plate=1, size=32, faults=SynthFaults(corrupt_tiff=9))
    with pytest.raises(ValueError, match="stray files requested"):
        buckets.synth(tmp_path / "y", wells_per_plate=1, size=32, faults=SynthFaults(stray_files=5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"csv_form": "parquet"}, "csv_form"),
        ({"size": 8}, "size"),
        ({"wells_per_plate": 0}, "wells_per_plate"),
        ({"sites_per_well": 100}, "sites_per_well"),
        ({"workers": 0}, "workers"),
        ({"wells_per_plate": 4, "perturbations": 2}, "wells_per_plate=4 is too small for the layout"),
        ({"wells_per_plate": 8, "perturbations": 2, "poscon": 1, "negcon_wells": 3}, "= 9 wells"),
        ({"replicates": 1}, "replicates"),
        ({"negcon_wells": 0}, "negcon_wells"),
        ({"poscon": -1}, "poscon"),
        ({"wells_per_plate": 8, "perturbations": 2, "targets": 3}, "targets"),
        ({"wells_per_plate": 2, "targets": 1}, "no perturbations"),
    ],
)
def test_bad_arguments_are_refused_with_the_parameter_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synth_bucket(str(tmp_path / "s4"), **kwargs)
    assert not (tmp_path / "s4").exists()


def test_s3_bucket_holds_the_same_keys_and_bytes_as_the_local_form(s3_bucket, tmp_path, buckets):
    kw = {  # and 1 batch, 2 wells, 1 site, 64 x 64
        "plates_per_batch": 2,
        "workers": 4,
        "faults": SynthFaults(stray_files=2, corrupt_tiff=1, missing_channel=1, seed=1),
    }
    s3_root = f"s3://{s3_bucket}/cpg0000-jump-pilot/source_4"
    local_root = tmp_path / "cpg0000-jump-pilot" / "source_4"
    rs3 = buckets.synth(s3_root, **kw)
    rlocal = buckets.synth(local_root, **kw)
    s3_keys, local_keys = rel_keys(s3_root), rel_keys(str(local_root))
    # images (one missing) + illum + CSVs + plate maps + perturbation metadata + stray files
    assert set(s3_keys) == set(local_keys) and len(s3_keys) == 2 * 8 * 2 - 1 + 2 * 8 + 2 * 2 + 2 + 1 + 2
    for key in s3_keys:
        s3_bytes = storage.read_bytes(f"{s3_root}/{key}")
        local_bytes = (local_root / key).read_bytes()
        if key.endswith(".csv"):  # CSVs name their root
            s3_bytes = s3_bytes.replace(s3_root.encode(), b"ROOT")
            local_bytes = local_bytes.replace(b"file://" + str(local_root).encode(), b"ROOT")
        assert s3_bytes == local_bytes, key
    for row in read_csv(rs3.load_data_with_illum_uris[0]):
        for ch in ALL_CHANNELS:
            assert row[f"URL_Orig{ch}"].startswith(s3_root + "/images/")
            assert row[f"URL_Illum{ch}"].startswith(s3_root + "/images/")
    def strip(r, root):
        return sorted(f.uri[len(root) :] for f in r.faults)

    assert strip(rs3, s3_root) == strip(rlocal, str(local_root))
    assert rs3.n_bytes == sum(s3_keys.values())


def test_local_bulk_writes_skip_fsync_and_the_public_names_stay(tmp_path, buckets, monkeypatch):
    """`dinocell synth` writes local objects atomically but without one fsync each (it was I/O-bound on them)."""
    import os

    import dinocell.synth as synth_pkg
    from dinocell.synth import bucket

    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    report = buckets.synth(tmp_path / "s4", faults=SynthFaults(stray_files=1, truncated_tiff=1))
    assert synced == []
    keys = rel_keys(str(tmp_path / "s4"))
    assert report.n_bytes == sum(keys.values()) and not [k for k in keys if k.endswith(".tmp")]
    assert (synth_pkg.synth_bucket, synth_pkg.SynthFaults) == (bucket.synth_bucket, bucket.SynthFaults)
    for name in bucket.__all__:
        assert getattr(bucket, name) is not None, name


def test_sites_of_a_well_differ_in_their_cells_not_only_their_positions(tmp_path):
    """Each site's own confluence shows in the pixels: nucleus counts of one well's sites spread more than Poisson."""
    kw = {"batches": 1, "plates_per_batch": 1, "wells_per_plate": 4, "sites_per_well": 6, "perturbations": 0,
          "seed": 1, "size": 256, "workers": 2}  # 256 px: ~40 nuclei a field, Poisson spread ~0.15
    spread = {}
    for sv in (0.0, 1.0):
        counts: dict = {}
        report = synth_bucket(str(tmp_path / f"sv{sv}"), site_variation=sv, **kw)
        assert report.site_variation == sv and ("site variation 1" in report.summary()) == (sv == 1.0)
        for row, im in corrected_fluorescence(report):
            counts.setdefault(row["Metadata_Well"], []).append(field_features(im)[1])
        # log-count spread between the sites of a well, averaged over wells
        spread[sv] = float(np.mean([np.std(np.log(np.maximum(c, 1))) for c in counts.values()]))
    assert spread[1.0] > 1.5 * spread[0.0], spread  # measured 0.25 vs 0.12 (seed 1)
