"""Reading a model published by `dinocell publish`: `load_pretrained(uri)` (also `dinocell.load_pretrained`).

A published version is a folder `<dest>/<name>/<version>/` holding `model.safetensors` (the backbone in the official
DINOv3 key layout), `config.json` (architecture, channels, normalisation), `README.md` (model card), optionally
`metrics.json`, and `manifest.json` listing the sha256 and size of every other file. `<dest>/<name>/latest` is a
small JSON pointer {"version", "manifest_sha256"} to the most recently published version.

`uri` may be the version folder or the model folder (then `latest` is followed and the manifest's own hash is
checked against the pointer). With verify=True every file listed in the manifest is read and checked; a file that
is missing or differs raises PublishedModelError naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import Tensor

from dinocell import storage
from dinocell.model.pretrained import LoadReport, load_dinov3_checkpoint
from dinocell.model.vit import DinoVisionTransformer

__all__ = [
    "CONFIG_NAME",
    "LATEST_NAME",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "PublishedModel",
    "PublishedModelError",
    "build_published",
    "load_pretrained",
    "read_published",
    "resolve_published",
    "sha256_hex",
]

MANIFEST_NAME = "manifest.json"
LATEST_NAME = "latest"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MANIFEST_FORMAT = "dinocell-published-model"
MANIFEST_VERSION = 1


class PublishedModelError(ValueError):
    """A published model is missing, incomplete or altered; the message names the URI and the file."""


@dataclass
class PublishedModel:
    uri: str  # the version folder
    manifest: dict
    config: dict
    state_dict: dict[str, Tensor]

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", ""))

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", ""))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(uri: str, what: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except storage.StorageError as e:
        raise PublishedModelError(f"{what}: cannot read {uri}: {e}") from e


def _json(data: bytes, uri: str) -> dict:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise PublishedModelError(f"{uri} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise PublishedModelError(f"{uri}: expected a JSON object, got {type(obj).__name__}")
    return obj


def resolve_published(uri: str) -> tuple[str, str | None]:
    """(version folder URI, manifest sha256 expected by the `latest` pointer or None) for a version or model URI."""
    uri = str(uri).rstrip("/")
    if storage.exists(storage.join(uri, MANIFEST_NAME)):
        return uri, None
    pointer_uri = storage.join(uri, LATEST_NAME)
    if not storage.exists(pointer_uri):
        raise PublishedModelError(
            f"no published model at {uri}: neither {MANIFEST_NAME} (a version folder) nor {LATEST_NAME} (a model "
            f"folder) is there"
        )
    pointer = _json(_read(pointer_uri, "latest pointer"), pointer_uri)
    version = pointer.get("version")
    if not isinstance(version, str) or not version or "/" in version or version in (".", ".."):
        raise PublishedModelError(f"{pointer_uri}: 'version' must be a plain version name, got {version!r}")
    target = storage.join(uri, version)
    if not storage.exists(storage.join(target, MANIFEST_NAME)):
        raise PublishedModelError(f"{pointer_uri} points at version {version!r}, but {target} has no {MANIFEST_NAME}")
    return target, pointer.get("manifest_sha256")


def read_published(uri: str, verify: bool = True) -> PublishedModel:
    """Read (and with verify=True check every file of) a published model; see the module docstring."""
    from safetensors.torch import load as load_safetensors

    version_uri, expected_manifest_sha = resolve_published(uri)
    manifest_uri = storage.join(version_uri, MANIFEST_NAME)
    manifest_bytes = _read(manifest_uri, "manifest")
    if verify and expected_manifest_sha and sha256_hex(manifest_bytes) != expected_manifest_sha:
        raise PublishedModelError(
            f"{manifest_uri}: sha256 {sha256_hex(manifest_bytes)} differs from the one recorded by the latest "
            f"pointer ({expected_manifest_sha}): the manifest was altered after publishing"
        )
    manifest = _json(manifest_bytes, manifest_uri)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise PublishedModelError(f"{manifest_uri}: not a dinocell published-model manifest (format "
                                  f"{manifest.get('format')!r}, expected {MANIFEST_FORMAT!r})")
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS_NAME not in files or CONFIG_NAME not in files:
        raise PublishedModelError(f"{manifest_uri}: 'files' must list at least {WEIGHTS_NAME} and {CONFIG_NAME}")

    wanted = list(files) if verify else [WEIGHTS_NAME, CONFIG_NAME]
    contents: dict[str, bytes] = {}
    for name in wanted:
        file_uri = storage.join(version_uri, name)
        data = _read(file_uri, f"file {name} listed in {manifest_uri}")
        if verify:
            entry = files[name]
            if len(data) != entry.get("size"):
                raise PublishedModelError(
                    f"{file_uri}: size {len(data)} bytes differs from {entry.get('size')} in {MANIFEST_NAME}: "
                    f"{name} was altered or truncated after publishing"
                )
            digest = sha256_hex(data)
            if digest != entry.get("sha256"):
                raise PublishedModelError(
                    f"{file_uri}: sha256 {digest} differs from {entry.get('sha256')} in {MANIFEST_NAME}: "
                    f"{name} was altered after publishing"
                )
        contents[name] = data
    config = _json(contents[CONFIG_NAME], storage.join(version_uri, CONFIG_NAME))
    try:
        state = load_safetensors(contents[WEIGHTS_NAME])
    except Exception as e:  # safetensors raises its own (Rust-side) error types
        raise PublishedModelError(
            f"{storage.join(version_uri, WEIGHTS_NAME)}: not a readable safetensors file: {e}"
        ) from e
    return PublishedModel(uri=version_uri, manifest=manifest, config=config, state_dict=state)


_ARCH_FIELDS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "n_storage_tokens")


def build_published(published: PublishedModel, in_chans: int | None = None) -> tuple[DinoVisionTransformer, LoadReport]:
    """The backbone described by config.json with the published weights (strict key and shape check).

    in_chans=1 folds a 3-channel kernel (grey input); None keeps the published channel count.
    """
    cfg = published.config
    missing = [k for k in _ARCH_FIELDS if k not in cfg]
    if missing:
        raise PublishedModelError(f"{storage.join(published.uri, CONFIG_NAME)}: missing architecture fields {missing}")
    kwargs = {k: cfg[k] for k in _ARCH_FIELDS}
    # optional: versions published before the untied CLS norm existed have tied norms
    kwargs["untie_cls_and_patch_norms"] = bool(cfg.get("untie_cls_and_patch_norms", False))
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    # an inference model: no drop path, no RoPE rescaling (the teacher's settings)
    model = DinoVisionTransformer(**kwargs, drop_path_rate=0.0, rope_rescale=None)
    try:
        report = load_dinov3_checkpoint(model, published.state_dict, strict=True)
    except ValueError as e:
        raise PublishedModelError(f"{storage.join(published.uri, WEIGHTS_NAME)} does not fit config.json: {e}") from e
    report.source = storage.join(published.uri, WEIGHTS_NAME)
    return model, report


def load_pretrained(uri: str, device: str | torch.device = "cpu", verify: bool = True) -> DinoVisionTransformer:
    """The published backbone at `uri` (version or model folder), hashes verified, in eval mode on `device`.

    The model's `published` attribute holds {"uri", "name", "version", "config"} (channels, normalisation: feed
    each channel as one grey plane, x / 255 normalised with config["normalisation"]).
    """
    published = read_published(uri, verify=verify)
    model, _ = build_published(published)
    model.published = {
        "uri": published.uri,
        "name": published.name,
        "version": published.version,
        "config": published.config,
    }
    return model.to(device).eval()
