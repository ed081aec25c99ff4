"""`dinocell shard`: pack preprocessed fields into large tar shards (WebDataset layout) plus one JSON index.

Layout under the output prefix:

    <out>/shard-000000.tar    fields, WebDataset style: the files of one field share a key
    <out>/shard-000000.json   sidecar written after the tar: sha256, bytes, n_fields, skipped fields, plan fingerprint
    ...
    <out>/index.json          written last, only when every shard is complete: the reader's entry point

Inside a tar, each field is two members (in this order, 512-byte aligned as tar requires):

    <key>.json   {"field_id", "batch", "plate", "well", "site", "channels", "shape": [C, H, W], "dtype": "uint8"}
    <key>.u8     the image as raw bytes, C-contiguous uint8 [C, H, W]

`<key>` is the field's 9-digit position in the shard plan (a field_id holds '/' and may hold '.', which WebDataset
would split on). Raw bytes rather than `.npy` or PNG: the reader reads a member straight into its final buffer and wraps
it as an array with no decode and no further copy (a numpy view over the read buffer -> `torch.from_numpy`); shards are written once and
read every epoch, so decode cost is what matters, not size. Headers are plain USTAR with fixed mtime/owner, so the same
plan always produces byte-identical shards (same sha256 on every rerun); any tar tool or WebDataset can read them.

Shard plan (deterministic, so a rerun reproduces it): the split's fields are ordered by sha256 of their field_id (a
fixed pseudo-random order, independent of the manifest's row order, that spreads plates across shards so each shard
is already a random sample of the dataset), then cut into shards of `target_bytes // field_bytes` fields. The field
shape comes from loading the first loadable field of the plan; a field of any other shape is skipped and listed.

Parallel and resumable: a process pool (`shard.workers`) builds whole shards; each worker loads its fields with
FieldLoader in small chunks, writes the tar to a local temp file while hashing it, uploads it (atomic), then writes the
sidecar. A rerun skips every shard whose sidecar matches the plan (same fields, channels, preprocessing, shape) and
whose tar has the recorded size; only missing or stale shards are rebuilt. Corrupt or missing inputs are skipped,
counted and listed per shard and in the index. A run that has shards to (re)build first deletes the index, and every
run writes it at the very end, so an index on storage always describes a complete, consistent shard set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinocell import storage
from dinocell._version import __version__
from dinocell.channels import BRIGHTFIELD_CHANNELS, FLUORESCENT_CHANNELS
from dinocell.config import PreprocessConfig, ShardConfig
from dinocell.jump.manifest import FieldRecord, Manifest

log = logging.getLogger(__name__)

__all__ = [
    "INDEX_NAME",
    "SHARD_FORMAT",
    "ShardBuildError",
    "ShardIndex",
    "ShardInfo",
    "finish_tar",
    "plan_order",
    "shard_channels",
    "shard_name",
    "write_shards",
    "write_tar_member",
]

SHARD_FORMAT = "dinocell-shards"
SHARD_FORMAT_VERSION = 1
INDEX_NAME = "index.json"
KEY_DIGITS = 9
_BLOCK = 512
_RECORD = tarfile.RECORDSIZE  # tarfile pads archives to 20 blocks; we do the same so `tar` sees a normal archive
_CHUNK_FIELDS = 8  # fields loaded at once by a shard worker (bounds its memory to a few fields, not a whole shard)
_PROBE_FIELDS = 16  # how many fields the planner tries before giving up on finding the field shape


class ShardBuildError(RuntimeError):
    """Some shards could not be built; the message lists them. Finished shards are kept: rerun to resume."""


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


# --------------------------------------------------------------------------- the index


@dataclass
class ShardInfo:
    name: str  # "shard-000000.tar", relative to the index (the reader resolves it there, so shard sets can move)
    uri: str  # where it was written
    n_fields: int
    bytes: int
    sha256: str
    split: str
    n_skipped: int = 0


@dataclass
class ShardIndex:
    """What `index.json` holds; `written` / `reused` describe the run that returned it (not stored)."""

    uri: str
    split: str
    channels: list[str]
    field_shape: list[int]  # [C, H, W]
    preprocess: dict[str, Any]
    preprocess_signature: str
    target_bytes: int
    shards: list[ShardInfo]
    skipped: list[dict[str, str]]  # {"field_id", "reason", "shard"}
    dtype: str = "uint8"
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)

    @property
    def n_fields(self) -> int:
        return sum(s.n_fields for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def totals(self) -> dict[str, int]:
        return {
            "shards": len(self.shards),
            "fields": self.n_fields,
            "bytes": self.total_bytes,
            "skipped": len(self.skipped),
            "planned": self.n_fields + len(self.skipped),
        }

    def format_summary(self, max_skipped: int = 20) -> str:
        """A readable report: totals, what this run wrote or reused, and every skipped field with its reason."""
        t = self.totals()
        lines = [
            f"shards ({self.split} split) at {self.uri}: {t['shards']} shard(s), {t['fields']} fields "
            f"{'x'.join(map(str, self.field_shape))} {self.dtype}, {t['bytes'] / 1e6:.1f} MB; channels "
            f"{', '.join(self.channels)}",
            f"this run: {len(self.written)} shard(s) written, {len(self.reused)} reused (already complete)",
            f"skipped fields: {t['skipped']} of {t['planned']} planned",
        ]
        for s in self.skipped[:max_skipped]:
            lines.append(f"  {s.get('field_id')}: {s.get('reason')}")
        if len(self.skipped) > max_skipped:
            lines.append(f"  ... {len(self.skipped) - max_skipped} more in {self.uri}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SHARD_FORMAT,
            "version": SHARD_FORMAT_VERSION,
            "created_by": f"dinocell {__version__}",
            "layout": "webdataset tar; per field <key>.json (metadata) + <key>.u8 (raw C-contiguous uint8 [C,H,W])",
            "split": self.split,
            "channels": list(self.channels),
            "field_shape": list(self.field_shape),
            "dtype": self.dtype,
            "preprocess": self.preprocess,
            "preprocess_signature": self.preprocess_signature,
            "target_bytes": self.target_bytes,
            "totals": self.totals(),
            "shards": [dataclasses.asdict(s) for s in self.shards],
            "skipped": self.skipped,
        }

    def write(self, uri: str | None = None) -> None:
        storage.write_text(uri or self.uri, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], uri: str) -> ShardIndex:
        if not isinstance(d, dict) or d.get("format") != SHARD_FORMAT:
            raise ValueError(
                f"{uri} is not a dinocell shard index (format {d.get('format') if isinstance(d, dict) else d!r})"
            )
        if d.get("version") != SHARD_FORMAT_VERSION:
            raise ValueError(
                f"{uri}: shard index version {d.get('version')} is not supported (expected {SHARD_FORMAT_VERSION})"
            )
        try:
            shards = [ShardInfo(**s) for s in d["shards"]]
            return cls(
                uri=uri,
                split=d["split"],
                channels=list(d["channels"]),
                field_shape=[int(x) for x in d["field_shape"]],
                preprocess=dict(d["preprocess"]),
                preprocess_signature=d["preprocess_signature"],
                target_bytes=int(d["target_bytes"]),
                shards=shards,
                skipped=list(d["skipped"]),
                dtype=d.get("dtype", "uint8"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{uri}: malformed shard index: {type(e).__name__}: {e}") from e

    @classmethod
    def read(cls, uri: str) -> ShardIndex:
        uri = str(uri)
        try:
            d = json.loads(storage.read_text(uri))
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri}: shard index is not valid JSON: {e}") from e
        return cls.from_dict(d, uri)

    def shard_uri(self, shard: ShardInfo) -> str:
        """Where a shard lives now: next to the index."""
        return storage.join(parent_uri(self.uri), shard.name)


def parent_uri(uri: str) -> str:
    uri = str(uri)
    if storage.is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return str(storage.local_path(uri).parent)


# --------------------------------------------------------------------------- tar writing


def write_tar_member(f, name: str, payload) -> int:
    """Append one regular-file member (USTAR header, payload, zero padding to 512). Returns the bytes written.

    `payload` is anything with the buffer protocol (bytes, a C-contiguous ndarray): it is written without a copy.
    Fixed mtime/owner/mode make the archive a pure function of its contents.
    """
    mv = memoryview(payload).cast("B")
    info = tarfile.TarInfo(name)
    info.size = mv.nbytes
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    pad = (-mv.nbytes) % _BLOCK
    f.write(header)
    f.write(mv)
    if pad:
        f.write(b"\0" * pad)
    return len(header) + mv.nbytes + pad


def finish_tar(f, written: int) -> int:
    """End-of-archive: two zero blocks, then zero padding to a whole tar record. Returns the bytes written."""
    end = 2 * _BLOCK
    end += (-(written + end)) % _RECORD
    f.write(b"\0" * end)
    return end


class _HashingWriter:
    """File wrapper that feeds every written byte to sha256 (so the tar is hashed once, while it is written)."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> None:
        self.sha.update(data)
        self.f.write(data)
        self.size += memoryview(data).nbytes


def field_metadata(fld, shape: Sequence[int]) -> dict[str, Any]:
    return {
        "field_id": fld.field_id,
        "batch": fld.batch,
        "plate": fld.plate,
        "well": fld.well,
        "site": int(fld.site),
        "channels": list(fld.channels),
        "shape": [int(x) for x in shape],
        "dtype": "uint8",
    }


# --------------------------------------------------------------------------- planning


def shard_channels(
    shard_cfg: ShardConfig, manifest_channels: Sequence[str], channels: Sequence[str] | None
) -> list[str]:
    """The channels to pack: explicit, else the 5 fluorescent ones (+ brightfield when configured)."""
    if channels is None:
        channels = list(FLUORESCENT_CHANNELS) + (list(BRIGHTFIELD_CHANNELS) if shard_cfg.include_brightfield else [])
    channels = list(channels)
    if not channels:
        raise ValueError("shard: no channels to write")
    if len(set(channels)) != len(channels):
        raise ValueError(f"shard: duplicate channels in {channels}")
    missing = [c for c in channels if c not in manifest_channels]
    if missing:
        hint = (
            " (shard.include_brightfield needs brightfield channels in the manifest)"
            if set(missing) <= set(BRIGHTFIELD_CHANNELS)
            else ""
        )
        raise ValueError(f"shard: channels {missing} are not in the manifest (it has {list(manifest_channels)}){hint}")
    return channels


def plan_order(field_ids: Sequence[str]) -> list[int]:
    """Row indices in shard order: by sha256 of the field_id (stable across reruns and manifest row orders)."""
    keys = [hashlib.sha256(f"dinocell-shard-plan:{fid}".encode()).digest() for fid in field_ids]
    return sorted(range(len(field_ids)), key=lambda i: (keys[i], field_ids[i]))


def _plan_fingerprint(
    field_ids: Sequence[str], channels: Sequence[str], shape: Sequence[int], signature: str, split: str
) -> str:
    """What a shard's content depends on; a sidecar with another fingerprint is stale and the shard is rebuilt."""
    blob = json.dumps(
        {
            "v": SHARD_FORMAT_VERSION,
            "fields": list(field_ids),
            "channels": list(channels),
            "shape": list(shape),
            "preprocess": signature,
            "split": split,
        },
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class _ShardTask:
    number: int
    first_key: int  # plan position of the shard's first field (keys are plan positions)
    records: list[FieldRecord]
    out_prefix: str
    channels: list[str]
    shape: list[int]
    preprocess: PreprocessConfig
    signature: str
    split: str
    fingerprint: str
    storage_cfg: storage.StorageConfig
    fetch_workers: int

    @property
    def name(self) -> str:
        return shard_name(self.number)


# --------------------------------------------------------------------------- one shard (runs in a pool worker)

_worker_loaders: dict = {}


def _field_loader(preprocess: PreprocessConfig, channels: Sequence[str], fetch_workers: int):
    """One FieldLoader per worker process and configuration (it holds a thread pool)."""
    from dinocell.data.fields import FieldLoader

    key = (json.dumps(dataclasses.asdict(preprocess), sort_keys=True), tuple(channels), fetch_workers)
    loader = _worker_loaders.get(key)
    if loader is None:
        loader = _worker_loaders[key] = FieldLoader(preprocess, list(channels), fetch_workers=fetch_workers)
    return loader


def _build_shard(task: _ShardTask) -> dict[str, Any]:
    """Load the shard's fields, write the tar to a temp file (hashing it), upload it, then write the sidecar."""
    if storage.get_config() != task.storage_cfg.resolved():
        storage.configure(task.storage_cfg)
    loader = _field_loader(task.preprocess, task.channels, task.fetch_workers)
    expected = tuple(task.shape)
    keys = {r.field_id: task.first_key + j for j, r in enumerate(task.records)}
    skipped: list[dict[str, str]] = []
    n_fields = 0
    t0 = time.perf_counter()
    fd, tmp = tempfile.mkstemp(prefix=f"dinocell-{task.name}-", suffix=".tar")
    try:
        with os.fdopen(fd, "wb") as raw:
            out = _HashingWriter(raw)
            written = 0
            for start in range(0, len(task.records), _CHUNK_FIELDS):
                chunk = task.records[start : start + _CHUNK_FIELDS]
                fields, errors = loader.load_many(chunk, on_error="skip")
                skipped.extend({"field_id": fid, "reason": str(reason), "shard": task.name} for fid, reason in errors)
                for fld in sorted(fields, key=lambda f: keys[f.field_id]):
                    img = np.ascontiguousarray(fld.image)
                    if img.dtype != np.uint8 or tuple(img.shape) != expected or list(fld.channels) != task.channels:
                        skipped.append(
                            {
                                "field_id": fld.field_id,
                                "reason": f"field is {img.dtype} {tuple(img.shape)} with channels {list(fld.channels)}, "
                                f"the shard set is uint8 {expected} with channels {task.channels}",
                                "shard": task.name,
                            }
                        )
                        continue
                    key = f"{keys[fld.field_id]:0{KEY_DIGITS}d}"
                    meta = json.dumps(field_metadata(fld, img.shape), separators=(",", ":")).encode()
                    written += write_tar_member(out, f"{key}.json", meta)
                    written += write_tar_member(out, f"{key}.u8", img)
                    n_fields += 1
            written += finish_tar(out, written)
        sha = out.sha.hexdigest()
        uri = storage.join(task.out_prefix, f"{task.name}.tar")
        storage.upload_file(tmp, uri)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    sidecar = {
        "format": SHARD_FORMAT,
        "version": SHARD_FORMAT_VERSION,
        "name": f"{task.name}.tar",
        "uri": uri,
        "n_fields": n_fields,
        "bytes": out.size,
        "sha256": sha,
        "split": task.split,
        "channels": task.channels,
        "field_shape": list(task.shape),
        "preprocess_signature": task.signature,
        "plan_sha256": task.fingerprint,
        "planned": len(task.records),
        "skipped": skipped,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    storage.write_text(storage.join(task.out_prefix, f"{task.name}.json"), json.dumps(sidecar, indent=1) + "\n")
    return sidecar


# --------------------------------------------------------------------------- the writer


def _probe_shape(loader, manifest: Manifest, order: Sequence[int]) -> list[int]:
    """Shape [C, H, W] of the first loadable field of the plan (it sets how many fields fill a shard)."""
    reasons = []
    for i in order[:_PROBE_FIELDS]:
        rec = manifest.record(i)
        fields, errors = loader.load_many([rec], on_error="skip")
        if fields:
            return [int(x) for x in fields[0].image.shape]
        reasons.extend(f"{fid}: {why}" for fid, why in errors)
    raise ShardBuildError(
        f"shard: none of the first {min(len(order), _PROBE_FIELDS)} fields of the plan could be loaded:\n  "
        + "\n  ".join(reasons)
    )


def _existing_sidecars(out_prefix: str, names: Sequence[str]) -> dict[str, dict]:
    """Sidecars of shards already in the output whose tar has the size the sidecar records."""
    sizes = {}
    # Only direct children of the output prefix: "out/train" must not match "out/train2/..." or "out/train/sub/...".
    base_dir = (
        out_prefix.rstrip("/") + "/" if storage.is_s3(out_prefix) else str(storage.local_path(out_prefix)) + os.sep
    )
    for obj in storage.list_objects(base_dir):
        rel = obj.uri[len(base_dir) :] if obj.uri.startswith(base_dir) else ""
        if rel.startswith("shard-") and "/" not in rel and os.sep not in rel:
            sizes[rel] = obj.size
    candidates = [n for n in names if f"{n}.tar" in sizes and f"{n}.json" in sizes]

    def read(name: str):
        try:
            return name, json.loads(storage.read_text(storage.join(out_prefix, f"{name}.json")))
        except (storage.StorageError, json.JSONDecodeError) as e:
            log.warning("shard: unreadable sidecar for %s (%s): rebuilding it", name, e)
            return name, None

    found = {}
    for name, side in storage.map_parallel(read, candidates) if candidates else []:
        if side and side.get("bytes") == sizes[f"{name}.tar"]:
            found[name] = side
    return found


def write_shards(
    manifest: Manifest,
    out_prefix: str,
    shard_cfg: ShardConfig,
    preprocess_cfg: PreprocessConfig,
    channels: Sequence[str] | None = None,
    fetch_workers: int = 8,
) -> ShardIndex:
    """Build (or finish) the shard set of `manifest`'s `shard_cfg.split` under `out_prefix`; returns the index.

    Raises ShardBuildError when some shards failed (the others are kept; rerun to resume) or when no field loads.
    """
    from dinocell.data.fields import FieldLoader
    from dinocell.data.preprocess import preprocess_signature, validate_preprocess_config

    out_prefix = str(out_prefix or shard_cfg.output)
    if not out_prefix:
        raise ValueError("shard: no output prefix (set shard.output)")
    if shard_cfg.target_bytes <= 0:
        raise ValueError(f"shard.target_bytes must be > 0, got {shard_cfg.target_bytes}")
    validate_preprocess_config(preprocess_cfg)
    channels = shard_channels(shard_cfg, manifest.channels, channels)
    split = shard_cfg.split
    part = manifest.split(split).select_channels(channels)
    if len(part) == 0:
        raise ValueError(f"shard: the manifest has no fields in split {split!r}")
    field_ids = part.column("field_id")
    if len(set(field_ids)) != len(field_ids):
        dups = sorted(f for f, n in Counter(field_ids).items() if n > 1)
        raise ValueError(f"shard: the manifest lists {len(dups)} field_ids more than once, e.g. {dups[:3]}")
    order = plan_order(field_ids)
    signature = preprocess_signature(preprocess_cfg)
    shape = _probe_shape(FieldLoader(preprocess_cfg, channels, fetch_workers=fetch_workers), part, order)
    per_shard = max(1, shard_cfg.target_bytes // int(np.prod(shape)))
    n_shards = -(-len(order) // per_shard)
    names = [shard_name(i) for i in range(n_shards)]
    log.info(
        "shard: %d fields of %s, %d per shard -> %d shards under %s", len(order), shape, per_shard, n_shards, out_prefix
    )

    existing = _existing_sidecars(out_prefix, names)
    sidecars: dict[int, dict] = {}
    todo: list[int] = []
    for i, name in enumerate(names):
        rows = order[i * per_shard : (i + 1) * per_shard]
        fp = _plan_fingerprint([field_ids[r] for r in rows], channels, shape, signature, split)
        side = existing.get(name)
        if side is not None and side.get("plan_sha256") == fp and side.get("version") == SHARD_FORMAT_VERSION:
            sidecars[i] = side
        else:
            todo.append(i)
    log.info("shard: %d shards already complete, %d to build", len(sidecars), len(todo))
    index_uri = storage.join(out_prefix, INDEX_NAME)
    if todo and storage.exists(index_uri):
        storage.delete(index_uri)  # from here until the end, no index: readers never see a half-rebuilt set

    storage_cfg = storage.get_config()

    def make_task(i: int) -> _ShardTask:
        rows = order[i * per_shard : (i + 1) * per_shard]
        records = list(part.take(rows).records())
        fp = _plan_fingerprint([r.field_id for r in records], channels, shape, signature, split)
        return _ShardTask(
            number=i,
            first_key=i * per_shard,
            records=records,
            out_prefix=out_prefix,
            channels=channels,
            shape=shape,
            preprocess=preprocess_cfg,
            signature=signature,
            split=split,
            fingerprint=fp,
            storage_cfg=storage_cfg,
            fetch_workers=fetch_workers,
        )

    failures: dict[int, str] = {}
    if shard_cfg.workers <= 1 or len(todo) <= 1:
        for i in todo:
            try:
                sidecars[i] = _build_shard(make_task(i))
            except Exception as e:  # noqa: BLE001  (one broken shard must not lose the others: all reported at the end)
                failures[i] = f"{type(e).__name__}: {e}"
    else:
        _run_pool(todo, make_task, min(shard_cfg.workers, len(todo)), sidecars, failures)
    if failures:
        lines = "\n  ".join(f"{shard_name(i)}: {why}" for i, why in sorted(failures.items()))
        raise ShardBuildError(
            f"shard: {len(failures)} of {n_shards} shards failed (the {len(sidecars)} finished ones are kept; "
            f"rerun to resume):\n  {lines}"
        )

    shards, skipped = [], []
    for i in range(n_shards):
        side = sidecars[i]
        shards.append(
            ShardInfo(
                name=side["name"],
                uri=side["uri"],
                n_fields=side["n_fields"],
                bytes=side["bytes"],
                sha256=side["sha256"],
                split=side["split"],
                n_skipped=len(side["skipped"]),
            )
        )
        skipped.extend(side["skipped"])
    index = ShardIndex(
        uri=index_uri,
        split=split,
        channels=channels,
        field_shape=shape,
        preprocess=dataclasses.asdict(preprocess_cfg),
        preprocess_signature=signature,
        target_bytes=shard_cfg.target_bytes,
        shards=shards,
        skipped=skipped,
        written=[shard_name(i) for i in todo],
        reused=[shard_name(i) for i in range(n_shards) if i not in set(todo)],
    )
    if index.n_fields == 0:
        raise ShardBuildError(
            f"shard: every field was skipped ({len(skipped)}); no index written. First: {skipped[:3]}"
        )
    index.write()
    log.info("shard: wrote %s (%d fields, %d shards, %d skipped)", index_uri, index.n_fields, n_shards, len(skipped))
    return index


def _run_pool(todo, make_task, workers: int, sidecars: dict, failures: dict) -> None:
    """Build shards on a spawn-context process pool, keeping at most 2 tasks per worker in flight (bounded memory).

    Spawn, not fork: the parent may hold threads (storage pools, a local S3 server) whose locks a fork would copy.
    """
    ctx = multiprocessing.get_context("spawn")
    pending = list(todo)
    running: dict[Future, int] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        while pending or running:
            while pending and len(running) < 2 * workers:
                i = pending.pop(0)
                running[pool.submit(_build_shard, make_task(i))] = i
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                i = running.pop(fut)
                try:
                    sidecars[i] = fut.result()
                    log.info("shard: %s done (%d fields)", shard_name(i), sidecars[i]["n_fields"])
                except BrokenProcessPool as e:
                    failures[i] = (
                        f"{type(e).__name__}: {e} (a worker died: out of memory? When calling write_shards from a "
                        "script, guard the call with `if __name__ == '__main__':`, the pool starts workers with spawn)"
                    )
                except Exception as e:  # noqa: BLE001  (reported with the others at the end)
                    failures[i] = f"{type(e).__name__}: {e}"


def shard_from_config(cfg, manifest_uri: str | None = None) -> ShardIndex:
    """The `dinocell shard` step: read the manifest named in the config and write the shard set to `shard.output`."""
    uri = manifest_uri or cfg.data.manifest
    if not uri:
        raise ValueError("shard: no manifest (set data.manifest to the URI written by `dinocell discover`)")
    manifest = Manifest.read(uri)
    return write_shards(manifest, cfg.shard.output, cfg.shard, cfg.preprocess, channels=None)
