"""Which load_data CSVs to read: searching prefixes for them, one file per folder, and the batch / barcode a CSV's
location (`load_data_csv/<BATCH>/<BARCODE>/`) names.

`load_data_with_illum.csv` shadows `load_data.csv` in the same folder (same rows plus the illumination columns); the
shadowed files are returned as skipped, for the summary.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

from dinocell import storage
from dinocell.jump.exclusions import DiscoveryError

# File names of load_data CSVs, best first: in one folder only the first one present is read.
LOAD_DATA_NAMES = ("load_data_with_illum.csv", "load_data_with_illum.csv.gz", "load_data.csv", "load_data.csv.gz")


_CSV_LOCATION = re.compile(r"load_data_csv/(?P<batch>[^/]+)/(?P<barcode>[^/]+)/[^/]+$")


def find_load_data_csvs(
    locations: Sequence[str], required: bool = True, workers: int | None = None
) -> tuple[list[str], list[dict]]:
    """CSV URIs from a list of CSV URIs and/or prefixes to search (recursively) for load_data CSVs.

    Returns (csvs sorted by URI, skipped) where skipped lists CSVs shadowed by a `load_data_with_illum.csv` in the same
    folder. With `required`, a location that yields no CSV is an error naming it.
    """
    files: list[str] = []
    prefixes: list[str] = []
    for loc in locations:
        loc = str(loc)
        (files if loc.lower().endswith((".csv", ".csv.gz")) else prefixes).append(loc)

    def search(prefix: str) -> list[str]:
        return [o.uri for o in storage.list_objects(prefix) if posixpath.basename(o.uri) in LOAD_DATA_NAMES]

    found = storage.map_parallel(search, prefixes, max_workers=workers) if prefixes else []
    for prefix, uris in zip(prefixes, found):
        if not uris and required:
            raise DiscoveryError(f"no load_data CSV ({', '.join(LOAD_DATA_NAMES)}) found under {prefix}")
        files.extend(uris)

    by_dir: dict[str, list[str]] = {}
    for uri in sorted(set(files)):
        by_dir.setdefault(posixpath.dirname(uri), []).append(uri)
    chosen: list[str] = []
    skipped: list[dict] = []
    for uris in by_dir.values():
        known = [u for u in uris if posixpath.basename(u) in LOAD_DATA_NAMES]
        others = [u for u in uris if u not in known]  # explicitly named CSVs with other names are all read
        chosen.extend(others)
        if known:
            best = min(known, key=lambda u: LOAD_DATA_NAMES.index(posixpath.basename(u)))
            chosen.append(best)
            for u in known:
                if u != best:
                    skipped.append({"uri": u, "reason": f"{posixpath.basename(best)} in the same folder is read"})
    return sorted(chosen), skipped


def csv_location(uri: str) -> tuple[str | None, str | None]:
    """`.../load_data_csv/<BATCH>/<BARCODE>/load_data.csv` -> (BATCH, BARCODE); (None, None) elsewhere."""
    m = _CSV_LOCATION.search(uri.replace("\\", "/"))
    return (m.group("batch"), m.group("barcode")) if m else (None, None)
