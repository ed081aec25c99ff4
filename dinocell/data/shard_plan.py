"""The shard plan of `dinocell shard`: which channels, which fields in which shard, the field shape, and which shards
an earlier run already finished.

The plan is deterministic, so a rerun reproduces it: the split's fields are ordered by sha256 of their field_id (a
fixed pseudo-random order, independent of the manifest's row order, that spreads plates across shards so each shard
is already a random sample of the dataset), then cut into shards of `target_bytes // field_bytes` fields. The field
shape comes from loading the first loadable field of the plan; a field of any other shape is skipped and listed.
Each shard's content is summed up by a fingerprint (its fields, channels, shape, preprocessing, split) that its
sidecar records: a shard whose sidecar matches the plan and whose tar has the recorded size is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from dinocell import storage
from dinocell.channels import BRIGHTFIELD_CHANNELS, FLUORESCENT_CHANNELS
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
    "shard_channels",
]

PROBE_FIELDS = 16  # how many fields the planner tries before giving up on finding the field shape


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
