"""Integer keys of the candidate fields, and the manifest columns built from them.

Sorting, grouping, de-duplicating and counting millions of rows works on integer codes of (batch, plate), well and
site (`FieldKeys`); the few distinct strings are hashed once. `field_ids` and `dictionary_column` turn those codes back
into manifest columns without touching a string per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dinocell.jump.candidates import as_array, concat_strings


def sorted_codes(values: pa.Array) -> tuple[np.ndarray, list]:
    """Per row, the rank of its value among the sorted distinct values (int64), and those values.

    Integer codes make sorting, grouping and counting millions of rows cheap: the strings are few (batches, plates,
    wells) and are hashed once by dictionary_encode.
    """
    enc = pc.dictionary_encode(as_array(values))
    distinct = enc.dictionary.to_pylist()
    order = sorted(range(len(distinct)), key=distinct.__getitem__)
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[order] = np.arange(len(distinct))
    return rank[enc.indices.to_numpy(zero_copy_only=False)], [distinct[i] for i in order]


@dataclass
class FieldKeys:
    """Integer keys of the candidate rows: (batch, plate) group, well and site, all in sorted-string order."""

    group: np.ndarray  # index into `plates`, ordered by (batch, plate)
    plates: list[tuple[str, str]]  # (batch, plate) per group
    well: np.ndarray  # index into `wells`
    wells: list[str]
    site: np.ndarray

    @classmethod
    def of(cls, table: pa.Table) -> FieldKeys:
        b, batches = sorted_codes(table.column("batch"))
        p, plates = sorted_codes(table.column("plate"))
        n_plates = max(len(plates), 1)
        pair, inverse = np.unique(b * n_plates + p, return_inverse=True)  # sorted by (batch, plate)
        pairs = [(batches[int(k) // n_plates], plates[int(k) % n_plates]) for k in pair]
        w, wells = sorted_codes(table.column("well"))
        site = as_array(table.column("site")).to_numpy(zero_copy_only=False).astype(np.int64)
        return cls(inverse.reshape(-1).astype(np.int64), pairs, w, wells, site)

    def sort_key(self) -> np.ndarray:
        sites = int(self.site.max()) + 1 if len(self.site) else 1
        return (self.group * len(self.wells) + self.well) * sites + self.site


def dictionary_column(codes: np.ndarray, values: Sequence[str]) -> pa.DictionaryArray:
    """A dictionary<string> column from integer codes, without hashing any string."""
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(list(values), pa.string()))


def field_ids(keys: FieldKeys, rows: np.ndarray) -> pa.Array:
    """`batch/plate/well/site` per row, from the integer keys (two small dictionaries and one concatenation)."""
    prefixes = pa.array([f"{b}/{p}/" for b, p in keys.plates], pa.string())
    sites = int(keys.site.max()) + 1 if len(keys.site) else 1
    ws, inverse = np.unique(keys.well[rows] * sites + keys.site[rows], return_inverse=True)
    suffixes = pa.array([f"{keys.wells[int(k) // sites]}/{int(k) % sites}" for k in ws], pa.string())
    return concat_strings(prefixes.take(pa.array(keys.group[rows])), suffixes.take(pa.array(inverse.reshape(-1))))
