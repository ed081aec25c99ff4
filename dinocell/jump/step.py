"""The discover step's one entry: `discover(...)`, called by `dinocell discover`, the KFP component and the demo."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dinocell.config.step_args import StepError, load_step_config, str_list
from dinocell.log import get_logger

__all__ = ["DiscoverOutcome", "discover"]

log = get_logger("discover")


@dataclass
class DiscoverOutcome:
    manifest_uri: str
    summary_uri: str
    n_fields: int
    fields_per_split: dict
    excluded: int
    summary_text: str

    def metadata(self) -> dict:
        return {"n_fields": self.n_fields, "fields_per_split": self.fields_per_split, "excluded": self.excluded,
                "summary_uri": self.summary_uri}

    def markdown(self) -> str:
        return f"# Field discovery\n\nManifest: `{self.manifest_uri}`\n\n```\n{self.summary_text.rstrip()}\n```\n"


def discover(
    config: str = "",
    overrides: Any = (),
    *,
    manifest_uri: str = "",
    images_prefix: str = "",
    load_data: Any = (),
    mode: str = "auto",
    endpoint_url: str = "",
    anonymous: bool | None = None,
) -> DiscoverOutcome:
    """Find the fields of the source and write the manifest (+ `<manifest>.summary.json`).

    `manifest_uri` defaults to the config's `data.manifest`; `images_prefix` / `load_data` override `data.*`.
    """
    from dinocell.jump.discover import discover_fields, write_discovery

    cfg = load_step_config(config, overrides, endpoint_url, anonymous)
    manifest_uri = manifest_uri or cfg.data.manifest
    if not manifest_uri:
        raise StepError("discover: no manifest URI: give --out (manifest_uri) or set data.manifest")
    if images_prefix:
        cfg.data.images_prefix = images_prefix if images_prefix.endswith("/") else images_prefix + "/"
    csvs = str_list(load_data, "load_data")
    if csvs:
        cfg.data.load_data = csvs
    t0 = time.perf_counter()
    result = discover_fields(cfg.data, mode=mode)
    n = len(result.manifest)
    if n == 0:
        raise StepError(
            f"discover: no usable field under {cfg.data.images_prefix} (load_data: {cfg.data.load_data or 'none'}); "
            f"excluded {result.summary.get('excluded_total', 0)}: {result.summary.get('excluded_by_reason', {})}"
        )
    summary_uri = write_discovery(result, manifest_uri)
    log.info("discover: %d fields -> %s in %.1fs", n, manifest_uri, time.perf_counter() - t0)
    return DiscoverOutcome(
        manifest_uri=manifest_uri,
        summary_uri=summary_uri,
        n_fields=n,
        fields_per_split=dict(result.summary.get("fields_per_split", {})),
        excluded=int(result.summary.get("excluded_total", 0)),
        summary_text=result.format_summary(),
    )
