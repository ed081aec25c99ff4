"""`dinocell publish`: a checkpoint's teacher backbone as an immutable, verifiable, versioned model folder.

    <dest>/<name>/<version>/model.safetensors   backbone, official DINOv3 key layout (safetensors metadata format=pt)
                            config.json         architecture, channels, normalisation, crop sizes, provenance
                            metrics.json        the evaluation metrics (only when --metrics is given; copied verbatim)
                            README.md           model card
                            manifest.json       sha256 + size of every file above (written after them)
    <dest>/<name>/latest                        {"version", "manifest_sha256"} (written last)

Order of operations: build every file locally; if the version already has a manifest, compare (identical: no-op
success; different: PublishError naming the files that differ); upload the files, manifest.json last; read every file
back and check its hash; only then move the `latest` pointer. A crash leaves at worst a version folder without a
manifest (not a published version: the next publish of that version replaces it) or a complete version that
`latest` does not point at yet. Files are deterministic (no timestamps), so republishing the same checkpoint with
the same metrics is recognised as identical. Two publishers racing on the same new version are not arbitrated.

`latest` names the most recently published version (not the highest version number).

Source: a checkpoint file, or a run's checkpoint directory (holding `latest.json`), resolved here by
CheckpointManager.resolve(): the newest checkpoint that verifies and loads. config.json's provenance, the model card
and the summary name exactly that checkpoint (file and iteration) and list the newer ones passed over, with why
(corrupt, truncated, unreadable record). A read that fails after the storage layer's retries is an error
(CheckpointUnreadable), never a silent fall back to an older checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dinocell import storage
from dinocell.eval.checkpoint_reader import BackboneInfo, load_backbone
from dinocell.log import get_logger
from dinocell.model.published import (
    CONFIG_NAME,
    LATEST_NAME,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    WEIGHTS_NAME,
    sha256_hex,
)
from dinocell.publish.modelcard import render_model_card

__all__ = ["CARD_NAME", "METRICS_NAME", "PublishError", "PublishResult", "build_release", "publish_checkpoint"]

log = get_logger(__name__)

CARD_NAME = "README.md"
METRICS_NAME = "metrics.json"
CONFIG_FORMAT = "dinocell-backbone"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class PublishError(RuntimeError):
    """Publishing refused or failed; the message names the destination and the reason."""


@dataclass
class PublishResult:
    uri: str  # the version folder
    name: str
    version: str
    files: dict[str, dict] = field(default_factory=dict)  # file name -> {"sha256", "size"} (manifest excluded)
    manifest_sha256: str = ""
    noop: bool = False  # the version already held identical content: nothing was written
    latest_uri: str = ""
    source: str = ""  # exactly the checkpoint that was published
    passed_over: list[dict] = field(default_factory=list)  # newer checkpoints not used: {"checkpoint", "reason"}

    def summary(self) -> str:
        head = (f"{self.name} {self.version}: already published with identical content at {self.uri} (no-op)"
                if self.noop else f"published {self.name} {self.version} at {self.uri} (latest -> {self.version})")
        lines = [head, f"  from {self.source}"]
        lines += [f"  passed over newer {p['checkpoint']}: {p['reason']}" for p in self.passed_over]
        for name, entry in self.files.items():
            lines.append(f"  {name:<18} {entry['size']:>12,} B  sha256 {entry['sha256']}")
        return "\n".join(lines)


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value) or value in (LATEST_NAME,) or ".." in value:
        raise PublishError(
            f"publish: {what} {value!r} must be letters, digits and . _ + - (starting with a letter or digit), "
            f"and not {LATEST_NAME!r}"
        )
    return value


# ----------------------------------------------------------------------------------------------- building


def _resolve_source(checkpoint_uri) -> tuple[object, list[dict]]:
    """(what load_backbone takes, newer checkpoints passed over). A run's checkpoint directory is resolved to the
    exact checkpoint loaded (its state, so the bytes verified are the bytes published)."""
    from dinocell.train.checkpoint import POINTER_NAME, CheckpointManager

    uri = str(checkpoint_uri)
    if not storage.exists(storage.join(uri, POINTER_NAME)):  # a file (or a published folder): load_backbone reads it
        return uri, []
    found = CheckpointManager(uri).resolve()
    if found is None:
        raise PublishError(f"publish: {uri} holds {POINTER_NAME} but no committed checkpoint")
    passed = [{"checkpoint": u, "reason": why} for u, why in found.passed_over]
    if passed:
        log.warning("publish: %s: publishing %s (iteration %d); passed over %s", uri, found.uri, found.iteration,
                    passed)
    return (found.state, found.uri), passed


def _config_json(model, info: BackboneInfo, which: str, fallback_cfg, passed_over=()) -> dict:
    """config.json: what a user needs to rebuild and feed the model, and where it came from."""
    channels = info.channels
    if channels is None and fallback_cfg is not None:
        channels = list(fallback_cfg.data.channels)
    crops = {"global": info.global_size, "local": info.local_size}
    if info.global_size is None and fallback_cfg is not None:
        crops = {"global": fallback_cfg.augment.global_size, "local": fallback_cfg.augment.local_size}
    data = {}
    if info.config and isinstance(info.config.get("data"), dict):
        d = info.config["data"]
        data = {k: d.get(k) for k in ("images_prefix", "load_data", "batches", "plates", "val_plates",
                                       "val_fraction", "max_fields", "manifest") if k in d}
    state = model.state_dict()
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})
    return {
        "format": CONFIG_FORMAT,
        "format_version": 1,
        "architecture": info.arch,
        "key_layout": "dinov3",
        "patch_size": info.patch_size,
        "in_chans": info.in_chans,
        "embed_dim": info.embed_dim,
        "depth": info.depth,
        "num_heads": info.num_heads,
        "mlp_ratio": info.mlp_ratio,
        "n_storage_tokens": info.n_storage_tokens,
        "untie_cls_and_patch_norms": info.untie_cls_and_patch_norms,
        # what the CLS output is: the final norm's, or with the DINO head's input BatchNorm folded in
        "cls_space": info.cls_space,
        "patch_embed_shape": list(state["patch_embed.proj.weight"].shape),
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": ",".join(dtypes),
        "channels": channels or [],
        "input": "each channel is one grey plane: uint8 x -> (x / 255 - mean) / std",
        "normalisation": {"mean": info.norm_mean, "std": info.norm_std, "scale": 255},
        "crop_sizes": crops,
        "provenance": {
            "checkpoint": info.source,
            "section": which if info.kind == "training" else info.section,
            "iteration": info.iteration,
            "initial_weights": info.pretrained,
            "seed": info.seed,
            "data": data,
            # newer checkpoints of the run that were not published, and why (empty: this is the newest)
            "passed_over": list(passed_over),
        },
    }


def _safetensors_bytes(model) -> bytes:
    from safetensors.torch import save

    # contiguous private copies: safetensors refuses views / shared storage
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return save(state, metadata={"format": "pt"})


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def build_release(
    checkpoint_uri, name: str, version: str, metrics_uri: str | None = None, which: str = "teacher", fallback_cfg=None
) -> tuple[dict[str, bytes], BackboneInfo]:
    """The files of a release (name -> bytes, manifest.json included) and what was loaded."""
    source, passed_over = _resolve_source(checkpoint_uri)
    if isinstance(source, tuple):  # a run directory resolved to (state, the exact checkpoint URI)
        state, exact = source
        model, info = load_backbone(state, which=which, in_chans=None)
        info = dataclasses.replace(info, source=exact)
    else:  # in_chans=None: publish the channel count the model was trained with
        model, info = load_backbone(source, which=which, in_chans=None)
    config = _config_json(model, info, which, fallback_cfg, passed_over)
    metrics_bytes = metrics = None
    if metrics_uri:
        metrics_bytes = storage.read_bytes(metrics_uri)
        try:
            metrics = json.loads(metrics_bytes)
        except (ValueError, UnicodeDecodeError) as e:
            raise PublishError(f"publish: metrics {metrics_uri} is not valid JSON: {e}") from e
        if not isinstance(metrics, dict):
            raise PublishError(f"publish: metrics {metrics_uri} must hold a JSON object, got {type(metrics).__name__}")
    files: dict[str, bytes] = {
        WEIGHTS_NAME: _safetensors_bytes(model),
        CONFIG_NAME: _json_bytes(config),
    }
    if metrics_bytes is not None:
        files[METRICS_NAME] = metrics_bytes  # verbatim: the evaluation's own file
    files[CARD_NAME] = render_model_card(name, version, config, metrics).encode()
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "name": name,
        "version": version,
        "files": {n: {"sha256": sha256_hex(b), "size": len(b)} for n, b in files.items()},
    }
    files[MANIFEST_NAME] = _json_bytes(manifest)
    return files, info


# ----------------------------------------------------------------------------------------------- publishing


def _existing_manifest(version_uri: str) -> dict | None:
    uri = storage.join(version_uri, MANIFEST_NAME)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri))
    except (ValueError, UnicodeDecodeError) as e:
        raise PublishError(f"publish: {uri} exists but is not valid JSON ({e}); refusing to touch that version") from e


def _verify_remote(version_uri: str, entries: dict[str, dict]) -> None:
    """Read every file back and compare with the manifest entries."""
    for fname, entry in entries.items():
        uri = storage.join(version_uri, fname)
        try:
            data = storage.read_bytes(uri)
        except storage.StorageError as e:
            raise PublishError(f"publish: read-back of {uri} failed: {e}") from e
        if len(data) != entry["size"] or sha256_hex(data) != entry["sha256"]:
            raise PublishError(
                f"publish: read-back of {uri} does not match what was written ({len(data)} B sha256 "
                f"{sha256_hex(data)[:16]}..., expected {entry['size']} B sha256 {entry['sha256'][:16]}...)"
            )


def _diff(old: dict, new: dict) -> list[str]:
    old_files, new_files = old.get("files", {}), new.get("files", {})
    out = []
    for fname in sorted(set(old_files) | set(new_files)):
        if fname not in old_files:
            out.append(f"{fname} (new file)")
        elif fname not in new_files:
            out.append(f"{fname} (only in the published version)")
        elif old_files[fname] != new_files[fname]:
            out.append(f"{fname} (sha256 {old_files[fname].get('sha256', '?')[:12]}... published, "
                       f"{new_files[fname]['sha256'][:12]}... now)")
    for key in sorted(set(old) | set(new)):
        if key != "files" and old.get(key) != new.get(key):
            out.append(f"manifest field {key!r} ({old.get(key)!r} published, {new.get(key)!r} now)")
    return out


def publish_checkpoint(
    checkpoint_uri,
    dest_prefix: str,
    name: str,
    version: str,
    metrics_uri: str | None = None,
    which: str = "teacher",
    fallback_cfg=None,
) -> PublishResult:
    """Publish the `which` backbone of a checkpoint to `<dest_prefix>/<name>/<version>/` (module docstring).

    fallback_cfg: a Config whose data.channels / augment crop sizes fill config.json when the checkpoint carries no
    config (an official plain state dict).
    """
    _check_name(name, "name")
    _check_name(version, "version")
    model_uri = storage.join(str(dest_prefix).rstrip("/"), name)
    version_uri = storage.join(model_uri, version)
    latest_uri = storage.join(model_uri, LATEST_NAME)

    files, info = build_release(checkpoint_uri, name, version, metrics_uri, which, fallback_cfg)
    manifest_bytes = files[MANIFEST_NAME]
    manifest = json.loads(manifest_bytes)
    result = PublishResult(uri=version_uri, name=name, version=version, files=manifest["files"],
                           manifest_sha256=sha256_hex(manifest_bytes), latest_uri=latest_uri, source=info.source,
                           passed_over=json.loads(files[CONFIG_NAME])["provenance"]["passed_over"])

    existing = _existing_manifest(version_uri)
    if existing is not None:
        differences = _diff(existing, manifest)
        if differences:
            raise PublishError(
                f"publish: {version_uri} is already published with different content and published versions are "
                f"immutable; publish under a new version. Differences: " + "; ".join(differences)
            )
        _verify_remote(version_uri, manifest["files"])
        log.info("%s already holds identical content: nothing to do", version_uri)
        result.noop = True
        return result

    leftovers = [o.uri for o in storage.list_objects(version_uri.rstrip("/") + "/")]
    if leftovers:
        log.warning("%s has %d file(s) but no %s (an interrupted publish?): replacing them", version_uri,
                    len(leftovers), MANIFEST_NAME)

    with tempfile.TemporaryDirectory(prefix="dinocell-publish-") as tmp:
        order = [n for n in files if n != MANIFEST_NAME] + [MANIFEST_NAME]  # the manifest commits the version
        for fname in order:
            local = Path(tmp, fname)
            local.write_bytes(files[fname])
            storage.upload_file(local, storage.join(version_uri, fname))
    _verify_remote(version_uri, {**manifest["files"], MANIFEST_NAME: {"sha256": result.manifest_sha256,
                                                                      "size": len(manifest_bytes)}})
    storage.write_bytes(latest_uri, _json_bytes({"version": version, "manifest_sha256": result.manifest_sha256}))
    log.info("published %s", version_uri)
    return result

