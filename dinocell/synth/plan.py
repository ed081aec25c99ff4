"""The plan of a synthetic bucket (`dinocell synth`): batch and plate names, plate phenotypes, vignetting, wells and
the perturbation in each well, all decided up front from the seed with no I/O; rendering then needs only each field's
seed.

Ground truth for evaluation: plates differ in a "plate phenotype" (density, cell size, elongation spread evenly over
their ranges, plus per-plate and per-batch brightness per channel); the plate map (dinocell.synth.perturbations, the
same layout on every plate, as in JUMP) puts DMSO negative controls, optional positive controls and replicated
treatments that share targets in the wells; well-position effects (dinocell.synth.nuisance) come on top. A field's
phenotype = plate phenotype, then its perturbation's effect, then its well's position effects, then its site's own
population context (confluence and cell state, `site_variation`; nuisance.site_effects).

Seeds: every purpose draws from its own stream (`seeded_rng(seed, TAG_..., ...)`, dinocell.synth.seeds), so changing
one part of a run leaves the others alone: the layout and effects (TAG_LAYOUT) do not move the plates (TAG_PLAN).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from dinocell.channels import ALL_CHANNELS, FLUORESCENT_CHANNELS
from dinocell.jump import layout
from dinocell.synth.cells import Phenotype, VignetteParams
from dinocell.synth.nuisance import batch_brightness, site_effects, well_effects
from dinocell.synth.perturbations import Perturbation, PlateLayout, apply_effect, layout_counts, plan_layout
from dinocell.synth.seeds import TAG_FAULTS, TAG_FIELD, TAG_LAYOUT, TAG_NUISANCE, TAG_PLAN, TAG_STRAY, seeded_rng

__all__ = [
    "PLATE_COLS",
    "PLATE_ROWS",
    "REAL_SOURCE4_BATCHES",
    "TAG_FAULTS",
    "TAG_FIELD",
    "TAG_LAYOUT",
    "TAG_NUISANCE",
    "TAG_PLAN",
    "TAG_STRAY",
    "SynthField",
    "SynthPlan",
    "SynthPlate",
    "batch_names",
    "plan_bucket",
    "seeded_rng",
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

PLATE_ROWS, PLATE_COLS = 16, 24  # 384-well plates



# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SynthPlate:
    batch: str
    barcode: str
    plate_dir: str
    timestamp: str
    batch_index: int
    plate_index: int  # within its batch
    phenotype: Phenotype  # the plate's phenotype, plate and batch brightness included (before perturbations)
    vignette: tuple[tuple[str, VignetteParams], ...]  # per channel
    batch_brightness: tuple[tuple[str, float], ...] = ()  # the batch's multiplier per channel (in `phenotype` already)

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
    perturbation: Perturbation
    phenotype: Phenotype  # plate phenotype + perturbation effect + well-position effects + the site's own context

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
    layout: PlateLayout  # the plate map: perturbation per well, the same on every plate
    sites_per_well: int
    seed: int
    site_variation: float = 0.0  # scale of each site's own population context (dinocell.synth.nuisance.site_effects)

    def perturbation(self, well: str) -> Perturbation:
        return self.layout.perturbation(well)

    def fields(self) -> list[SynthField]:
        out = []
        for plate in self.plates:
            for row, col in self.wells:
                pert = self.layout.perturbation(layout.well_name(row, col))
                ph = apply_effect(plate.phenotype, pert.effect)
                key = (plate.batch_index, plate.plate_index)
                ph = well_effects(ph, self.seed, key, row, col, PLATE_ROWS, PLATE_COLS)
                for site in range(1, self.sites_per_well + 1):
                    site_ph = site_effects(ph, self.seed, key, row, col, site, self.site_variation).clamped()
                    out.append(SynthField(plate, row, col, site, pert, site_ph))
        return out

    def well_truth(self) -> list[dict]:
        """What the plate map says about every (plate, well) written: the truth discovery should report."""
        out = []
        for plate in self.plates:
            for row, col in self.wells:
                well = layout.well_name(row, col)
                p = self.layout.perturbation(well)
                out.append({"batch": plate.batch, "plate": plate.barcode, "well": well, "perturbation": p.name,
                            "broad_sample": p.broad_sample, "target": p.target, "control_type": p.control_type,
                            "pert_type": p.pert_type})  # fmt: skip
        return out


# --------------------------------------------------------------------------- planning


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


def _choose_wells(rng: np.random.Generator, n: int) -> tuple[tuple[int, int], ...]:
    idx = np.sort(rng.choice(PLATE_ROWS * PLATE_COLS, size=n, replace=False))
    return tuple((int(i) // PLATE_COLS + 1, int(i) % PLATE_COLS + 1) for i in idx)


def plan_bucket(
    *,
    batches: int = 2,
    plates_per_batch: int = 2,
    wells_per_plate: int = 4,
    sites_per_well: int = 2,
    perturbations: int | None = None,
    replicates: int = 2,
    negcon_wells: int | None = None,
    poscon: int = 0,
    targets: int | None = None,
    seed: int = 0,
    site_variation: float = 0.0,
) -> SynthPlan:
    """Decide names, plate phenotypes, vignetting, well positions and the plate map (no I/O). See `synth_bucket`."""
    for name, v, lo, hi in (
        ("batches", batches, 1, 1000),
        ("plates_per_batch", plates_per_batch, 1, 1000),
        ("wells_per_plate", wells_per_plate, 1, PLATE_ROWS * PLATE_COLS),
        ("sites_per_well", sites_per_well, 1, 99),
    ):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"synth: {name} must be an integer in [{lo}, {hi}], got {v!r}")
    if isinstance(site_variation, bool) or not isinstance(site_variation, (int, float)) or not 0 <= site_variation <= 4:
        raise ValueError(f"synth: site_variation must be a number in [0, 4], got {site_variation!r}")
    n_pert, n_neg, n_pos, n_tgt = layout_counts(wells_per_plate, perturbations, replicates, negcon_wells, poscon, targets)
    rng = seeded_rng(seed, TAG_PLAN)
    n_plates = batches * plates_per_batch
    if n_plates > 9000:
        raise ValueError(f"synth: {n_plates} plates exceed the BR0011xxxx barcode space (9000)")
    barcodes = [f"BR0011{int(x):04d}" for x in rng.choice(np.arange(1000, 10000), size=n_plates, replace=False)]
    density = _spread(rng, n_plates, 25.0, 110.0)
    radius = _spread(rng, n_plates, 32.0, 58.0)
    elong = _spread(rng, n_plates, 1.1, 2.2)
    plates = []
    for b, batch in enumerate(batch_names(batches)):
        batch_light = batch_brightness(seed, b)
        # Vignetting belongs to the microscope: one base per batch, a small change per plate.
        vrng = seeded_rng(seed, TAG_PLAN, 1, b)
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
            prng = seeded_rng(seed, TAG_PLAN, 2, b, p)
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
                # the plate's own brightness per channel times its batch's
                **{
                    f"brightness_{ch.lower()}": float(np.exp(prng.normal(0.0, 0.15))) * batch_light[ch]
                    for ch in FLUORESCENT_CHANNELS
                },
            ).clamped()
            plate_dir = layout.plate_dir_name(barcodes[g], timestamp, 1)
            plates.append(
                SynthPlate(batch, barcodes[g], plate_dir, timestamp, b, p, ph, tuple(vig), tuple(batch_light.items()))
            )
    # The plate map (positions and what is in them) has its own stream: the same whatever the number of plates.
    wells = _choose_wells(seeded_rng(seed, TAG_LAYOUT, 0), wells_per_plate)
    plate_map = plan_layout(
        seeded_rng(seed, TAG_LAYOUT, 1), wells, perturbations=n_pert, replicates=replicates, negcon_wells=n_neg,
        poscon=n_pos, targets=n_tgt,
    )  # fmt: skip
    return SynthPlan(tuple(plates), wells, plate_map, sites_per_well, seed, float(site_variation))
