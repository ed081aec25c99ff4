"""The plan of a synthetic bucket (`dinocell synth`): batch and plate names, plate phenotypes, vignetting, wells and
treatments, all decided up front from the seed with no I/O; rendering then needs only each field's seed.

Ground truth for evaluation: wells carry treatments from a plate map (same layout on every plate of the run, as in
JUMP); treatment T00 is the untreated control. Plates differ in a "plate phenotype" (density, cell size, elongation
spread evenly over their ranges) and treatments move the phenotype further, so fields of different plates and of
different treatments differ measurably.

Seeds: every purpose draws from its own stream (`seeded_rng(seed, TAG_..., ...)`), so changing one part of a run
leaves the others alone.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from dinocell.channels import ALL_CHANNELS, FLUORESCENT_CHANNELS
from dinocell.jump import layout
from dinocell.synth.cells import Phenotype, VignetteParams

__all__ = [
    "PLATE_COLS",
    "PLATE_ROWS",
    "REAL_SOURCE4_BATCHES",
    "TAG_FAULTS",
    "TAG_FIELD",
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

# Seed-stream tags: each purpose draws from its own stream, so changing one part of a run leaves the others alone.
TAG_PLAN, TAG_FIELD, TAG_FAULTS, TAG_STRAY = 101, 202, 303, 404


# --------------------------------------------------------------------------- records


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
        rng = seeded_rng(self.seed, TAG_PLAN, 7, plate.batch_index, plate.plate_index, row, col)
        return float(np.exp(rng.normal(0.0, 0.05)))


# --------------------------------------------------------------------------- planning


def seeded_rng(*key: int) -> np.random.Generator:
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
                **{f"brightness_{ch.lower()}": float(np.exp(prng.normal(0.0, 0.15))) for ch in FLUORESCENT_CHANNELS},
            ).clamped()
            plate_dir = layout.plate_dir_name(barcodes[g], timestamp, 1)
            plates.append(SynthPlate(batch, barcodes[g], plate_dir, timestamp, b, p, ph, tuple(vig)))
    wells = _choose_wells(rng, wells_per_plate)
    order = [k % treatments for k in range(wells_per_plate)]
    rng.shuffle(order)
    treatment_of_well = {layout.well_name(r, c): int(t) for (r, c), t in zip(wells, order)}
    return SynthPlan(tuple(plates), wells, treatment_of_well, _treatment_effects(rng, treatments), sites_per_well, seed)
