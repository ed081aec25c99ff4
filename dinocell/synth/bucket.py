"""`dinocell synth`: write a synthetic bucket laid out exactly like cpg0000-jump-pilot/source_4 (REFERENCE.md section 1).

    <source_root>/images/<BATCH>/images/<BARCODE>__<TIMESTAMP>-Measurement1/Images/rRRcCCfFFp01-chNsk1fk1fl1.tiff
    <source_root>/images/<BATCH>/illum/<BARCODE>/<BARCODE>_Illum<Ch>.npy                (with_illum)
    <source_root>/workspace/load_data_csv/<BATCH>/<BARCODE>/load_data.csv
    <source_root>/workspace/load_data_csv/<BATCH>/<BARCODE>/load_data_with_illum.csv     (with_illum)
    <source_root>/workspace/metadata/platemaps/<BATCH>/barcode_platemap.csv + platemap/<NAME>.txt
    <source_root>/workspace/metadata/external_metadata/<NAME>_metadata.tsv

`synth_bucket` runs it; the parts:
- dinocell.synth.plan: names, plate phenotypes, vignetting, wells and the plate map, all from the seed (`SynthPlan`),
  with dinocell.synth.perturbations (layout, targets, effects) and dinocell.synth.nuisance (batch, plate and
  well-position effects);
- dinocell.synth.images: rendering and writing each field's 8 TIFFs, the illumination functions;
- dinocell.synth.csvs: the load_data CSVs (url or filename form, stale-prefix override);
- dinocell.synth.platemaps: the plate maps and the perturbation metadata (JUMP-Target-1 layout);
- dinocell.synth.faults: the faults (`SynthFaults`), planted deterministically and listed exactly in
  `SynthReport.faults`.
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from dinocell import storage
from dinocell.channels import ALL_CHANNELS
from dinocell.jump import layout
from dinocell.synth.csvs import Addresser, load_data_columns, load_data_csv
from dinocell.synth.faults import FAULT_KINDS, PlantedFault, SynthFaults, plan_image_faults, plant_stray_files
from dinocell.synth.images import encode_npy, encode_tiff, illum_function, write_field
from dinocell.synth.plan import (
    REAL_SOURCE4_BATCHES,
    SynthField,
    SynthPlan,
    SynthPlate,
    batch_names,
    plan_bucket,
)
from dinocell.synth.platemaps import PLATEMAP_NAME, external_metadata_object, platemap_objects

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


@dataclass
class SynthReport:
    source_root: str
    csv_form: str
    size: int
    seed: int
    site_variation: float = 0.0  # see synth_bucket
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
    external_metadata_uris: list[str] = field(default_factory=list)
    platemap_name: str = PLATEMAP_NAME
    # The plate map's truth per (plate, well) written: batch, plate, well, perturbation, broad_sample, target,
    # control_type ("negcon" / "poscon" / ""), pert_type ("control" / "trt"); see SynthPlan.well_truth.
    wells: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def faults_of(self, kind: str) -> list[PlantedFault]:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        return [f for f in self.faults if f.kind == kind]

    def truth(self) -> dict[tuple[str, str], dict]:
        """(plate, well) -> that well's entry of `wells`."""
        return {(w["plate"], w["well"]): w for w in self.wells}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plates"] = [list(p) for p in self.plates]
        return d

    def summary(self) -> str:
        counts = {k: len(self.faults_of(k)) for k in FAULT_KINDS}
        faults = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "none"
        rate = self.n_fields / self.seconds if self.seconds > 0 else float("nan")
        first = [w for w in self.wells if w["plate"] == self.wells[0]["plate"]] if self.wells else []
        kinds = Counter(w["control_type"] for w in first)
        treated = {w["perturbation"] for w in first if not w["control_type"]}
        targets = {w["target"] for w in first if w["target"] and not w["control_type"]}
        layout_text = (
            f"plate map {kinds['negcon']} DMSO + {kinds['poscon']} poscon + {kinds['']} treated wells "
            f"({len(treated)} perturbations, {len(targets)} targets) per plate"
        )
        return (
            f"synth: {self.n_batches} batches, {self.n_plates} plates, {self.n_wells} wells, {self.n_fields} fields, "
            f"{self.n_images} images ({self.size}x{self.size}, {self.image_bytes / 1e6:.1f} MB), "
            f"{self.n_bytes / 1e6:.1f} MB in all, csv form {self.csv_form!r}, {layout_text}, "
            f"{f'site variation {self.site_variation:g}, ' if self.site_variation else ''}faults: {faults}; "
            f"{self.seconds:.1f} s ({rate:.1f} fields/s) -> {self.source_root}"
        )


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
    perturbations: int | None = None,
    replicates: int = 2,
    negcon_wells: int | None = None,
    poscon: int = 0,
    targets: int | None = None,
    site_variation: float = 0.0,
) -> SynthReport:
    """Write a synthetic JUMP-layout bucket under `source_root` and report what was written.

    source_root: local directory (or file:// path) or s3:// prefix standing for `<bucket>/cpg0000-jump-pilot/source_4`.
    batches: number of batches (named like the real source_4 batches).
    plates_per_batch: plates in each batch (barcodes BR0011xxxx, one acquisition timestamp each).
    wells_per_plate: wells per plate (same positions on every plate, spread over a 384-well plate). It must hold the
        layout: negcon_wells + (perturbations + poscon) x replicates; left-over wells become more DMSO wells. A
        layout for profiling: 24 wells -> by default 4 DMSO wells + 10 perturbations x 2 replicates on 5 targets.
    sites_per_well: fields per well (f01..).
    size: image width = height in pixels (1080 like CPJUMP1; smaller sizes show a binned field, see synth_cells).
    seed: everything (names, phenotypes, pixels) follows from it: same seed, same bytes.
    csv_form: "url" (URL_Orig<Ch> columns) or "filename" (FileName_Orig<Ch> + PathName_Orig<Ch>).
    with_illum: also write the illumination functions (.npy) and load_data_with_illum.csv.
    faults: faults to plant (missing / corrupt / truncated images, stray files); None plants none.
    workers: threads rendering and writing fields in parallel.
    url_prefix_override: write this root into the CSVs instead of source_root (stale prefix); objects still go to
        source_root.
    perturbations: treatments on the plate map (SYNTH-P01..., broad_sample BRD-SYNTH-P01...), each on `replicates`
        wells of every plate with a small effect along its target's direction; None: as many as fit (may be 0 on
        tiny plates, which are then all DMSO).
    replicates: wells per perturbation (and per positive control) on each plate, at different positions (>= 2).
    negcon_wells: DMSO wells per plate (negative controls, >= 1); None: about 1 in 6 wells.
    poscon: positive controls (SYNTH-POS1..., control_type "poscon") with strong effects, `replicates` wells each.
    targets: targets shared by the perturbations (round robin: 2-3 perturbations per target by default); None:
        perturbations // 2 (at least 1 when there are perturbations).
    site_variation: how much each site's population context (confluence, cell size and state) differs from the other
        sites of its well, as a multiple of dinocell.synth.nuisance.SITE_SIGMAS; 0 = the sites of a well differ only in
        where their cells lie (the default: what site context costs profiling is measured in the README).
    The layout, the targets and the effects come from their own seed stream: see dinocell.synth.perturbations;
    batch, plate and well-position nuisance effects: dinocell.synth.nuisance. `SynthReport.wells` holds the truth.
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
        perturbations=perturbations,
        replicates=replicates,
        negcon_wells=negcon_wells,
        poscon=poscon,
        targets=targets,
        seed=seed,
        site_variation=site_variation,
    )
    all_fields = plan.fields()
    images_root = layout.images_root(source_root)
    image_faults = plan_image_faults(all_fields, faults)
    report = SynthReport(source_root=source_root, csv_form=csv_form, size=int(size), seed=seed,
                         site_variation=plan.site_variation)
    report.plates = [p.triple for p in plan.plates]
    report.wells = plan.well_truth()

    write = functools.partial(
        write_field, seed=seed, size=size, images_root=images_root, image_faults=image_faults, fault_seed=faults.seed
    )
    results = storage.map_parallel(lambda job: write(*job), list(enumerate(all_fields)), max_workers=workers)
    for n_img, n_bytes, planted in results:
        report.n_images += n_img
        report.image_bytes += n_bytes
        report.faults.extend(planted)
    report.n_bytes = report.image_bytes

    # Per plate: illum functions, load_data CSVs; per batch: plate maps; once: the perturbation metadata. Small objects,
    # written in parallel.
    small: list[tuple[str, bytes]] = []
    addr = Addresser(source_root, csv_form, url_prefix_override)
    by_plate: dict[tuple[str, str], list[SynthField]] = {}
    for f in all_fields:
        by_plate.setdefault((f.plate.batch, f.plate.barcode), []).append(f)
    for plate in plan.plates:
        pf = by_plate[(plate.batch, plate.barcode)]
        if with_illum:
            for ch in ALL_CHANNELS:
                uri = layout.illum_uri(images_root, plate.batch, plate.barcode, ch)
                small.append((uri, encode_npy(illum_function(size, plate.vignette_params(ch)))))
                report.illum_uris.append(uri)
        variants = [False, True] if with_illum else [False]
        for illum in variants:
            uri = layout.load_data_uri(source_root, plate.batch, plate.barcode, with_illum=illum)
            small.append((uri, load_data_csv(pf, size, csv_form, illum, addr)))
            (report.load_data_with_illum_uris if illum else report.load_data_uris).append(uri)
    for batch in batch_names(batches):
        maps = platemap_objects(plan, batch, source_root)
        small += maps
        report.platemap_uris += [uri for uri, _ in maps]
    meta_uri, meta = external_metadata_object(plan, source_root)
    small.append((meta_uri, meta))
    report.external_metadata_uris.append(meta_uri)
    for uri, data, planted in plant_stray_files(plan, by_plate, images_root, faults):
        small.append((uri, data))
        report.faults.append(planted)

    # No fsync per local file (a rerun rewrites them all; one fsync per object made runs I/O-bound).
    storage.map_parallel(lambda item: storage.write_bytes(*item, fsync=False), small, max_workers=workers)
    report.n_bytes += sum(len(d) for _, d in small)
    report.n_batches = batches
    report.n_plates = len(plan.plates)
    report.n_wells = len(plan.plates) * len(plan.wells)
    report.n_fields = len(all_fields)
    report.seconds = time.perf_counter() - t0
    return report
