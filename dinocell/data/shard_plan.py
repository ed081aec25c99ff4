"""The shard plan of `dinocell shard`: which channels, which fields in which shard, the field shape, and which shards
an earlier run already finished.

The plan is deterministic, so a rerun reproduces it: the split's fields are ordered by sha256 of their field_id (a
fixed pseudo-random order, independent of the manifest's row order, that spreads plates across shards so each shard
is already a random sample of the dataset), then cut into shards of `target_bytes // field_bytes` fields. The field
shape comes from loading the first loadable field of the plan; a field of any other shape is skipped and listed.
Each shard's content is summed up by a fingerprint (its fields, channels, shape, preprocessing, split) that its
sidecar records: a shard whose sidecar matches the plan, whose tar has the recorded size and whose skipped fields
were all missing or corrupt inputs is complete. A skip of kind "transient" (a storage error after the retries) is
not a property of the input: its shard is rebuilt by the next run, so a fault-free rerun recovers every such field.

Channels: exactly the configured ones (data.channels, in that order), else the manifest's; a configured channel the
manifest lacks is an error naming it and the manifest. Any channel names work (a dataset with Actin / Phase ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from dinocell import storage
from dinocell.channels import BRIGHTFIELD_CHANNELS
from dinocell.config import ShardConfig
from dinocell.data.shard_format import SHARD_FORMAT_VERSION, ShardBuildError, shard_name
from dinocell.jump.manifest import Manifest

log = logging.getLogger(__name__)

__all__ = [
    "PROBE_FIELDS",
    "ShardPlan",
    "existing_sidecars",
    "plan_fingerprint",
    "plan_order",
    "probe_shape",
    "rebuild_reason",
    "shard_channels",
]

PROBE_FIELDS = 16  # how many fields the planner tries before giving up on finding the field shape


def shard_channels(
    shard_cfg: ShardConfig,
    manifest_channels: Sequence[str],
    channels: Sequence[str] | None,
    manifest_uri: str = "",
) -> list[str]:
    """The channels to pack, in order: `channels` (data.channels) when given and non-empty, else the manifest's;
    shard.include_brightfield appends the brightfield planes not listed yet. ValueError naming any channel the
    manifest lacks, and the manifest."""
    channels = list(channels) if channels else list(manifest_channels)
    if shard_cfg.include_brightfield:
        channels += [c for c in BRIGHTFIELD_CHANNELS if c not in channels]
    if not channels:
        raise ValueError(f"shard: no channels to write (data.channels is empty and so is manifest {manifest_uri})")
    if len(set(channels)) != len(channels):
        raise ValueError(f"shard: duplicate channels in {channels} (data.channels)")
    missing = [c for c in channels if c not in manifest_channels]
    if missing:
        where = f"manifest {manifest_uri}" if manifest_uri else "the manifest"
        hint = (
            " (shard.include_brightfield needs brightfield channels in the manifest)"
            if set(missing) <= set(BRIGHTFIELD_CHANNELS)
            else " (set data.channels to channels the manifest has, or rediscover with those channels)"
        )
        raise ValueError(
            f"shard: channels {missing} are not in the manifest: {where} has {list(manifest_channels)}{hint}"
        )
    return channels


def rebuild_reason(side: dict | None, fingerprint: str) -> str | None:
    """Why a shard must be (re)built despite its sidecar (None: it is complete and reusable)."""
    if side is None:
        return "no complete shard"
    if side.get("plan_sha256") != fingerprint or side.get("version") != SHARD_FORMAT_VERSION:
        return "stale (another plan)"
    skipped = side.get("skipped") or []
    transient = sum(1 for s in skipped if s.get("kind") == "transient")
    if transient:
        return f"{transient} field(s) skipped by storage errors (transient): retrying them"
    unclassified = sum(1 for s in skipped if s.get("kind") not in ("missing", "corrupt"))
    if unclassified:  # an older writer did not record why: the skips may have been transient
        return f"{unclassified} skipped field(s) without a skip kind (older writer): retrying them"
    return None


def plan_order(field_ids: Sequence[str]) -> list[int]:
    """Row indices in shard order: by sha256 of the field_id (stable across reruns and manifest row orders)."""
    keys = [hashlib.sha256(f"dinocell-shard-plan:{fid}".encode()).digest() for fid in field_ids]
    return sorted(range(len(field_ids)), key=lambda i: (keys[i], field_ids[i]))


def plan_fingerprint(
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


@dataclass(frozen=True)
class ShardPlan:
    """Manifest rows in shard order, cut into shards of `per_shard` fields (the last one may hold fewer)."""

    order: list[int]
    per_shard: int

    @property
    def n_shards(self) -> int:
        return -(-len(self.order) // self.per_shard)

    @property
    def names(self) -> list[str]:
        return [shard_name(i) for i in range(self.n_shards)]

    def rows(self, i: int) -> list[int]:
        """The manifest rows of shard `i`, in tar order."""
        return self.order[i * self.per_shard : (i + 1) * self.per_shard]

    def first_key(self, i: int) -> int:
        """Plan position of shard `i`'s first field (a field's tar key is its plan position)."""
        return i * self.per_shard


def probe_shape(loader, manifest: Manifest, order: Sequence[int]) -> list[int]:
    """Shape [C, H, W] of the first loadable field of the plan (it sets how many fields fill a shard)."""
    reasons = []
    for i in order[:PROBE_FIELDS]:
        rec = manifest.record(i)
        fields, errors = loader.load_many([rec], on_error="skip")
        if fields:
            return [int(x) for x in fields[0].image.shape]
        reasons.extend(f"{fid}: {why}" for fid, why in errors)
    raise ShardBuildError(
        f"shard: none of the first {min(len(order), PROBE_FIELDS)} fields of the plan could be loaded:\n  "
        + "\n  ".join(reasons)
    )


def existing_sidecars(out_prefix: str, names: Sequence[str]) -> dict[str, dict]:
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
