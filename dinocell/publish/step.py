"""The publish step's one entry: `publish(...)`, called by `dinocell publish`, the KFP component and the demo."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dinocell.config.step_args import configure_storage, load_step_config

__all__ = ["PublishOutcome", "publish"]


@dataclass
class PublishOutcome:
    uri: str
    name: str
    version: str
    manifest_sha256: str
    files: dict = field(default_factory=dict)
    noop: bool = False
    summary: str = ""
    source: str = ""  # exactly the checkpoint published
    passed_over: list = field(default_factory=list)  # newer checkpoints not used: {"checkpoint", "reason"}

    def metadata(self) -> dict:
        return {"name": self.name, "version": self.version, "manifest_sha256": self.manifest_sha256,
                "noop": self.noop, "files": sorted(self.files), "source": self.source,
                "passed_over": list(self.passed_over)}


def publish(
    checkpoint_uri: str,
    *,
    dest_prefix: str,
    name: str,
    version: str,
    metrics_uri: str = "",
    config: str = "",
    overrides: Any = (),
    verify: bool = True,
    endpoint_url: str = "",
    anonymous: bool | None = None,
) -> PublishOutcome:
    """Publish the checkpoint's teacher backbone as `<dest_prefix>/<name>/<version>/`, then load it back once
    (`dinocell.load_pretrained`, hashes verified) when `verify`."""
    from dinocell.publish.publish import publish_checkpoint

    cfg = load_step_config(config, overrides, endpoint_url, anonymous) if config else None
    if cfg is None:
        configure_storage(endpoint_url, anonymous)
    result = publish_checkpoint(checkpoint_uri, dest_prefix, name, version, metrics_uri=metrics_uri or None, fallback_cfg=cfg)
    if verify:
        from dinocell.model.published import load_pretrained

        load_pretrained(result.uri)
    return PublishOutcome(uri=result.uri, name=result.name, version=result.version,
                          manifest_sha256=result.manifest_sha256, files=dict(result.files), noop=result.noop,
                          summary=result.summary(), source=result.source, passed_over=list(result.passed_over))
