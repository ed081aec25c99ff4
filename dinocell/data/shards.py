"""`dinocell shard`: pack preprocessed fields into large tar shards (WebDataset layout) plus one JSON index.

`write_shards` builds (or finishes) a shard set; the step (`dinocell shard`, the KFP component, the demo) calls it
through dinocell.data.step.shard. The parts it puts together:

- dinocell.data.shard_format: the on-disk layout, the index (`ShardIndex`, `ShardInfo`) and names;
- dinocell.data.shard_tar: the tar bytes (deterministic USTAR members; streaming them back);
- dinocell.data.shard_plan: the deterministic plan (fields ordered by sha256 of their field_id, cut into shards of
  `target_bytes // field_bytes` fields) and which shards an earlier run already finished;
- dinocell.data.shard_build: building one shard (load, write the tar while hashing it, upload, sidecar), in this
  process or a spawn-context process pool (`shard.workers`).

Deterministic: headers are plain USTAR with fixed mtime/owner, so the same plan always produces byte-identical shards
(same sha256 on every rerun); any tar tool or WebDataset can read them.

Parallel and resumable: a rerun skips every shard whose sidecar matches the plan (same fields, channels,
preprocessing, shape), whose tar has the recorded size and whose skips were all missing or corrupt inputs; missing,
stale shards and shards with transient skips (storage errors after the retries) are rebuilt. Corrupt or missing
inputs are skipped, counted and listed per shard and in the index, each with its skip kind. A run first removes the
temp files that killed writers left (shard_format.clean_stale_temps), counted in the index and the summary. A run that has shards to (re)build first
deletes the index, and every run writes it at the very end, so an index on storage always describes a complete,
consistent shard set.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np

from dinocell import storage
from dinocell.config import PreprocessConfig, ShardConfig
from dinocell.data.shard_build import ShardTask, build_shard, run_pool
from dinocell.data.shard_format import (
    INDEX_NAME,
    SHARD_FORMAT,
    ShardBuildError,
    ShardIndex,
    ShardInfo,
    clean_stale_temps,
    shard_name,
)
from dinocell.data.shard_plan import (
    ShardPlan,
    existing_sidecars,
    plan_fingerprint,
    plan_order,
    probe_shape,
    rebuild_reason,
    shard_channels,
)
from dinocell.data.shard_tar import finish_tar, write_tar_member
from dinocell.jump.manifest import Manifest
from dinocell.progress import Progress
from dinocell.storage.multipart import abort_incomplete_uploads

log = logging.getLogger(__name__)
STALE_UPLOAD_S = 6 * 3600  # an incomplete shard upload this old belongs to a killed writer

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


def write_shards(
    manifest: Manifest,
    out_prefix: str,
    shard_cfg: ShardConfig,
    preprocess_cfg: PreprocessConfig,
    channels: Sequence[str] | None = None,
    fetch_workers: int = 8,
    manifest_uri: str = "",
) -> ShardIndex:
    """Build (or finish) the shard set of `manifest`'s `shard_cfg.split` under `out_prefix`; returns the index.

    channels: the channels to pack, in order (data.channels; None or empty: the manifest's); manifest_uri names the
    manifest in errors. Raises ShardBuildError when some shards failed (the others are kept; rerun to resume) or
    when no field loads; ValueError for a configured channel the manifest lacks.
    """
    from dinocell.data.fields import FieldLoader
    from dinocell.data.preprocess import preprocess_signature, validate_preprocess_config

    out_prefix = str(out_prefix or shard_cfg.output)
    if not out_prefix:
        raise ValueError("shard: no output prefix (set shard.output)")
    if shard_cfg.target_bytes <= 0:
        raise ValueError(f"shard.target_bytes must be > 0, got {shard_cfg.target_bytes}")
    validate_preprocess_config(preprocess_cfg)
    channels = shard_channels(shard_cfg, manifest.channels, channels, manifest_uri)
    cleaned = _clean_stale_temps(out_prefix)
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
    shape = probe_shape(FieldLoader(preprocess_cfg, channels, fetch_workers=fetch_workers), part, order)
    plan = ShardPlan(order, max(1, shard_cfg.target_bytes // int(np.prod(shape))))
    n_shards = plan.n_shards
    names = plan.names
    log.info(
        "shard: %d fields of %s, %d per shard -> %d shards under %s",
        len(order),
        shape,
        plan.per_shard,
        n_shards,
        out_prefix,
    )

    def fingerprint(i: int) -> str:
        return plan_fingerprint([field_ids[r] for r in plan.rows(i)], channels, shape, signature, split)

    existing = existing_sidecars(out_prefix, names)
    sidecars: dict[int, dict] = {}
    todo: list[int] = []
    for i, name in enumerate(names):
        side = existing.get(name)
        why = rebuild_reason(side, fingerprint(i))
        if why is None:
            sidecars[i] = side
        else:
            if side is not None:
                log.info("shard: rebuilding %s: %s", name, why)
            todo.append(i)
    log.info("shard: %d shards already complete, %d to build", len(sidecars), len(todo))
    index_uri = storage.join(out_prefix, INDEX_NAME)
    if todo and storage.exists(index_uri):
        storage.delete(index_uri)  # from here until the end, no index: readers never see a half-rebuilt set

    storage_cfg = storage.get_config()

    def make_task(i: int) -> ShardTask:
        return ShardTask(
            number=i,
            first_key=plan.first_key(i),
            records=list(part.take(plan.rows(i)).records()),
            out_prefix=out_prefix,
            channels=channels,
            shape=shape,
            preprocess=preprocess_cfg,
            signature=signature,
            split=split,
            fingerprint=fingerprint(i),
            storage_cfg=storage_cfg,
            fetch_workers=fetch_workers,
        )

    failures: dict[int, str] = {}
    bar = Progress("shard", total=n_shards, initial=n_shards - len(todo), unit="shard")
    if shard_cfg.workers <= 1 or len(todo) <= 1:
        for i in todo:
            try:
                sidecars[i] = build_shard(make_task(i))
            except Exception as e:  # noqa: BLE001  (one broken shard must not lose the others: all reported at the end)
                failures[i] = f"{type(e).__name__}: {e}"
            bar.update(1)
    else:
        run_pool(todo, make_task, min(shard_cfg.workers, len(todo)), sidecars, failures, on_done=bar.update)
    bar.close(failed=bool(failures))
    if failures:
        lines = "\n  ".join(f"{shard_name(i)}: {why}" for i, why in sorted(failures.items()))
        raise ShardBuildError(
            f"shard: {len(failures)} of {n_shards} shards failed (the {len(sidecars)} finished ones are kept; "
            f"rerun to resume):\n  {lines}"
        )

    shards, skipped = [], []
    for i in range(n_shards):
        side = sidecars[i]
        shards.append(ShardInfo.from_sidecar(side))
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
        cleaned_temps=cleaned,
    )
    if index.n_fields == 0:
        raise ShardBuildError(
            f"shard: every field was skipped ({len(skipped)}); no index written. First: {skipped[:3]}"
        )
    index.write()
    log.info("shard: wrote %s (%d fields, %d shards, %d skipped: %s)", index_uri, index.n_fields, n_shards,
             len(skipped), index.skipped_by_kind())
    if index.skipped_by_kind()["transient"]:
        log.warning("shard: %d field(s) skipped by storage errors that outlived the retries; rerun the shard step "
                    "to rebuild their shards", index.skipped_by_kind()["transient"])
    return index


def _clean_stale_temps(out_prefix: str) -> int:
    """Temp files of killed shard writers: tars in the temp dir; for a local output the storage layer's hidden
    siblings of interrupted atomic writes in the output directory; on S3 the incomplete multipart uploads under the
    prefix older than STALE_UPLOAD_S (a shard step with the same inputs may be writing there right now)."""
    n = clean_stale_temps(r"shard-\d{6}")
    if storage.is_s3(out_prefix):
        n += abort_incomplete_uploads(out_prefix, dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=STALE_UPLOAD_S))
    else:
        n += clean_stale_temps(
            r"shard-\d{6}", str(storage.local_path(out_prefix)),
            dot_pattern=r"^\.(?:shard-\d{6}\.(?:tar|json)|index\.json)\..+\.tmp$",
        )
    return n
