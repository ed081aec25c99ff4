"""A byte-bounded LRU cache with O(1) get/put (an OrderedDict) and honest counters.

Used by raw streaming to keep preprocessed channels (uint8 arrays) in memory per DataLoader worker.

What to expect from it. With a cache holding a fraction c = cache_size / dataset_size of the fields:
- i.i.d. uniform random sampling (with replacement): once warm, the cache always holds c of the dataset and every
  access is a hit with probability c, so the hit rate is about c;
- a fresh random permutation every epoch (what RawFieldStream does): lower still, about c + (1 - c) * ln(1 - c)
  (0.15 for c = 0.5, 0.40 for c = 0.75): a field read late in one epoch and late in the next is usually evicted in
  between. Derivation: a field read when a fraction a of one epoch remains and again after a fraction b of the next
  has about N * (1 - (1 - a)(1 - b)) distinct fields read in between (the two stretches overlap at random); it is
  still cached when that is below c * N, and for independent uniform a, b that has probability c + (1 - c) ln(1 - c)
  (checked against simulation and against the stream in tests/test_raw_stream.py).
Either way the cache pays off only when (each worker's share of) the dataset nearly fits in memory, or for repeated
epochs over a small subset. For training on JUMP (millions of fields, terabytes) that never holds: that is why
pre-built shards, read sequentially, are the default data mode, and raw streaming is for small datasets and debugging.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

__all__ = ["LRUCache", "expected_hit_rate"]


def expected_hit_rate(fraction_cached: float, sampling: str = "permutation") -> float:
    """Steady-state LRU hit rate for a cache holding `fraction_cached` of the items (see the module docstring)."""
    import math

    c = min(max(float(fraction_cached), 0.0), 1.0)
    if sampling == "iid":
        return c
    if sampling == "permutation":
        return 1.0 if c >= 1.0 else c + (1.0 - c) * math.log(1.0 - c)
    raise ValueError(f"sampling must be 'iid' or 'permutation', got {sampling!r}")


def _nbytes(value: Any) -> int:
    n = getattr(value, "nbytes", None)
    if n is None:
        raise TypeError(
            f"LRUCache stores objects with an `nbytes` attribute (numpy arrays), got {type(value).__name__}"
        )
    return int(n)


class LRUCache:
    """Least-recently-used cache bounded by the total `nbytes` of the stored values (never exceeded).

    An item larger than the whole bound is not stored (counted in `rejected`). Thread-safe (one lock; all operations
    are O(1) apart from evicting several small items to make room for a large one).
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"cache max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.rejected = 0
        self.bytes = 0

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value for `key` (marked most recently used), counting a hit; else `default`, counting a miss."""
        with self._lock:
            value = self._data.get(key, _MISSING)
            if value is _MISSING:
                self.misses += 1
                return default
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: Any) -> bool:
        """Store `value` as most recently used, evicting least recently used items to stay within the bound.

        Returns False (and counts `rejected`) when the value alone is larger than the bound.
        """
        size = _nbytes(value)
        with self._lock:
            if key in self._data:  # replacing: forget the old size first
                self.bytes -= self._sizes.pop(key)
                del self._data[key]
            if size > self.max_bytes:
                self.rejected += 1
                return False
            while self.bytes + size > self.max_bytes:
                old_key, _ = self._data.popitem(last=False)
                self.bytes -= self._sizes.pop(old_key)
                self.evictions += 1
            self._data[key] = value
            self._sizes[key] = size
            self.bytes += size
            return True

    def __contains__(self, key: Hashable) -> bool:  # no counter update, no reordering
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> list:
        """Keys from least to most recently used (a snapshot)."""
        with self._lock:
            return list(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._sizes.clear()
            self.bytes = 0

    @property
    def items(self) -> int:
        return len(self._data)

    def stats(self) -> dict:
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": self.hits / lookups if lookups else 0.0,
                "evictions": self.evictions,
                "rejected": self.rejected,
                "bytes": self.bytes,
                "items": len(self._data),
                "max_bytes": self.max_bytes,
            }


_MISSING = object()
