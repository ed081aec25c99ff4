"""`dinocell synth`: write a synthetic bucket laid out exactly like cpg0000-jump-pilot/source_4 (REFERENCE.md section 1).

    <source_root>/images/<BATCH>/images/<BARCODE>__<TIMESTAMP>-Measurement1/Images/rRRcCCfFFp01-chNsk1fk1fl1.tiff
    <source_root>/images/<BATCH>/illum/<BARCODE>/<BARCODE>_Illum<Ch>.npy                (with_illum)
    <source_root>/workspace/load_data_csv/<BATCH>/<BARCODE>/load_data.csv
    <source_root>/workspace/load_data_csv/<BATCH>/<BARCODE>/load_data_with_illum.csv     (with_illum)
    <source_root>/workspace/metadata/platemaps/<BATCH>/barcode_platemap.csv + platemap/<NAME>.txt

Images are 8 uncompressed single-page uint16 TIFFs per site (chN as in `CPJUMP1_CHANNEL_NUMBERS`), rendered by
`synth_cells.render_field`: every channel shows the same cells. The illumination functions are the exact vignetting
each plate's images got, normalised to mean 1, so `raw / illum` flattens the field.

What the CSV columns hold:
- csv_form="url" (current form): `URL_Orig<Ch>` full URLs; `s3://...` for an S3 root, `file://` + absolute path for a
  local root (storage.local_path accepts it). The illum variant adds `URL_Illum<Ch>`.
- csv_form="filename" (older form): `FileName_Orig<Ch>` + `PathName_Orig<Ch>` (directory, trailing '/'): an `s3://`
  prefix for an S3 root, a plain absolute directory for a local one. The illum variant adds FileName/PathName_Illum<Ch>.
- `url_prefix_override` replaces the source root in every URL/PathName (stale-prefix simulation), e.g.
  `s3://old-bucket/projects/cpg0000-jump-pilot/source_4`; the objects are still written under `source_root`.

Ground truth for evaluation: wells carry treatments from a plate map (same layout on every plate of the run, as in
JUMP); treatment T00 is the untreated control. Plates differ in a "plate phenotype" (density, cell size, elongation
spread evenly over their ranges) and treatments move the phenotype further, so fields of different plates and of
different treatments differ measurably (see `SynthPlan`).

Faults (`SynthFaults`) are planted deterministically and listed exactly in `SynthReport.faults`.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import tifffile

from dinocell import storage
from dinocell.channels import ALL_CHANNELS, FLUORESCENT_CHANNELS
from dinocell.jump import layout
from dinocell.synth.cells import Phenotype, VignetteParams, render_field, vignetting, zoom_for_size

__all__ = [
    "REAL_SOURCE4_BATCHES",
    "PlantedFault",
    "SynthFaults",
    "SynthField",
    "SynthPlan",
    "SynthPlate",
    "SynthReport",
    "batch_names",
    "encode_tiff",
    "load_data_columns",
    "plan_bucket",
    "synth_bucket",
]

# cpg0000-jump-pilot/source_4 batch names: the first runs reuse them; further batches get later, similar names.
REAL_SOURCE4_BATCHES = (
    "2020_11_04_CPJUMP1",
    "2020_11_18_CPJUMP1_TimepointDay1",
    "2020_11_19_TimepointDay4",
    "2020_12_02_CPJUMP1_2WeeksTimePoint",
    "2020_12_07_CPJUMP1_4WeeksTimePoint",
    "2020_12_08_CPJUMP1_Bleaching",
)

# Metadata_ChannelName as the Phenix export names the dye (fixture load_data.csv). The three brightfield planes get
# distinct names (their role), so nothing keyed on the name collapses them into one channel.
CHANNEL_DYES = {
    "DNA": "HOECHST 33342",
    "ER": "Alexa 488",
    "RNA": "488 long",
    "AGP": "Alexa 568",
    "Mito": "Alexa 647",
    "HighZBF": "HighZBF",
    "LowZBF": "LowZBF",
    "Brightfield": "Brightfield",
}
PIXEL_SIZE_M = 5.979760809567617e-07  # fixture Metadata_ImageResolutionX
PLATE_ROWS, PLATE_COLS = 16, 24  # 384-well plates
PLATEMAP_NAME = "SYNTH-PLATEMAP-1"

# Seed-stream tags: each purpose draws from its own stream, so changing one part of a run leaves the others alone.
_TAG_PLAN, _TAG_FIELD, _TAG_FAULTS, _TAG_STRAY = 101, 202, 303, 404

FAULT_KINDS = ("missing_channel", "corrupt_tiff", "truncated_tiff", "stray_file")


# --------------------------------------------------------------------------- public records


@dataclass(frozen=True)
class SynthFaults:
    """How many faults to plant; all are chosen with `seed` and reported exactly.

    missing_channel: image files not written although load_data.csv lists them (stale index).
    corrupt_tiff: image files holding random bytes instead of a TIFF.
    truncated_tiff: valid TIFFs cut to part of their length (an interrupted upload).
    stray_files: non-image objects in plate folders (Images/Index.idx.xml, .DS_Store, a *_thumb.png).
    """

    missing_channel: int = 0
    corrupt_tiff: int = 0
    truncated_tiff: int = 0
    stray_files: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("missing_channel", "corrupt_tiff", "truncated_tiff", "stray_files"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"SynthFaults.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class PlantedFault:
    kind: str  # one of FAULT_KINDS
    uri: str
    batch: str
    plate: str  # barcode
    well: str | None = None  # None for stray files
    site: int | None = None
    channel: str | None = None


@dataclass(frozen=True)
class SynthPlate:
    batch: str
    barcode: str
    plate_dir: str
    timestamp: str
    batch_index: int
    plate_index: int  # within its batch
    phenotype: Phenotype  # the plate's base phenotype (before treatments)
    vignette: tuple[tuple[str, VignetteParams], ...]  # per channel

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.batch, self.barcode, self.plate_dir)

    def vignette_params(self, channel: str) -> VignetteParams:
        return dict(self.vignette)[channel]


@dataclass(frozen=True)
class SynthField:
    plate: SynthPlate
    row: int
    col: int
    site: int
    treatment: int
    phenotype: Phenotype

    @property
    def well(self) -> str:
        return layout.well_name(self.row, self.col)

    def filename(self, channel: str) -> str:
        return layout.image_filename(self.row, self.col, self.site, layout.CPJUMP1_CHANNEL_NUMBERS[channel])


@dataclass(frozen=True)
class SynthPlan:
    """Everything a run will write, decided up front from the seed (rendering then only needs each field's seed)."""

    plates: tuple[SynthPlate, ...]
    wells: tuple[tuple[int, int], ...]  # (row, col), the same positions on every plate
    treatment_of_well: dict  # well name -> treatment id (0 = control)
    treatment_effects: tuple[dict, ...]  # per treatment: multiplicative / additive changes to the phenotype
    sites_per_well: int
    seed: int

    def fields(self) -> list[SynthField]:
        out = []
        for plate in self.plates:
            for row, col in self.wells:
                well = layout.well_name(row, col)
                t = self.treatment_of_well[well]
                ph = _apply_treatment(plate.phenotype, self.treatment_effects[t], self._well_jitter(plate, row, col))
                for site in range(1, self.sites_per_well + 1):
                    out.append(SynthField(plate, row, col, site, t, ph))
        return out

    def _well_jitter(self, plate: SynthPlate, row: int, col: int) -> float:
        # Small well-to-well density noise (edge effects, pipetting) that no treatment explains.
        rng = _rng(self.seed, _TAG_PLAN, 7, plate.batch_index, plate.plate_index, row, col)
        return float(np.exp(rng.normal(0.0, 0.05)))


@dataclass
class SynthReport:
    source_root: str
    csv_form: str
    size: int
    seed: int
    n_batches: int = 0
    n_plates: int = 0
    n_wells: int = 0  # (plate, well) pairs
    n_fields: int = 0
    n_images: int = 0  # image objects written (missing channels are not; corrupt/truncated ones are)
    n_bytes: int = 0  # every byte written: images, illum, CSVs, plate maps, stray files
    image_bytes: int = 0
    plates: list[tuple[str, str, str]] = field(default_factory=list)  # (batch, barcode, plate_dir)
    faults: list[PlantedFault] = field(default_factory=list)
    load_data_uris: list[str] = field(default_factory=list)
    load_data_with_illum_uris: list[str] = field(default_factory=list)
    illum_uris: list[str] = field(default_factory=list)
    platemap_uris: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def faults_of(self, kind: str) -> list[PlantedFault]:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        return [f for f in self.faults if f.kind == kind]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plates"] = [list(p) for p in self.plates]
        return d

    def summary(self) -> str:
        counts = {k: len(self.faults_of(k)) for k in FAULT_KINDS}
        faults = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "none"
        rate = self.n_fields / self.seconds if self.seconds > 0 else float("nan")
        return (
            f"synth: {self.n_batches} batches, {self.n_plates} plates, {self.n_wells} wells, {self.n_fields} fields, "
            f"{self.n_images} images ({self.size}x{self.size}, {self.image_bytes / 1e6:.1f} MB), "
            f"{self.n_bytes / 1e6:.1f} MB in all, csv form {self.csv_form!r}, faults: {faults}; "
            f"{self.seconds:.1f} s ({rate:.1f} fields/s) -> {self.source_root}"
        )


# --------------------------------------------------------------------------- planning


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def batch_names(n: int) -> list[str]:
    """The real source_4 batch names first, then weekly `YYYY_MM_DD_CPJUMP1_Synth<k>` batches after them."""
    names = list(REAL_SOURCE4_BATCHES[:n])
    start = dt.date(2021, 1, 4)
    for k in range(len(names), n):
        d = start + dt.timedelta(days=7 * (k - len(REAL_SOURCE4_BATCHES)))
        names.append(f"{d:%Y_%m_%d}_CPJUMP1_Synth{k + 1}")
    return names


def _batch_date(batch: str) -> dt.datetime:
    y, m, d = (int(x) for x in batch.split("_")[:3])
    return dt.datetime(y, m, d)


def _spread(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """n values evenly spread over [lo, hi] in random order (Latin hypercube on bin centres): plates always differ."""
    centres = lo + (hi - lo) * (np.arange(n) + 0.5) / n
    return centres[rng.permutation(n)]


def _treatment_effects(rng: np.random.Generator, n: int) -> tuple[dict, ...]:
    effects = [{}]  # T00: the control
    for _ in range(1, n):
        effects.append(
            {
                "density": float(np.exp(rng.normal(0.0, 0.3))),
                "cell_radius": float(np.exp(rng.normal(0.0, 0.15))),
                "elongation": float(rng.normal(0.0, 0.35)),  # additive
                "nucleus_fraction": float(np.exp(rng.normal(0.0, 0.12))),
                "irregularity": float(rng.normal(0.0, 0.08)),  # additive
                "er_texture": float(rng.normal(0.0, 0.25)),  # additive
                "mito_filaments": float(rng.normal(0.0, 0.3)),  # additive
                "rna_nucleoli": float(rng.normal(0.0, 0.8)),  # additive
                "agp_fibres": float(rng.normal(0.0, 0.25)),  # additive
                "brightness_mito": float(np.exp(rng.normal(0.0, 0.25))),
                "brightness_agp": float(np.exp(rng.normal(0.0, 0.2))),
            }
        )
    return tuple(effects)


_MULTIPLICATIVE = {"density", "cell_radius", "nucleus_fraction", "brightness_mito", "brightness_agp"}


def _apply_treatment(base: Phenotype, effect: dict, density_jitter: float = 1.0) -> Phenotype:
    vals = base.to_dict()
    for k, v in effect.items():
        vals[k] = vals[k] * v if k in _MULTIPLICATIVE else vals[k] + v
    vals["density"] *= density_jitter
    return Phenotype(**vals).clamped()


def _choose_wells(rng: np.random.Generator, n: int) -> tuple[tuple[int, int], ...]:
    idx = np.sort(rng.choice(PLATE_ROWS * PLATE_COLS, size=n, replace=False))
    return tuple((int(i) // PLATE_COLS + 1, int(i) % PLATE_COLS + 1) for i in idx)


def plan_bucket(
    *,
    batches: int = 2,
    plates_per_batch: int = 2,
    wells_per_plate: int = 4,
    sites_per_well: int = 2,
    treatments: int = 4,
    seed: int = 0,
) -> SynthPlan:
    """Decide names, plate phenotypes, vignetting, well positions and treatments (no I/O). See `synth_bucket`."""
    for name, v, lo, hi in (
        ("batches", batches, 1, 1000),
        ("plates_per_batch", plates_per_batch, 1, 1000),
        ("wells_per_plate", wells_per_plate, 1, PLATE_ROWS * PLATE_COLS),
        ("sites_per_well", sites_per_well, 1, 99),
        ("treatments", treatments, 1, PLATE_ROWS * PLATE_COLS),
    ):
        if not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
            raise ValueError(f"synth: {name} must be an integer in [{lo}, {hi}], got {v!r}")
    rng = _rng(seed, _TAG_PLAN)
    n_plates = batches * plates_per_batch
    if n_plates > 9000:
        raise ValueError(f"synth: {n_plates} plates exceed the BR0011xxxx barcode space (9000)")
    barcodes = [f"BR0011{int(x):04d}" for x in rng.choice(np.arange(1000, 10000), size=n_plates, replace=False)]
    density = _spread(rng, n_plates, 25.0, 110.0)
    radius = _spread(rng, n_plates, 32.0, 58.0)
    elong = _spread(rng, n_plates, 1.1, 2.2)
    plates = []
    for b, batch in enumerate(batch_names(batches)):
        # Vignetting belongs to the microscope: one base per batch, a small change per plate.
        vrng = _rng(seed, _TAG_PLAN, 1, b)
        vbase = {
            ch: (
                vrng.uniform(-0.12, 0.12),
                vrng.uniform(-0.12, 0.12),
                vrng.uniform(0.40, 0.55) if ch in FLUORESCENT_CHANNELS else vrng.uniform(0.04, 0.10),
            )
            for ch in ALL_CHANNELS
        }
        clock = _batch_date(batch) + dt.timedelta(days=1, hours=int(rng.integers(9, 14)))
        for p in range(plates_per_batch):
            g = b * plates_per_batch + p
            clock += dt.timedelta(minutes=int(rng.integers(70, 110)), seconds=int(rng.integers(0, 60)))
            timestamp = clock.strftime("%Y-%m-%dT%H_%M_%S")
            prng = _rng(seed, _TAG_PLAN, 2, b, p)
            vig = []
            for ch in ALL_CHANNELS:
                cx, cy, total = vbase[ch]
                total *= prng.uniform(0.95, 1.05)
                share = prng.uniform(0.65, 0.8)
                vig.append(
                    (
                        ch,
                        VignetteParams(
                            cx=cx + prng.normal(0, 0.01),
                            cy=cy + prng.normal(0, 0.01),
                            a=total * share,
                            b=total * (1 - share),
                        ),
                    )
                )
            ph = Phenotype(
                density=float(density[g]),
                cell_radius=float(radius[g]),
                elongation=float(elong[g]),
                nucleus_fraction=prng.uniform(0.32, 0.5),
                irregularity=prng.uniform(0.08, 0.3),
                clustering=prng.uniform(0.1, 0.6),
                dna_texture=prng.uniform(0.3, 0.8),
                er_texture=prng.uniform(0.3, 0.9),
                rna_nucleoli=prng.uniform(1.0, 3.0),
                agp_edges=prng.uniform(0.4, 0.9),
                agp_fibres=prng.uniform(0.2, 0.8),
                mito_filaments=prng.uniform(0.2, 0.8),
                **{f"brightness_{ch.lower()}": float(np.exp(prng.normal(0.0, 0.15))) for ch in FLUORESCENT_CHANNELS},
            ).clamped()
            plate_dir = layout.plate_dir_name(barcodes[g], timestamp, 1)
            plates.append(SynthPlate(batch, barcodes[g], plate_dir, timestamp, b, p, ph, tuple(vig)))
    wells = _choose_wells(rng, wells_per_plate)
    order = [k % treatments for k in range(wells_per_plate)]
    rng.shuffle(order)
    treatment_of_well = {layout.well_name(r, c): int(t) for (r, c), t in zip(wells, order)}
    return SynthPlan(tuple(plates), wells, treatment_of_well, _treatment_effects(rng, treatments), sites_per_well, seed)


# --------------------------------------------------------------------------- encoding and keys


def encode_tiff(img: np.ndarray) -> bytes:
    """One uncompressed single-page grayscale TIFF (as cpg0000 stores them); deterministic bytes."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, img, photometric="minisblack", metadata=None)
    return buf.getvalue()


def _encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _rel_image_key(batch: str, plate_dir: str, filename: str) -> str:
    return f"images/{batch}/images/{plate_dir}/Images/{filename}"


def _rel_illum_key(batch: str, barcode: str, channel: str) -> str:
    return f"images/{batch}/illum/{barcode}/{barcode}_Illum{channel}.npy"


@functools.lru_cache(maxsize=32)  # a few plates' worth: fields are rendered plate by plate
def _vignette_array(size: int, params: VignetteParams) -> np.ndarray:
    arr = vignetting(size, params)
    arr.setflags(write=False)
    return arr


def _illum_function(size: int, params: VignetteParams) -> np.ndarray:
    v = _vignette_array(size, params)
    return (v / np.float32(v.mean(dtype=np.float64))).astype(np.float32)


# --------------------------------------------------------------------------- CSVs


def _metadata_columns() -> list[str]:
    cols = [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Site",
        "Metadata_Row",
        "Metadata_Col",
        "Metadata_FieldID",
        "Metadata_PlaneID",
    ]
    cols += [f"Metadata_ChannelID_Orig{ch}" for ch in ALL_CHANNELS]
    cols += [f"Metadata_ChannelName_Orig{ch}" for ch in ALL_CHANNELS]
    cols += ["Metadata_ImageSizeX", "Metadata_ImageSizeY", "Metadata_ImageResolutionX", "Metadata_ImageResolutionY"]
    return cols


def load_data_columns(csv_form: str, with_illum: bool) -> list[str]:
    """The header `synth_bucket` writes for a form (the illum columns follow the image columns)."""
    cols: list[str] = []
    if csv_form == "url":
        cols += [f"URL_Orig{ch}" for ch in ALL_CHANNELS]
        if with_illum:
            cols += [f"URL_Illum{ch}" for ch in ALL_CHANNELS]
    else:
        for ch in ALL_CHANNELS:
            cols += [f"FileName_Orig{ch}", f"PathName_Orig{ch}"]
        if with_illum:
            for ch in ALL_CHANNELS:
                cols += [f"FileName_Illum{ch}", f"PathName_Illum{ch}"]
    return cols + _metadata_columns()


class _Addresser:
    """How a relative key is written into a CSV: full URL (url form) or directory + file name (filename form)."""

    def __init__(self, source_root: str, csv_form: str, url_prefix_override: str | None):
        if url_prefix_override is not None:
            prefix = url_prefix_override.rstrip("/")
        elif storage.is_s3(source_root):
            prefix = source_root.rstrip("/")
        else:
            path = str(storage.local_path(source_root))  # already absolute (synth_bucket made it so)
            prefix = ("file://" + path) if csv_form == "url" else path
        self.prefix = prefix

    def url(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def dir_and_name(self, rel: str) -> tuple[str, str]:
        d, _, name = rel.rpartition("/")
        return f"{self.prefix}/{d}/", name


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="raise")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _csv_row(f: SynthField, size: int, csv_form: str, with_illum: bool, addr: _Addresser) -> dict:
    p = f.plate
    row: dict[str, str] = {}
    for ch in ALL_CHANNELS:
        rel = _rel_image_key(p.batch, p.plate_dir, f.filename(ch))
        if csv_form == "url":
            row[f"URL_Orig{ch}"] = addr.url(rel)
        else:
            row[f"PathName_Orig{ch}"], row[f"FileName_Orig{ch}"] = addr.dir_and_name(rel)
    if with_illum:
        for ch in ALL_CHANNELS:
            rel = _rel_illum_key(p.batch, p.barcode, ch)
            if csv_form == "url":
                row[f"URL_Illum{ch}"] = addr.url(rel)
            else:
                row[f"PathName_Illum{ch}"], row[f"FileName_Illum{ch}"] = addr.dir_and_name(rel)
    res = f"{PIXEL_SIZE_M / zoom_for_size(size):.10E}"
    row.update(
        {
            "Metadata_Plate": p.barcode,
            "Metadata_Well": f.well,
            "Metadata_Site": str(f.site),
            "Metadata_Row": str(f.row),
            "Metadata_Col": str(f.col),
            "Metadata_FieldID": str(f.site),
            "Metadata_PlaneID": "1",
            "Metadata_ImageSizeX": str(size),
            "Metadata_ImageSizeY": str(size),
            "Metadata_ImageResolutionX": res,
            "Metadata_ImageResolutionY": res,
        }
    )
    for ch in ALL_CHANNELS:
        row[f"Metadata_ChannelID_Orig{ch}"] = str(layout.CPJUMP1_CHANNEL_NUMBERS[ch])
        row[f"Metadata_ChannelName_Orig{ch}"] = CHANNEL_DYES[ch]
    return row


# --------------------------------------------------------------------------- faults


def _stray_candidates(plate: SynthPlate, first: SynthField, images_root: str) -> list[tuple[str, bytes]]:
    """Non-image objects that real exports leave beside the images, as (uri, bytes): four places per plate."""
    plate_dir = storage.join(images_root, plate.batch, "images", plate.plate_dir)
    images_dir = storage.join(plate_dir, "Images")
    thumb = first.filename("Mito").rsplit(".", 1)[0] + "_thumb.png"
    ok, png = cv2.imencode(".png", np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1)))
    if not ok:  # pragma: no cover - OpenCV always encodes a small uint8 image
        raise RuntimeError("could not encode the thumbnail PNG")
    index_xml = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<EvaluationInputData Version="2" xmlns="43B2A954-E3C3-47E1-B392-6635266B0DAF/HarmonyV5">'
        f"<Plates><Plate><PlateID>{plate.barcode}</PlateID></Plate></Plates></EvaluationInputData>\n"
    ).encode()
    ds_store = b"\x00\x00\x00\x01Bud1" + bytes(56)
    return [
        (storage.join(images_dir, "Index.idx.xml"), index_xml),
        (storage.join(images_dir, ".DS_Store"), ds_store),
        (storage.join(images_dir, thumb), png.tobytes()),
        (storage.join(plate_dir, ".DS_Store"), ds_store),
    ]


def _plan_image_faults(fields_: Sequence[SynthField], faults: SynthFaults) -> dict[tuple[int, str], str]:
    """(field index, channel) -> fault kind, for distinct slots chosen with the faults' seed."""
    kinds = ["missing_channel"] * faults.missing_channel + ["corrupt_tiff"] * faults.corrupt_tiff
    kinds += ["truncated_tiff"] * faults.truncated_tiff
    slots = len(fields_) * len(ALL_CHANNELS)
    if len(kinds) > slots:
        raise ValueError(f"synth: {len(kinds)} image faults requested but the run writes only {slots} images")
    rng = _rng(faults.seed, _TAG_FAULTS)
    picks = rng.choice(slots, size=len(kinds), replace=False) if kinds else []
    return {(int(s) // len(ALL_CHANNELS), ALL_CHANNELS[int(s) % len(ALL_CHANNELS)]): k for s, k in zip(picks, kinds)}


def _corrupt_bytes(rng: np.random.Generator, n: int) -> bytes:
    data = bytearray(rng.bytes(max(n, 16)))
    data[:4] = b"\x89GRB"  # never a TIFF magic (II*\0 / MM\0*), so readers fail at once
    return bytes(data)


# --------------------------------------------------------------------------- the run


def synth_bucket(
    source_root: str,
    *,
    batches: int = 2,
    plates_per_batch: int = 2,
    wells_per_plate: int = 4,
    sites_per_well: int = 2,
    size: int = 1080,
    seed: int = 0,
    csv_form: str = "url",
    with_illum: bool = True,
    faults: SynthFaults | None = None,
    workers: int = 8,
    url_prefix_override: str | None = None,
    treatments: int = 4,
) -> SynthReport:
    """Write a synthetic JUMP-layout bucket under `source_root` and report what was written.

    source_root: local directory (or file:// path) or s3:// prefix standing for `<bucket>/cpg0000-jump-pilot/source_4`.
    batches: number of batches (named like the real source_4 batches).
    plates_per_batch: plates in each batch (barcodes BR0011xxxx, one acquisition timestamp each).
    wells_per_plate: wells per plate (same positions on every plate, spread over a 384-well plate).
    sites_per_well: fields per well (f01..).
    size: image width = height in pixels (1080 like CPJUMP1; smaller sizes show a binned field, see synth_cells).
    seed: everything (names, phenotypes, pixels) follows from it: same seed, same bytes.
    csv_form: "url" (URL_Orig<Ch> columns) or "filename" (FileName_Orig<Ch> + PathName_Orig<Ch>).
    with_illum: also write the illumination functions (.npy) and load_data_with_illum.csv.
    faults: faults to plant (missing / corrupt / truncated images, stray files); None plants none.
    workers: threads rendering and writing fields in parallel.
    url_prefix_override: write this root into the CSVs instead of source_root (stale prefix); objects still go to
        source_root.
    treatments: distinct treatments on the plate map (T00 = control), assigned to wells in a fixed layout.
    """
    t0 = time.perf_counter()
    if csv_form not in ("url", "filename"):
        raise ValueError(f"synth: csv_form must be 'url' or 'filename', got {csv_form!r}")
    if not isinstance(size, (int, np.integer)) or not 16 <= size <= 8192:
        raise ValueError(f"synth: size must be an integer in [16, 8192], got {size!r}")
    if workers < 1:
        raise ValueError(f"synth: workers must be >= 1, got {workers}")
    source_root = str(source_root)
    source_root = source_root.removeprefix("file://")
    if not storage.is_s3(source_root):
        source_root = os.path.abspath(source_root)
    source_root = source_root.rstrip("/") or "/"
    faults = faults or SynthFaults()

    plan = plan_bucket(
        batches=batches,
        plates_per_batch=plates_per_batch,
        wells_per_plate=wells_per_plate,
        sites_per_well=sites_per_well,
        treatments=treatments,
        seed=seed,
    )
    all_fields = plan.fields()
    images_root = layout.images_root(source_root)
    image_faults = _plan_image_faults(all_fields, faults)
    report = SynthReport(source_root=source_root, csv_form=csv_form, size=int(size), seed=seed)
    report.plates = [p.triple for p in plan.plates]

    def render_and_write(job: tuple[int, SynthField]) -> tuple[int, int, list[PlantedFault]]:
        i, f = job
        p = f.plate
        rng = _rng(seed, _TAG_FIELD, p.batch_index, p.plate_index, f.row, f.col, f.site)
        vig = {ch: _vignette_array(size, p.vignette_params(ch)) for ch in ALL_CHANNELS}
        brightness = float(np.exp(rng.normal(0.0, 0.08)))
        images, _ = render_field(f.phenotype, size, rng, vig, brightness=brightness)
        n_img = n_bytes = 0
        planted = []
        for ch in ALL_CHANNELS:
            uri = layout.image_uri(images_root, p.batch, p.plate_dir, f.filename(ch))
            data = encode_tiff(images[ch])
            kind = image_faults.get((i, ch))
            if kind is not None:
                planted.append(PlantedFault(kind, uri, p.batch, p.barcode, f.well, f.site, ch))
                if kind == "missing_channel":
                    continue
                frng = _rng(faults.seed, _TAG_FAULTS, i, ALL_CHANNELS.index(ch))
                if kind == "corrupt_tiff":
                    data = _corrupt_bytes(frng, len(data))
                else:  # truncated: keep 10-90% of the bytes
                    data = data[: int(len(data) * frng.uniform(0.1, 0.9))]
            storage.write_bytes(uri, data)
            n_img += 1
            n_bytes += len(data)
        return n_img, n_bytes, planted

    results = storage.map_parallel(render_and_write, list(enumerate(all_fields)), max_workers=workers)
    for n_img, n_bytes, planted in results:
        report.n_images += n_img
        report.image_bytes += n_bytes
        report.faults.extend(planted)
    report.n_bytes = report.image_bytes

    # Per plate: illum functions, load_data CSVs; per batch: plate maps. Small objects, written in parallel.
    small: list[tuple[str, bytes]] = []
    addr = _Addresser(source_root, csv_form, url_prefix_override)
    by_plate: dict[tuple[str, str], list[SynthField]] = {}
    for f in all_fields:
        by_plate.setdefault((f.plate.batch, f.plate.barcode), []).append(f)
    for plate in plan.plates:
        pf = by_plate[(plate.batch, plate.barcode)]
        if with_illum:
            for ch in ALL_CHANNELS:
                uri = layout.illum_uri(images_root, plate.batch, plate.barcode, ch)
                small.append((uri, _encode_npy(_illum_function(size, plate.vignette_params(ch)))))
                report.illum_uris.append(uri)
        variants = [False, True] if with_illum else [False]
        for illum in variants:
            uri = layout.load_data_uri(source_root, plate.batch, plate.barcode, with_illum=illum)
            rows = [_csv_row(f, size, csv_form, illum, addr) for f in pf]
            small.append((uri, _csv_text(rows, load_data_columns(csv_form, illum)).encode()))
            (report.load_data_with_illum_uris if illum else report.load_data_uris).append(uri)
    for batch in batch_names(batches):
        pm_root = storage.join(source_root, "workspace", "metadata", "platemaps", batch)
        barcodes = [p.barcode for p in plan.plates if p.batch == batch]
        text = "Assay_Plate_Barcode,Plate_Map_Name\n" + "".join(f"{b},{PLATEMAP_NAME}\n" for b in barcodes)
        small.append((storage.join(pm_root, "barcode_platemap.csv"), text.encode()))
        lines = ["plate_map_name\twell_position\tbroad_sample\tpert_type"]
        for r, c in plan.wells:
            t = plan.treatment_of_well[layout.well_name(r, c)]
            lines.append(f"{PLATEMAP_NAME}\t{layout.well_name(r, c)}\tSYNTH-T{t:02d}\t{'control' if t == 0 else 'trt'}")
        small.append((storage.join(pm_root, "platemap", f"{PLATEMAP_NAME}.txt"), ("\n".join(lines) + "\n").encode()))
        report.platemap_uris += [small[-2][0], small[-1][0]]

    if faults.stray_files:
        candidates = []  # (plate, uri, bytes)
        for plate in plan.plates:
            first = by_plate[(plate.batch, plate.barcode)][0]
            candidates += [(plate, uri, data) for uri, data in _stray_candidates(plate, first, images_root)]
        if faults.stray_files > len(candidates):
            raise ValueError(
                f"synth: {faults.stray_files} stray files requested but only {len(candidates)} places exist "
                f"({len(plan.plates)} plates x 4)"
            )
        picks = sorted(_rng(faults.seed, _TAG_STRAY).choice(len(candidates), size=faults.stray_files, replace=False))
        for k in picks:
            plate, uri, data = candidates[int(k)]
            small.append((uri, data))
            report.faults.append(PlantedFault("stray_file", uri, plate.batch, plate.barcode))

    storage.map_parallel(lambda item: storage.write_bytes(*item), small, max_workers=workers)
    report.n_bytes += sum(len(d) for _, d in small)
    report.n_batches = batches
    report.n_plates = len(plan.plates)
    report.n_wells = len(plan.plates) * len(plan.wells)
    report.n_fields = len(all_fields)
    report.seconds = time.perf_counter() - t0
    return report
