"""The candidate-field table that both discovery modes produce (before de-duplication and subset selection).

`Gathered` holds it together with what was left out on the way (exclusions, not-selected counts, the inputs read);
`candidate_schema` is its column layout. Also the two small Arrow helpers used wherever these tables are built.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from dinocell.jump.exclusions import Exclusion


@dataclass
class Gathered:
    """Candidate fields (one Arrow table, before dedupe) plus what was left out on the way."""

    table: pa.Table  # batch, plate, well, site, src, row, uri_<Ch>..., illum_<Ch>...
    sources: list[str]  # src index -> CSV URI or plate folder
    exclusions: list[Exclusion]
    not_selected: Counter
    rows_read: int  # CSV data rows read, or field groups found by listing
    summary_inputs: dict


def candidate_schema(channels: Sequence[str]) -> pa.Schema:
    fields = [
        ("batch", pa.string()),
        ("plate", pa.string()),
        ("well", pa.string()),
        ("site", pa.int32()),
        ("src", pa.int32()),
        ("row", pa.int32()),
    ]
    fields += [(f"uri_{c}", pa.string()) for c in channels]
    fields += [(f"illum_{c}", pa.string()) for c in channels]
    return pa.schema(fields)


def as_array(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def concat_strings(a: pa.Array, b: pa.Array) -> pa.Array:
    """Element-wise a + b (null where either is null)."""
    return pc.binary_join_element_wise(a, b, "")
