"""Faults planted in a synthetic bucket (`SynthFaults`), chosen deterministically with their own seed and reported
exactly (`PlantedFault`, listed in SynthReport.faults).

Image faults take distinct (field, channel) slots: a missing image (listed in load_data.csv but not written: a stale
index), a corrupt one (random bytes, never a TIFF magic) or a truncated one (a valid TIFF cut to 10-90% of its length:
an interrupted upload). Stray files are the non-image objects real exports leave in plate folders (Images/Index.idx.xml,
.DS_Store files, a *_thumb.png), at up to four places per plate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from dinocell import storage
from dinocell.channels import ALL_CHANNELS
from dinocell.synth.plan import TAG_FAULTS, TAG_STRAY, SynthField, SynthPlan, SynthPlate, seeded_rng

__all__ = [
    "FAULT_KINDS",
    "PlantedFault",
    "SynthFaults",
    "damage_image",
    "plan_image_faults",
    "plant_stray_files",
]

FAULT_KINDS = ("missing_channel", "corrupt_tiff", "truncated_tiff", "stray_file")


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


def plan_image_faults(fields_: Sequence[SynthField], faults: SynthFaults) -> dict[tuple[int, str], str]:
    """(field index, channel) -> fault kind, for distinct slots chosen with the faults' seed."""
    kinds = ["missing_channel"] * faults.missing_channel + ["corrupt_tiff"] * faults.corrupt_tiff
    kinds += ["truncated_tiff"] * faults.truncated_tiff
    slots = len(fields_) * len(ALL_CHANNELS)
    if len(kinds) > slots:
        raise ValueError(f"synth: {len(kinds)} image faults requested but the run writes only {slots} images")
    rng = seeded_rng(faults.seed, TAG_FAULTS)
    picks = rng.choice(slots, size=len(kinds), replace=False) if kinds else []
    return {(int(s) // len(ALL_CHANNELS), ALL_CHANNELS[int(s) % len(ALL_CHANNELS)]): k for s, k in zip(picks, kinds)}


def _corrupt_bytes(rng: np.random.Generator, n: int) -> bytes:
    data = bytearray(rng.bytes(max(n, 16)))
    data[:4] = b"\x89GRB"  # never a TIFF magic (II*\0 / MM\0*), so readers fail at once
    return bytes(data)


def damage_image(kind: str, data: bytes, fault_seed: int, field_index: int, channel: str) -> bytes | None:
    """The bytes written for an image with a planted fault; None for a missing image (nothing is written)."""
    if kind == "missing_channel":
        return None
    frng = seeded_rng(fault_seed, TAG_FAULTS, field_index, ALL_CHANNELS.index(channel))
    if kind == "corrupt_tiff":
        return _corrupt_bytes(frng, len(data))
    return data[: int(len(data) * frng.uniform(0.1, 0.9))]  # truncated: keep 10-90% of the bytes


def plant_stray_files(
    plan: SynthPlan, by_plate: dict[tuple[str, str], list[SynthField]], images_root: str, faults: SynthFaults
) -> list[tuple[str, bytes, PlantedFault]]:
    """`faults.stray_files` stray objects at distinct places chosen with the faults' seed: (uri, bytes, fault)."""
    if not faults.stray_files:
        return []
    candidates = []  # (plate, uri, bytes)
    for plate in plan.plates:
        first = by_plate[(plate.batch, plate.barcode)][0]
        candidates += [(plate, uri, data) for uri, data in _stray_candidates(plate, first, images_root)]
    if faults.stray_files > len(candidates):
        raise ValueError(
            f"synth: {faults.stray_files} stray files requested but only {len(candidates)} places exist "
            f"({len(plan.plates)} plates x 4)"
        )
    picks = sorted(seeded_rng(faults.seed, TAG_STRAY).choice(len(candidates), size=faults.stray_files, replace=False))
    out = []
    for k in picks:
        plate, uri, data = candidates[int(k)]
        out.append((uri, data, PlantedFault("stray_file", uri, plate.batch, plate.barcode)))
    return out
