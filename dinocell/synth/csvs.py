"""The load_data CSVs of a synthetic bucket: load_data.csv (+ load_data_with_illum.csv) per plate (the plate maps:
dinocell.synth.platemaps).

What the load_data columns hold:
- csv_form="url" (current form): `URL_Orig<Ch>` full URLs; `s3://...` for an S3 root, `file://` + absolute path for a
  local root (storage.local_path accepts it). The illum variant adds `URL_Illum<Ch>`.
- csv_form="filename" (older form): `FileName_Orig<Ch>` + `PathName_Orig<Ch>` (directory, trailing '/'): an `s3://`
  prefix for an S3 root, a plain absolute directory for a local one. The illum variant adds FileName/PathName_Illum<Ch>.
- `url_prefix_override` replaces the source root in every URL/PathName (stale-prefix simulation), e.g.
  `s3://old-bucket/projects/cpg0000-jump-pilot/source_4`; the objects are still written under `source_root`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from dinocell import storage
from dinocell.channels import ALL_CHANNELS
from dinocell.jump import layout
from dinocell.synth.cells import zoom_for_size
from dinocell.synth.plan import SynthField

__all__ = [
    "CHANNEL_DYES",
    "PIXEL_SIZE_M",
    "Addresser",
    "load_data_columns",
    "load_data_csv",
]

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


def _rel_image_key(batch: str, plate_dir: str, filename: str) -> str:
    return f"images/{batch}/images/{plate_dir}/Images/{filename}"


def _rel_illum_key(batch: str, barcode: str, channel: str) -> str:
    return f"images/{batch}/illum/{barcode}/{barcode}_Illum{channel}.npy"


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


class Addresser:
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


def _csv_row(f: SynthField, size: int, csv_form: str, with_illum: bool, addr: Addresser) -> dict:
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


def load_data_csv(fields: Sequence[SynthField], size: int, csv_form: str, with_illum: bool, addr: Addresser) -> bytes:
    """One plate's load_data.csv (with_illum: load_data_with_illum.csv): a row per field, in the given order."""
    rows = [_csv_row(f, size, csv_form, with_illum, addr) for f in fields]
    return _csv_text(rows, load_data_columns(csv_form, with_illum)).encode()
