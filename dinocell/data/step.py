"""The shard step's one entry: `shard(...)`, called by `dinocell shard`, the KFP component and the demo."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from dinocell import storage
from dinocell.config.step_args import StepError, load_step_config
from dinocell.log import get_logger

__all__ = ["ShardOutcome", "shard"]

log = get_logger("shard")


@dataclass
class ShardOutcome:
    index_uri: str
    totals: dict
    written: int
    reused: int
    summary_text: str = ""
    skipped_by_kind: dict = field(default_factory=dict)  # {"transient", "missing", "corrupt"} -> fields
    channels: list = field(default_factory=list)

    def metadata(self) -> dict:
        return {**self.totals, "written": self.written, "reused": self.reused,
                **{f"skipped_{k}": n for k, n in self.skipped_by_kind.items()}}


def shard(
    config: str = "",
    overrides: Any = (),
    *,
    manifest_uri: str = "",
    shards_prefix: str = "",
    split: str = "",
    endpoint_url: str = "",
    anonymous: bool | None = None,
) -> ShardOutcome:
    """Preprocess the manifest's training split (or `split`) into tar shards under `shards_prefix` (resumes a
    partial set; rebuilds shards whose skips were transient storage errors). Defaults: the config's `data.manifest`,
    `shard.output` and `shard.split`. The shards hold exactly `data.channels`, in that order (empty: the manifest's
    channels); a configured channel the manifest lacks is a StepError naming it and the manifest."""
    from dinocell.data.shards import INDEX_NAME, write_shards
    from dinocell.jump.manifest import Manifest

    cfg = load_step_config(config, overrides, endpoint_url, anonymous)
    manifest_uri = manifest_uri or cfg.data.manifest
    shards_prefix = shards_prefix or cfg.shard.output
    if not manifest_uri:
        raise StepError("shard: no field manifest: give --manifest (manifest_uri) or set data.manifest")
    if not shards_prefix:
        raise StepError("shard: no output prefix: give --out (shards_prefix) or set shard.output")
    if split:
        cfg.shard.split = split
    manifest = Manifest.read(manifest_uri)
    t0 = time.perf_counter()
    try:
        index = write_shards(manifest, shards_prefix, cfg.shard, cfg.preprocess, channels=cfg.data.channels,
                             manifest_uri=manifest_uri)
    except ValueError as e:  # a request that cannot be met (channels, split, ...): one line for the CLI
        raise StepError(str(e)) from e
    index_uri = storage.join(shards_prefix, INDEX_NAME)
    totals = index.totals()
    log.info("shard: %s in %.1fs -> %s", totals, time.perf_counter() - t0, index_uri)
    return ShardOutcome(index_uri=index_uri, totals=totals, written=len(index.written), reused=len(index.reused),
                       summary_text=index.format_summary(), skipped_by_kind=index.skipped_by_kind(),
                       channels=list(index.channels))
