"""The field manifest: one row per field (site) with the URI of every channel, written as zstd Parquet.

Columns: field_id, batch, plate, well, site (int32), split ("train" | "val"), then `uri_<Channel>` for every channel and
`illum_<Channel>` (the plate's illumination function, "" when none), then the plate-map metadata of the field's well:
`perturbation` (pert_iname, else broad_sample; "DMSO" for DMSO wells), `control_type` ("negcon", "poscon" or "" for
treatments) and `target` ("" when unknown or for controls). The channel list is kept in the schema metadata. Manifests
written before the metadata columns existed still load: the columns are filled with "".
A 3M-field manifest is 27 MB on disk and loads in seconds (bench/bench_discovery.py); in memory the per-field URI
columns dominate (about 0.3 GB per channel column at 3M fields).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dinocell import storage

MANIFEST_VERSION = "1"
_META_CHANNELS = b"dinocell.channels"
_META_VERSION = b"dinocell.manifest_version"
BASE_COLUMNS = ("field_id", "batch", "plate", "well", "site", "split")
METADATA_COLUMNS = ("perturbation", "control_type", "target")  # optional: "" when unknown
CONTROL_TYPES = ("negcon", "poscon", "")


def make_field_id(batch: str, plate: str, well: str, site: int | str) -> str:
    return f"{batch}/{plate}/{well}/{int(site)}"


@dataclass(frozen=True)
class FieldRecord:
    field_id: str
    batch: str
    plate: str
    well: str
    site: int
    split: str
    uris: dict[str, str]  # channel name -> image URI
    illum: dict[str, str] = field(default_factory=dict)  # channel name -> illum .npy URI ("" or absent: none)
    perturbation: str = ""  # plate-map metadata of the well (see the module docstring)
    control_type: str = ""  # "negcon" | "poscon" | ""
    target: str = ""


def assign_splits(plates: Iterable[str], val_plates: Sequence[str] = (), val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Deterministic train/val split by plate: explicit `val_plates`, else a seeded hash order picks the held-out ones.

    With at least two plates and val_fraction > 0, at least one plate is held out and at least one is kept for training.
    """
    plates = sorted(set(plates))
    if val_plates:
        unknown = sorted(set(val_plates) - set(plates))
        if unknown:
            raise ValueError(f"data.val_plates names plates that are not in the manifest: {unknown}")
        held = set(val_plates)
    else:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        order = sorted(plates, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
        n_val = round(val_fraction * len(plates))
        if val_fraction > 0 and len(plates) >= 2:
            n_val = min(max(n_val, 1), len(plates) - 1)
        held = set(order[:n_val])
    return {p: ("val" if p in held else "train") for p in plates}


class Manifest:
    """A thin wrapper over an Arrow table with the manifest schema."""

    def __init__(self, table: pa.Table, channels: Sequence[str]):
        self.channels = list(channels)
        missing = [c for c in BASE_COLUMNS if c not in table.column_names]
        missing += [f"uri_{c}" for c in self.channels if f"uri_{c}" not in table.column_names]
        if missing:
            raise ValueError(f"manifest is missing columns: {missing}")
        for name in METADATA_COLUMNS:  # older manifests have none: "" everywhere
            if name not in table.column_names:
                empty = pa.DictionaryArray.from_arrays(pa.array(np.zeros(table.num_rows, np.int32)), pa.array([""]))
                table = table.append_column(name, empty)
        self.table = table

    # ------------------------------------------------------------------ build
    @classmethod
    def from_records(cls, records: Sequence[FieldRecord], channels: Sequence[str]) -> "Manifest":
        cols: dict[str, list] = {c: [] for c in BASE_COLUMNS}
        for c in channels:
            cols[f"uri_{c}"] = []
            cols[f"illum_{c}"] = []
        for c in METADATA_COLUMNS:
            cols[c] = []
        for r in records:
            cols["field_id"].append(r.field_id)
            cols["batch"].append(r.batch)
            cols["plate"].append(r.plate)
            cols["well"].append(r.well)
            cols["site"].append(int(r.site))
            cols["split"].append(r.split)
            for c in channels:
                cols[f"uri_{c}"].append(r.uris[c])
                cols[f"illum_{c}"].append(r.illum.get(c, ""))
            for c in METADATA_COLUMNS:
                cols[c].append(getattr(r, c))
        return cls.from_columns(cols, channels)

    @classmethod
    def from_columns(cls, cols: dict[str, list], channels: Sequence[str]) -> "Manifest":
        """Build from column lists (the fast path for millions of rows: no per-row objects)."""
        arrays = {}
        for name, values in cols.items():
            if name == "site":
                arrays[name] = pa.array(values, type=pa.int32())
            elif name in ("batch", "plate", "split", *METADATA_COLUMNS) or name.startswith("illum_"):
                # Few distinct values (illum URIs repeat per plate): dictionary-encoded in memory and on disk.
                arrays[name] = pa.array(values, type=pa.string()).dictionary_encode()
            else:
                arrays[name] = pa.array(values, type=pa.string())
        table = pa.table(arrays)
        return cls(table, channels)

    # ------------------------------------------------------------------ io
    def to_bytes(self) -> bytes:
        meta = dict(self.table.schema.metadata or {})
        meta[_META_CHANNELS] = json.dumps(self.channels).encode()
        meta[_META_VERSION] = MANIFEST_VERSION.encode()
        buf = io.BytesIO()
        pq.write_table(self.table.replace_schema_metadata(meta), buf, compression="zstd", row_group_size=256_000)
        return buf.getvalue()

    def write(self, uri: str) -> None:
        storage.write_bytes(uri, self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "Manifest":
        try:
            # use_threads=False: pyarrow's reader thread pool aborts the interpreter at exit on some hosts
            # ("terminate called without an active exception", seen with pyarrow 25 and 26); decoding stays fast.
            table = pq.read_table(io.BytesIO(data), use_threads=False)
        except Exception as e:
            raise ValueError(f"{source} is not a readable Parquet manifest: {e}") from e
        meta = table.schema.metadata or {}
        if _META_CHANNELS not in meta:
            raise ValueError(f"{source} is not a dinocell field manifest (no channel list in its metadata)")
        version = meta.get(_META_VERSION, b"?").decode()
        if version != MANIFEST_VERSION:
            raise ValueError(f"{source}: manifest version {version} is not supported (expected {MANIFEST_VERSION})")
        return cls(table, json.loads(meta[_META_CHANNELS]))

    @classmethod
    def read(cls, uri: str) -> "Manifest":
        return cls.from_bytes(storage.read_bytes(uri), source=uri)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist()

    def record(self, i: int) -> FieldRecord:
        row = self.table.slice(i, 1).to_pylist()[0]
        return self._to_record(row)

    def records(self) -> Iterator[FieldRecord]:
        for batch in self.table.to_batches(max_chunksize=65_536):
            for row in batch.to_pylist():
                yield self._to_record(row)

    def _to_record(self, row: dict) -> FieldRecord:
        return FieldRecord(
            field_id=row["field_id"],
            batch=row["batch"],
            plate=row["plate"],
            well=row["well"],
            site=int(row["site"]),
            split=row["split"],
            uris={c: row[f"uri_{c}"] for c in self.channels},
            illum={c: row.get(f"illum_{c}") or "" for c in self.channels if row.get(f"illum_{c}")},
            perturbation=row["perturbation"] or "",
            control_type=row["control_type"] or "",
            target=row["target"] or "",
        )

    def take(self, indices: Sequence[int]) -> "Manifest":
        return Manifest(self.table.take(pa.array(indices, type=pa.int64())), self.channels)

    def split(self, name: str) -> "Manifest":
        """Rows of one split ("train" or "val"); "all" returns everything."""
        if name == "all":
            return self
        if name not in ("train", "val"):
            raise ValueError(f"unknown split {name!r} (expected train, val or all)")
        mask = pa.compute.equal(self.table.column("split").cast(pa.string()), name)
        return Manifest(self.table.filter(mask), self.channels)

    def select_channels(self, channels: Sequence[str]) -> "Manifest":
        missing = [c for c in channels if c not in self.channels]
        if missing:
            raise ValueError(f"channels {missing} are not in the manifest (it has {self.channels})")
        keep = list(BASE_COLUMNS) + [f"uri_{c}" for c in channels]
        keep += [f"illum_{c}" for c in channels if f"illum_{c}" in self.table.column_names]
        keep += list(METADATA_COLUMNS)
        return Manifest(self.table.select(keep), channels)

    def plates(self) -> list[str]:
        return sorted(set(self.column("plate")))


import pyarrow.compute  # noqa: E402  (registers pa.compute)
