"""The planted perturbations of a synthetic bucket: which perturbation sits in which well, the targets they share and
the phenotype change each one causes, decided from the seed with no I/O.

Layout (the same on every plate, as one JUMP plate map serves a whole batch): `negcon_wells` DMSO wells, `poscon`
positive controls and `perturbations` treatments, each control and treatment on `replicates` wells of every plate at
different positions (so replicate pairs exist within a plate and, at other positions, across plates), shuffled over
the plate's wells so the controls spread over it. Wells left over after the layout are filled with more DMSO wells.
The default layout is the one `layout_counts` works out: ~1 in 6 wells DMSO (at least one), then as many
2-replicate treatments as fit, two treatments per target; e.g. 24 wells -> 4 DMSO + 10 treatments x 2 (5 targets).

Effects are small and consistent: each treatment moves the phenotype along its target's direction plus a little of its
own (treatments of one target look alike, those of different targets do not), with a strength well below the plate
differences (dinocell.synth.plan) and comparable to the nuisance effects (dinocell.synth.nuisance), so raw pixels do not
solve profiling for free. Positive controls have strong effects of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dinocell.jump import layout
from dinocell.synth.cells import Phenotype

__all__ = [
    "EFFECT_SCALES",
    "NEGCON",
    "Perturbation",
    "PlateLayout",
    "apply_effect",
    "layout_counts",
    "plan_layout",
]

NEGCON = "DMSO"

# Phenotype numbers a perturbation moves, and how far one unit of effect moves each (log scale for the multiplicative
# ones): one unit is about the size of a treatment effect before this layout existed.
EFFECT_SCALES = {
    "density": 0.3,
    "cell_radius": 0.15,
    "elongation": 0.35,
    "nucleus_fraction": 0.12,
    "irregularity": 0.08,
    "er_texture": 0.25,
    "mito_filaments": 0.3,
    "rna_nucleoli": 0.8,
    "agp_fibres": 0.25,
    "brightness_mito": 0.25,
    "brightness_agp": 0.2,
}
MULTIPLICATIVE = {"density", "cell_radius", "nucleus_fraction", "brightness_mito", "brightness_agp"}
# Treatments: effect = strength * (TARGET_SHARE * target direction + OWN_SHARE * own direction), in EFFECT_SCALES units.
TREATMENT_STRENGTH = (0.35, 0.6)
TARGET_SHARE, OWN_SHARE = 0.85, 0.5
POSCON_STRENGTH = 1.2


@dataclass(frozen=True)
class Perturbation:
    name: str  # pert_iname: "DMSO", "SYNTH-P01", "SYNTH-POS1"
    broad_sample: str  # "" for DMSO (as the real plate maps write solvent-only wells)
    target: str  # "" for controls
    control_type: str  # "negcon" | "poscon" | "" (treatment)
    effect: tuple[tuple[str, float], ...] = ()  # (phenotype number, change): factor or addend, see apply_effect

    @property
    def pert_type(self) -> str:
        return "control" if self.control_type else "trt"


@dataclass(frozen=True)
class PlateLayout:
    perturbations: tuple[Perturbation, ...]  # index 0 is DMSO
    of_well: dict  # well name -> index into perturbations

    def perturbation(self, well: str) -> Perturbation:
        return self.perturbations[self.of_well[well]]


def _count(name: str, value, lo: int, hi: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"synth: {name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def layout_counts(
    wells: int, perturbations: int | None, replicates: int, negcon_wells: int | None, poscon: int, targets: int | None
) -> tuple[int, int, int, int]:
    """(perturbations, negcon wells, positive controls, targets) after defaults, checked against `wells`."""
    replicates = _count("replicates", replicates, 2, 384)
    poscon = _count("poscon", poscon, 0, 384)
    negcon = max(1, round(wells / 6)) if negcon_wells is None else _count("negcon_wells", negcon_wells, 1, 384)
    if perturbations is None:
        perturbations = max(0, (wells - negcon - poscon * replicates) // replicates)
    perturbations = _count("perturbations", perturbations, 0, 384)
    need = negcon + (perturbations + poscon) * replicates
    if need > wells:
        raise ValueError(
            f"synth: wells_per_plate={wells} is too small for the layout: {perturbations} perturbations and {poscon} "
            f"positive controls x {replicates} replicates + {negcon} negative-control wells = {need} wells"
        )
    if targets is None:
        targets = perturbations // 2 if perturbations >= 2 else perturbations
    targets = _count("targets", targets, 0, 384)
    if perturbations and not 1 <= targets <= perturbations:
        raise ValueError(f"synth: targets must be in [1, perturbations={perturbations}], got {targets}")
    if not perturbations and targets:
        raise ValueError(f"synth: targets={targets} but the layout has no perturbations")
    return perturbations, negcon + (wells - need), poscon, targets  # left-over wells become DMSO wells


def _effect(z: np.ndarray) -> tuple[tuple[str, float], ...]:
    out = []
    for (k, scale), v in zip(EFFECT_SCALES.items(), z):
        out.append((k, float(np.exp(v * scale)) if k in MULTIPLICATIVE else float(v * scale)))
    return tuple(out)


def plan_layout(
    rng: np.random.Generator,
    wells: Sequence[tuple[int, int]],
    *,
    perturbations: int,
    replicates: int,
    negcon_wells: int,
    poscon: int,
    targets: int,
) -> PlateLayout:
    """Perturbations and their wells (counts as `layout_counts` returns them; rng: the layout's own seed stream)."""
    dim = len(EFFECT_SCALES)
    directions = rng.standard_normal((targets, dim))
    perts = [Perturbation(NEGCON, "", "", "negcon")]
    for k in range(poscon):
        z = POSCON_STRENGTH * rng.standard_normal(dim)
        perts.append(Perturbation(f"SYNTH-POS{k + 1}", f"BRD-SYNTH-POS{k + 1}", "", "poscon", _effect(z)))
    for i in range(perturbations):
        t = i % targets  # round robin: every target gets perturbations, two or three each by default
        strength = rng.uniform(*TREATMENT_STRENGTH)
        z = strength * (TARGET_SHARE * directions[t] + OWN_SHARE * rng.standard_normal(dim))
        perts.append(Perturbation(f"SYNTH-P{i + 1:02d}", f"BRD-SYNTH-P{i + 1:02d}", f"SYNTH-TGT{t + 1}", "", _effect(z)))
    slots = [0] * negcon_wells
    for p in range(1, len(perts)):
        slots += [p] * replicates
    if len(slots) != len(wells):  # layout_counts guarantees it
        raise ValueError(f"synth: layout of {len(slots)} wells for {len(wells)} well positions")
    order = rng.permutation(len(slots))
    of_well = {layout.well_name(r, c): slots[int(k)] for (r, c), k in zip(wells, order)}
    return PlateLayout(tuple(perts), of_well)


def apply_effect(base: Phenotype, effect: Sequence[tuple[str, float]]) -> Phenotype:
    """The phenotype after a perturbation: factors for MULTIPLICATIVE numbers, addends for the others (unclamped)."""
    vals = base.to_dict()
    for k, v in effect:
        vals[k] = vals[k] * v if k in MULTIPLICATIVE else vals[k] + v
    return Phenotype(**vals)
