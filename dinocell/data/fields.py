"""One field (site) as the model sees it: a uint8 [C, H, W] stack of preprocessed channels, and the loader that builds it.

`FieldLoader.load(record)` fetches the requested channels of one manifest record in parallel, decodes them, applies the
plate's illumination functions when enabled, preprocesses (dinocell.data.preprocess) and stacks them in the requested
channel order. It is used by the shard writer (`load_many`) and by raw streaming (`load` per field).

Both data modes hand the trainer the same per-field sample (`field_to_sample`): {"image": torch.uint8 [C, H, W],
"channels": names, "channel_ids": indices into ALL_CHANNELS (-1 for a channel of another dataset, named in
data.channels), "field_id", "plate"}; `collate_fields` batches them.

A field that fails says why in one of the skip kinds of dinocell.data.shard_format (`FieldLoadError.kind`):
"transient" when some object could not be read for a reason other than its absence (a storage error that outlived
the storage layer's retries: worth trying again later), else "missing" (no such object / no URI), else "corrupt".
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinocell import storage
from dinocell.channels import ALL_CHANNELS
from dinocell.config import PreprocessConfig
from dinocell.data.cache import LRUCache
from dinocell.data.preprocess import (
    CorruptImageError,
    IllumError,
    decode_tiff,
    load_illum,
    preprocess_channel,
    preprocess_signature,
    validate_preprocess_config,
)
from dinocell.jump.manifest import FieldRecord
from dinocell.storage.errors import NOT_FOUND_CODES, s3_error_code

__all__ = [
    "UNKNOWN_CHANNEL_ID",
    "Field",
    "FieldLoadError",
    "FieldLoader",
    "channel_ids_of",
    "collate_fields",
    "field_to_sample",
    "storage_error_kind",
]

UNKNOWN_CHANNEL_ID = -1  # a channel name outside dinocell.ALL_CHANNELS (datasets with other channels)


def channel_ids_of(channels: Sequence[str]) -> tuple[int, ...]:
    """Indices of channel names in dinocell.ALL_CHANNELS; UNKNOWN_CHANNEL_ID for any other (non-empty) name."""
    bad = [c for c in channels if not isinstance(c, str) or not c]
    if bad:
        raise ValueError(f"channel names must be non-empty strings, got {bad}")
    return tuple(ALL_CHANNELS.index(c) if c in ALL_CHANNELS else UNKNOWN_CHANNEL_ID for c in channels)


_MISSING_CODES = NOT_FOUND_CODES | {"NoSuchBucket"}


def storage_error_kind(err: BaseException) -> str:
    """"missing" when a storage error means the object is not there, else "transient" (5xx, timeouts, resets,
    access problems: the object may be fine, a later run may read it). Looks through the cause chain: the storage
    layer wraps botocore's ClientError / the local OSError."""
    seen: BaseException | None = err
    for _ in range(6):
        if seen is None:
            break
        if isinstance(seen, (storage.NotFound, FileNotFoundError)):
            return "missing"
        if s3_error_code(seen) in _MISSING_CODES:
            return "missing"
        seen = seen.__cause__ or seen.__context__
    return "transient"


@dataclass
class Field:
    image: np.ndarray  # uint8 [C, H, W], channels in `channels` order
    channels: tuple[str, ...]
    field_id: str
    plate: str
    batch: str
    well: str
    site: int

    @property
    def channel_ids(self) -> tuple[int, ...]:
        return channel_ids_of(self.channels)


class FieldLoadError(RuntimeError):
    """A field could not be loaded. `failures` lists (channel, uri, reason) for every failing object, `kinds` the skip
    kind of each ("transient", "missing", "corrupt"), `kind` the field's (transient wins: a retry may load it)."""

    def __init__(self, field_id: str, failures: Sequence[tuple[str, str, str]], kinds: Sequence[str] | None = None):
        self.field_id = field_id
        self.failures = list(failures)
        self.kinds = list(kinds) if kinds is not None else ["corrupt"] * len(self.failures)
        if len(self.kinds) != len(self.failures):
            raise ValueError(f"field {field_id}: {len(self.kinds)} kinds for {len(self.failures)} failures")
        self.kind = next((k for k in ("transient", "missing") if k in self.kinds), "corrupt")
        # Storage and decode errors already name their URI: do not repeat it.
        detail = "; ".join(
            f"{ch} {reason}" if uri in reason else f"{ch} {uri}: {reason}" for ch, uri, reason in self.failures
        )
        super().__init__(f"field {field_id}: {detail}")

    @property
    def uris(self) -> list[str]:
        return [uri for _, uri, _ in self.failures]


@dataclass
class _Fetched:
    """What `_fetch` got for one record: cached channels, raw bytes (or errors) for the rest, illum bytes."""

    cached: dict[str, np.ndarray]
    fetched: dict[str, bytes | Exception]  # image uri -> bytes or StorageError
    illum: dict[str, bytes | Exception]  # illum uri -> bytes or StorageError (only those not cached yet)
    failures: list[tuple[str, str, str]]  # records without a URI for a channel (kind "missing")


class FieldLoader:
    """Fetch + decode + preprocess + stack the requested channels of manifest records.

    cache: an optional LRUCache of PREPROCESSED channels keyed by (image uri, illum uri, preprocessing signature),
    so a changed config never serves stale arrays. Illumination functions are cached separately (per plate and channel,
    bounded by `illum_cache_bytes`: 5 float32 1080^2 arrays are 23 MB a plate).
    `counters` says what happened: fields loaded/failed, objects fetched and bytes, channels served from the cache,
    fields whose illumination correction was enabled but which had no illum URI (they are loaded uncorrected).
    """

    def __init__(
        self,
        preprocess_cfg: PreprocessConfig,
        channels: Sequence[str],
        fetch_workers: int = 8,
        cache: LRUCache | None = None,
        illum_cache_bytes: int = 256 * 1024**2,
    ):
        validate_preprocess_config(preprocess_cfg)
        channels = tuple(channels)
        if not channels:
            raise ValueError("FieldLoader needs at least one channel")
        if len(set(channels)) != len(channels):
            raise ValueError(f"duplicate channel names in {list(channels)}")
        channel_ids_of(channels)  # validates the names (any non-empty name: datasets have their own channels)
        if fetch_workers < 1:
            raise ValueError(f"fetch_workers must be >= 1, got {fetch_workers}")
        self.cfg = preprocess_cfg
        self.channels = channels
        self.fetch_workers = int(fetch_workers)
        self.cache = cache
        self.illum_cache = LRUCache(illum_cache_bytes)
        # Illum URIs requested by a fetch whose field is not assembled yet (load_many prefetches the next field while
        # the current one is assembled): the next fetch must not request them a second time.
        self._illum_inflight: set[str] = set()
        self._illum_lock = threading.Lock()
        self.signature = preprocess_signature(preprocess_cfg)
        self.counters = {
            "fields_loaded": 0,
            "fields_failed": 0,
            "objects_fetched": 0,
            "bytes_fetched": 0,
            "channels_from_cache": 0,
            "fields_without_illum": 0,
        }

    # ------------------------------------------------------------------ public
    def load(self, record: FieldRecord) -> Field:
        """Load one field; raises FieldLoadError naming the field, the failing URI(s) and why."""
        return self._assemble(record, self._fetch(record))

    def load_many(
        self, records: Iterable[FieldRecord], on_error: str = "skip", on_field=None
    ) -> tuple[list[Field], list[tuple[str, str]]]:
        """Load records in order, fetching the next field's objects while the current one is preprocessed.

        on_error="skip": failed fields are left out and listed in `errors` as (field_id, reason);
        on_error="raise": the first FieldLoadError propagates. on_field: called after each field (progress).
        """
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        fields, errors = self.load_each(records, stop_on_error=on_error == "raise", on_field=on_field)
        if errors and on_error == "raise":
            raise errors[0]
        return fields, [(e.field_id, str(e)) for e in errors]

    def load_each(
        self, records: Iterable[FieldRecord], stop_on_error: bool = False, on_field=None
    ) -> tuple[list[Field], list[FieldLoadError]]:
        """Like load_many(on_error="skip"), but the errors are the FieldLoadErrors themselves (with their `kind`);
        stop_on_error: stop at the first failing field."""
        records = list(records)
        fields: list[Field] = []
        errors: list[FieldLoadError] = []
        if not records:
            return fields, errors
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinocell-prefetch") as pool:
            nxt = pool.submit(self._fetch, records[0])
            for i, rec in enumerate(records):
                fetched = nxt.result()
                if i + 1 < len(records):
                    nxt = pool.submit(self._fetch, records[i + 1])
                try:
                    fields.append(self._assemble(rec, fetched))
                except FieldLoadError as e:
                    errors.append(e)
                    if stop_on_error:
                        nxt.cancel()
                        break
                if on_field is not None:
                    on_field()
        return fields, errors

    # ------------------------------------------------------------------ steps
    def _key(self, uri: str, illum_uri: str) -> tuple[str, str, str]:
        return (uri, illum_uri, self.signature)

    def _illum_uri(self, record: FieldRecord, ch: str) -> str:
        return (record.illum.get(ch) or "") if self.cfg.illum_correction else ""

    def _fetch(self, record: FieldRecord) -> _Fetched:
        failures: list[tuple[str, str, str]] = []
        cached: dict[str, np.ndarray] = {}
        wanted: list[str] = []
        wanted_illum: list[str] = []
        for ch in self.channels:
            uri = record.uris.get(ch) or ""
            if not uri:
                failures.append((ch, "<none>", f"the manifest record has no URI for channel {ch}"))
                continue
            illum_uri = self._illum_uri(record, ch)
            hit = self.cache.get(self._key(uri, illum_uri)) if self.cache is not None else None
            if hit is not None:
                cached[ch] = hit
                continue
            wanted.append(uri)
            if illum_uri and illum_uri not in wanted_illum:
                wanted_illum.append(illum_uri)
        if failures:  # the field cannot be completed: do not spend I/O on it
            return _Fetched(cached, {}, {}, failures)
        with self._illum_lock:
            wanted_illum = [u for u in wanted_illum if u not in self.illum_cache and u not in self._illum_inflight]
            self._illum_inflight.update(wanted_illum)
        got = storage.read_many(wanted + wanted_illum, max_workers=self.fetch_workers, return_exceptions=True)
        fetched = dict(zip(wanted, got[: len(wanted)]))
        illum = dict(zip(wanted_illum, got[len(wanted) :]))
        return _Fetched(cached, fetched, illum, failures)

    def _get_illum(self, uri: str, fetched: _Fetched) -> np.ndarray:
        arr = self.illum_cache.get(uri)
        if arr is not None:
            return arr
        data = fetched.illum.get(uri)
        if data is None:  # fetched for an earlier field but evicted since, or that fetch failed: read it now
            data = storage.read_bytes(uri)
        if isinstance(data, Exception):
            raise data
        arr = load_illum(data, uri)
        self.illum_cache.put(uri, arr)
        return arr

    def _assemble(self, record: FieldRecord, f: _Fetched) -> Field:
        try:
            return self._assemble_fetched(record, f)
        finally:
            with self._illum_lock:
                self._illum_inflight.difference_update(f.illum)

    def _assemble_fetched(self, record: FieldRecord, f: _Fetched) -> Field:
        failures = list(f.failures)
        kinds = ["missing"] * len(failures)
        if failures:
            self._fail(record, failures, kinds)
        for uri, data in list(f.fetched.items()) + list(f.illum.items()):
            if isinstance(data, Exception):
                ch = self._channel_of(record, uri)
                failures.append((ch, uri, str(data)))
                kinds.append(storage_error_kind(data))
            else:
                self.counters["objects_fetched"] += 1
                self.counters["bytes_fetched"] += len(data)
        if failures:
            self._fail(record, failures, kinds)

        # Decode everything first: a shape mismatch or a corrupt channel fails the field before any preprocessing.
        raw: dict[str, np.ndarray] = {}
        for ch in self.channels:
            if ch in f.cached:
                continue
            uri = record.uris[ch]
            try:
                raw[ch] = decode_tiff(f.fetched[uri], uri)
            except CorruptImageError as e:
                failures.append((ch, uri, str(e)))
                kinds.append("corrupt")
        if failures:
            self._fail(record, failures, kinds)
        self._check_shapes(record, {ch: a.shape for ch, a in raw.items()}, "")

        out: dict[str, np.ndarray] = dict(f.cached)
        new_keys: dict[str, tuple] = {}
        missing_illum = False
        for ch, img in raw.items():
            uri = record.uris[ch]
            illum_uri = self._illum_uri(record, ch)
            illum = None
            if self.cfg.illum_correction and not illum_uri:
                missing_illum = True
            if illum_uri:
                try:
                    illum = self._get_illum(illum_uri, f)
                except (IllumError, storage.StorageError) as e:
                    failures.append((ch, illum_uri, str(e)))
                    kinds.append(storage_error_kind(e) if isinstance(e, storage.StorageError) else "corrupt")
                    continue
            try:
                out[ch] = preprocess_channel(img, self.cfg, illum)
            except ValueError as e:  # illum shape mismatch
                failures.append((ch, illum_uri or uri, str(e)))
                kinds.append("corrupt")
                continue
            new_keys[ch] = self._key(uri, illum_uri)
        if failures:
            self._fail(record, failures, kinds)
        # Cached channels carry no raw shape: compare the preprocessed ones too.
        self._check_shapes(record, {ch: out[ch].shape for ch in self.channels}, " after preprocessing")

        if self.cache is not None:  # only complete fields are worth caching
            for ch, key in new_keys.items():
                self.cache.put(key, out[ch])
        self.counters["channels_from_cache"] += len(f.cached)
        self.counters["fields_without_illum"] += int(missing_illum)
        self.counters["fields_loaded"] += 1
        image = np.stack([out[ch] for ch in self.channels])
        return Field(
            image=image,
            channels=self.channels,
            field_id=record.field_id,
            plate=record.plate,
            batch=record.batch,
            well=record.well,
            site=int(record.site),
        )

    # ------------------------------------------------------------------ helpers
    def _fail(self, record: FieldRecord, failures: list[tuple[str, str, str]], kinds: list[str]):
        self.counters["fields_failed"] += 1
        raise FieldLoadError(record.field_id, failures, kinds)

    def _channel_of(self, record: FieldRecord, uri: str) -> str:
        for ch in self.channels:
            if record.uris.get(ch) == uri or record.illum.get(ch) == uri:
                return ch
        return "?"

    def _check_shapes(self, record: FieldRecord, shapes: dict[str, tuple], stage: str) -> None:
        """All channels of a field must have one size; the failures name each odd channel against the first one."""
        if len(set(shapes.values())) <= 1:
            return
        ref_ch, ref_shape = next(iter(shapes.items()))
        odd = [
            (ch, record.uris[ch], f"shape {shape}{stage} differs from {ref_ch} ({record.uris[ref_ch]}) {ref_shape}")
            for ch, shape in shapes.items()
            if shape != ref_shape
        ]
        self._fail(record, odd, ["corrupt"] * len(odd))


# --------------------------------------------------------------------------- samples and batches


def field_to_sample(field: Field) -> dict:
    """The per-field sample both data modes yield: uint8 tensor [C, H, W] + channel names/ids + ids."""
    import torch

    return {
        "image": torch.from_numpy(np.ascontiguousarray(field.image)),
        "channels": tuple(field.channels),
        "channel_ids": field.channel_ids,
        "field_id": field.field_id,
        "plate": field.plate,
    }


def _stack(images: list) -> Any:
    """torch.stack, straight into shared memory inside a DataLoader worker (as default_collate does): the batch
    (about 93 MB for 64 fields of 5x540x540) then crosses to the main process without a second copy."""
    import torch

    if torch.utils.data.get_worker_info() is None:
        return torch.stack(images)
    numel = sum(t.numel() for t in images)
    shared = images[0].untyped_storage()._new_shared(numel * images[0].element_size())
    out = images[0].new(shared).resize_(len(images), *images[0].shape)
    return torch.stack(images, out=out)


def collate_fields(samples: Sequence[Any]) -> dict:
    """Batch per-field samples (dicts from `field_to_sample` / the data streams, or Field objects).

    Returns {"images": uint8 [B, C, H, W], "channels": tuple, "channel_ids": long [C], "field_ids": list,
    "plates": list}. Every field of a batch must share channel names and image size (ValueError naming the first
    field that differs).
    """
    import torch

    if not samples:
        raise ValueError("collate_fields got an empty batch")
    samples = [field_to_sample(s) if isinstance(s, Field) else s for s in samples]
    first = samples[0]
    channels = tuple(first["channels"])
    images = []
    for s in samples:
        img = s["image"]
        if not isinstance(img, torch.Tensor):
            img = torch.from_numpy(np.ascontiguousarray(img))
        if img.dtype != torch.uint8 or img.dim() != 3:
            raise ValueError(
                f"field {s['field_id']}: expected a uint8 [C, H, W] image, got {img.dtype} {tuple(img.shape)}"
            )
        if tuple(s["channels"]) != channels:
            raise ValueError(
                f"field {s['field_id']} has channels {tuple(s['channels'])}, but field {first['field_id']} in the same "
                f"batch has {channels}: a batch must share one channel list"
            )
        if images and img.shape != images[0].shape:
            raise ValueError(
                f"field {s['field_id']} has image size {tuple(img.shape)}, but field {first['field_id']} in the same "
                f"batch has {tuple(images[0].shape)}: a batch must share one size"
            )
        images.append(img)
    return {
        "images": _stack(images),
        "channels": channels,
        "channel_ids": torch.tensor(channel_ids_of(channels), dtype=torch.long),
        "field_ids": [s["field_id"] for s in samples],
        "plates": [s["plate"] for s in samples],
    }
