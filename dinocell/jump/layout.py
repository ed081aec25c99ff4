"""The JUMP / Cell Painting Gallery key layout, in one place (REFERENCE.md section 1).

    <source_root>/images/<BATCH>/images/<BARCODE>__<TIMESTAMP>-Measurement<N>/Images/rRRcCCfFFpPP-chNsk1fk1fl1.tiff
    <source_root>/images/<BATCH>/illum/<BARCODE>/<BARCODE>_Illum<Ch>.npy
    <source_root>/workspace/load_data_csv/<BATCH>/<BARCODE>/load_data.csv

Channel numbers (chN) differ between sources and acquisitions: map channels by load_data column names, never by chN.
The chN mapping below is only what CPJUMP1 uses and what `dinocell synth` writes; listing-mode discovery takes it as a
configurable default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dinocell import storage

# CPJUMP1 / source_4 channel numbers (Metadata_ChannelName in its load_data CSVs).
CPJUMP1_CHANNEL_NUMBERS: dict[str, int] = {
    "Mito": 1,  # Alexa 647
    "AGP": 2,  # Alexa 568
    "RNA": 3,  # 488 long
    "ER": 4,  # Alexa 488
    "DNA": 5,  # Hoechst 33342
    "HighZBF": 6,
    "LowZBF": 7,
    "Brightfield": 8,
}

_IMAGE_NAME = re.compile(r"^r(\d{2})c(\d{2})f(\d{2})p(\d{2})-ch(\d+)sk\d+fk\d+fl\d+\.tiff?$", re.IGNORECASE)
_PLATE_DIR = re.compile(r"^(?P<barcode>[^_/]+(?:_[^_/]+)*?)__(?P<timestamp>[^/]+)-Measurement(?P<measurement>\d+)$")


@dataclass(frozen=True)
class ImageName:
    row: int  # 1..16 (A..P)
    col: int  # 1..24
    site: int
    plane: int
    channel: int  # chN as written in the file name (NOT a channel identity)

    @property
    def well(self) -> str:
        return well_name(self.row, self.col)


def image_filename(row: int, col: int, site: int, channel_number: int, plane: int = 1) -> str:
    return f"r{row:02d}c{col:02d}f{site:02d}p{plane:02d}-ch{channel_number}sk1fk1fl1.tiff"


def parse_image_filename(name: str) -> ImageName | None:
    """Parse `r01c01f01p01-ch5sk1fk1fl1.tiff`; None when the name is not a Phenix image name."""
    m = _IMAGE_NAME.match(name)
    if not m:
        return None
    row, col, site, plane, ch = (int(g) for g in m.groups())
    return ImageName(row, col, site, plane, ch)


def well_name(row: int, col: int) -> str:
    if not 1 <= row <= 26:
        raise ValueError(f"well row {row} out of range 1..26")
    return f"{chr(ord('A') + row - 1)}{col:02d}"


def well_row_col(well: str) -> tuple[int, int]:
    m = re.fullmatch(r"([A-Za-z])(\d{1,2})", well.strip())
    if not m:
        raise ValueError(f"not a well name: {well!r} (expected e.g. A01)")
    return ord(m.group(1).upper()) - ord("A") + 1, int(m.group(2))


def plate_dir_name(barcode: str, timestamp: str, measurement: int = 1) -> str:
    return f"{barcode}__{timestamp}-Measurement{measurement}"


def parse_plate_dir(name: str) -> tuple[str, str, int] | None:
    """`BR00116991__2020-11-05T19_51_35-Measurement1` -> (barcode, timestamp, measurement)."""
    m = _PLATE_DIR.match(name.strip("/"))
    if not m:
        return None
    return m.group("barcode"), m.group("timestamp"), int(m.group("measurement"))


def images_root(source_root: str) -> str:
    """`s3://bucket/cpg0000-jump-pilot/source_4` -> `.../source_4/images/`."""
    return storage.join(source_root, "images") + "/"


def image_uri(images_prefix: str, batch: str, plate_dir: str, filename: str) -> str:
    return storage.join(images_prefix, batch, "images", plate_dir, "Images", filename)


def illum_uri(images_prefix: str, batch: str, barcode: str, channel: str) -> str:
    return storage.join(images_prefix, batch, "illum", barcode, f"{barcode}_Illum{channel}.npy")


def load_data_uri(source_root: str, batch: str, barcode: str, with_illum: bool = False) -> str:
    name = "load_data_with_illum.csv" if with_illum else "load_data.csv"
    return storage.join(source_root, "workspace", "load_data_csv", batch, barcode, name)


def source_root_of_images_prefix(images_prefix: str) -> str:
    """`.../source_4/images/` -> `.../source_4` (where `workspace/` lives)."""
    p = images_prefix.rstrip("/")
    if not p.endswith("/images") and not p.endswith("images"):
        raise ValueError(f"images prefix should end in '/images/': {images_prefix!r}")
    return p[: -len("images")].rstrip("/")
