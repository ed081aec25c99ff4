"""Content-addressed locations of the data steps' outputs, so a rerun with the same inputs reuses them.

The field manifest and the shards depend on what they are made from, not on which run made them: their prefixes
under `<output_root>/data/` are named by a hash of their real inputs, and the discover / shard tasks take no per-run
value (run name, KFP job id). Two runs with the same inputs then hand KFP identical task inputs (its cache hits and
the tasks are skipped), and where the cache misses (another training override, the cache cleared) the shard step
finds its complete shard set at the same prefix and reuses it shard by shard (dinocell.data.shards: finished shards
are skipped, and counted as `reused`).

- discovery key: the resolved `data` section (after overrides), the images prefix / load_data arguments, the
  discovery mode and the storage endpoint settings the source is read with;
- shard key: the sha256 of the manifest's bytes (a changed bucket gives another manifest, hence other shards), and
  the resolved `preprocess` and `shard` sections.
Fields that only say where to write or how fast (data.manifest, data.list_workers, shard.output, shard.workers) stay
out, and the package version goes in (another release may discover or preprocess differently).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from dinocell import storage
from dinocell._version import __version__
from dinocell.config.step_args import StepError, load_step_config, str_list

__all__ = ["KEY_CHARS", "content_key", "discovery_key", "file_sha256", "manifest_uri", "shard_key", "shards_prefix"]

KEY_CHARS = 16  # 64 bits of sha256: collisions are not a concern at the number of datasets one output root holds
DATA_DIR = "data"
_NOT_CONTENT = {"data": ("manifest", "list_workers"), "shard": ("output", "workers")}


def content_key(what: str, payload: Mapping[str, Any]) -> str:
    """A short hex digest of `payload` (canonical JSON, keys sorted) for the output kind `what`."""
    blob = json.dumps({"what": what, "dinocell": __version__, **payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_CHARS]


def _section(cfg, name: str) -> dict:
    out = cfg.to_dict()[name]
    for key in _NOT_CONTENT.get(name, ()):
        out.pop(key, None)
    return out


def _source_storage(cfg) -> dict:
    st = cfg.storage.resolved()
    return {"endpoint_url": st.endpoint_url or "", "anonymous": bool(st.anonymous), "buckets": st.buckets}


def discovery_key(config: str, overrides: Any = (), *, images_prefix: str = "", load_data: Any = (),
                  mode: str = "auto", endpoint_url: str = "", anonymous: bool | None = None) -> str:
    """The key of the manifest that `dinocell.jump.step.discover` makes from these arguments."""
    cfg = load_step_config(config, overrides, endpoint_url, anonymous)
    return content_key("discover", {
        "data": _section(cfg, "data"), "images_prefix": images_prefix,
        "load_data": str_list(load_data, "load_data"), "mode": mode, "storage": _source_storage(cfg)})


def file_sha256(uri: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with contextlib.closing(storage.open_read(uri)) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_key(config: str, overrides: Any = (), *, manifest_uri: str, endpoint_url: str = "",
              anonymous: bool | None = None) -> str:
    """The key of the shard set that `dinocell.data.step.shard` makes from this manifest and config."""
    cfg = load_step_config(config, overrides, endpoint_url, anonymous)
    return content_key("shard", {"manifest_sha256": file_sha256(manifest_uri),
                                 "preprocess": _section(cfg, "preprocess"), "shard": _section(cfg, "shard")})


def _data_dir(output_root: str) -> str:
    if not output_root:
        raise StepError("output_root is empty: give the object-storage prefix (or local directory) runs write to")
    return storage.join(output_root, DATA_DIR)


def manifest_uri(output_root: str, key: str) -> str:
    """`<output_root>/data/manifest-<key>/manifest.parquet` (its summary JSON lands next to it)."""
    return storage.join(_data_dir(output_root), f"manifest-{key}", "manifest.parquet")


def shards_prefix(output_root: str, key: str) -> str:
    """`<output_root>/data/shards-<key>` (tar shards, sidecars, index.json)."""
    return storage.join(_data_dir(output_root), f"shards-{key}")
