"""Which candidate fields are kept: de-duplication (first in input order wins) and the deterministic `max_fields`
subset (round-robin over plates, seeded hash order inside a plate; see the dinocell.jump.discover docstring).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from dinocell.jump.exclusions import DUPLICATE, Exclusion
from dinocell.jump.field_keys import FieldKeys


def dedupe(table: pa.Table, keys: FieldKeys, sources: Sequence[str], mode: str) -> tuple[np.ndarray, list[Exclusion]]:
    """Indices of the rows kept, in (batch, plate, well, site) order, and a 'duplicate' exclusion per later repeat.

    The candidate table is in input order (CSV files by URI, then rows; plate folders by name), so a stable sort keeps
    the first occurrence of every field first.
    """
    n = table.num_rows
    if n == 0:
        return np.zeros(0, dtype=np.int64), []
    key = keys.sort_key()
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    same = np.zeros(n, dtype=bool)
    same[1:] = sorted_key[1:] == sorted_key[:-1]
    exclusions = []
    if same.any():
        group_start = np.maximum.accumulate(np.where(~same, np.arange(n), 0))
        dup_pos = np.flatnonzero(same)
        cols = ["src", "row", "batch", "plate", "well", "site"]
        dups = table.select(cols).take(pa.array(order[dup_pos])).to_pylist()
        firsts = table.select(["src", "row"]).take(pa.array(order[group_start[dup_pos]])).to_pylist()
        for d, f in zip(dups, firsts):
            field_key = f"{d['batch']}/{d['plate']}/{d['well']}/{d['site']}"
            if mode == "load_data":
                first, row = f"{sources[f['src']]}:row {f['row']}", d["row"]
            else:
                first, row = sources[f["src"]], None
            exclusions.append(Exclusion(DUPLICATE, sources[d["src"]], row, f"{field_key} already from {first}"))
    return order[~same], exclusions


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread 64-bit hash of 64-bit integers, vectorised."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def select_max_fields(keys: FieldKeys, rows: np.ndarray, max_fields: int, seed: int) -> np.ndarray:
    """Positions (ascending) into `rows` of `max_fields` fields: round-robin over plates, seeded hash order inside.

    The hash of a field depends only on its own (batch, plate, well, site) and the seed, so adding plates does not
    change which fields of the other plates are picked.
    """
    n = len(rows)
    group = keys.group[rows]
    plate_h = np.array([_stable_hash(f"{seed}:{b}/{p}") for b, p in keys.plates], dtype=np.uint64)
    well_h = np.array([_stable_hash(f"{seed}:{w}") for w in keys.wells], dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(plate_h[group] ^ _mix64(well_h[keys.well[rows]] + keys.site[rows].astype(np.uint64)))
    by_group = np.lexsort((h, group))
    sorted_group = group[by_group]
    starts = np.flatnonzero(np.r_[True, sorted_group[1:] != sorted_group[:-1]])
    first_of = np.zeros(n, dtype=np.int64)
    first_of[starts] = starts
    first_of = np.maximum.accumulate(first_of)
    rank = np.empty(n, dtype=np.int64)
    rank[by_group] = np.arange(n) - first_of
    picked = np.lexsort((group, rank))[:max_fields]
    return np.sort(picked)
