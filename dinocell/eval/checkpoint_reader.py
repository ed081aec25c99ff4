"""One adapter from "a checkpoint" to "a backbone ready to embed images": `load_backbone` and `load_init_backbone`.

Accepted sources (a URI may be a local path or s3://):
- a training checkpoint of this project (`ckpt-N.pt` written by the trainer's CheckpointManager, or the same dict in
  memory): `{"teacher": {...}, "config": cfg.to_dict(), "iteration": N, ...}`. The backbone is built from the stored
  config (`model` section, teacher settings: no drop path, no RoPE rescaling) and gets the teacher's weights. The
  teacher section may be flat (`backbone.*`, `dino_head.*`, ... as `nn.ModuleDict.state_dict()` writes it) or nested
  (`{"backbone": {...}, ...}`). A checkpoint whose integrity record (`ckpt-N.pt.json`) is present is verified
  (sha256) on the way in;
- a run's checkpoint directory (holding `latest.json`): its newest checkpoint that verifies;
- a model published by `dinocell publish` (`<dest>/<name>/<version>` or `<dest>/<name>`): hashes verified;
- an official-layout plain backbone state dict (the released `dinov3_vits16_pretrain_*.pth`, or any `.safetensors`
  with those keys): the architecture is inferred from the shapes (patch size and input channels from the patch kernel,
  width from `cls_token`, depth from the block count, heads from `rope_embed.periods` (head_dim = 4 x its length) or
  else head_dim 64 as in every DINOv3 ViT, MLP ratio from `fc1`, registers from `storage_tokens`).

A training checkpoint whose DINO head has an input BatchNorm (`model.head_bn`) is read with that BatchNorm folded into
the backbone's untied CLS norm (dinocell.model.cls_fold): the CLS then is the per-dimension standardised space the
prototypes scored, which is what the run trained; `fold_head_norm=False` reads the raw CLS. Patch tokens are the same
either way. BackboneInfo.cls_space says which one was loaded, and a published model keeps the fold.

`in_chans=1` (what the evaluation asks for: every view is one grey plane) folds a 3-channel patch kernel by summing
its input channels, which is exactly the 3-channel model applied to the grey image repeated 3 times. The patch size
is kept as stored (an official patch-16 model is evaluated at patch 16).

The baseline ("init", `load_init_backbone`) is the weights the training run started from:
- the checkpoint config's `model.pretrained` when set (loaded as the trainer does: patch-resized and channel-folded
  into the configured architecture);
- else a random initialisation of the same architecture drawn right after `torch.manual_seed(train.seed)`: the
  trainer seeds torch with train.seed right before building SSLMetaArch, whose student backbone is the first module
  built and which the teacher copies, so this is exactly the run's initial teacher backbone (tested against
  SSLMetaArch). Should the trainer's build order change, it stays a random network of the same architecture;
- for an official plain state dict (no config): a random initialisation (seed 0) of the inferred architecture, since
  the file itself is what one would start from.
The global torch RNG is left as it was.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dinocell import storage
from dinocell.log import get_logger
from dinocell.model.cls_fold import CLS_SPACE_TIED, cls_space_of, fold_head_input_norm, head_input_norm_from_state
from dinocell.model.patch_adapt import InputNorm
from dinocell.model.pretrained import extract_backbone_state_dict, load_dinov3_checkpoint, read_checkpoint
from dinocell.model.vit import DinoVisionTransformer, build_vit

__all__ = ["DEFAULT_NORM", "BackboneInfo", "infer_architecture", "load_backbone", "load_init_backbone"]

log = get_logger(__name__)

# ImageNet mean/std averaged over RGB: what the released DINOv3 patch embedding saw (the augmentation's default).
DEFAULT_NORM = (0.449, 0.226)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt")


@dataclass
class BackboneInfo:
    """What was loaded and how to feed it; `to_dict()` is what reports and model cards show."""

    source: str  # URI / path, or "<dict>"
    kind: str  # "training" (this project's checkpoint), "plain" (official layout state dict), "published", "init"
    section: str  # checkpoint section used: "teacher", "student", "model", or "plain"
    arch: str  # builder name ("vit_small", ...), or "inferred" for a plain state dict
    patch_size: int
    in_chans: int  # of the built model
    stored_in_chans: int  # of the checkpoint's patch kernel (3 for the official file)
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    n_storage_tokens: int
    norm_mean: float
    norm_std: float
    norm_source: str  # "checkpoint config", "published config" or "default (ImageNet mean/std over RGB)"
    channels: list[str] | None = None  # channels the model was trained on (None: unknown)
    global_size: int | None = None
    local_size: int | None = None
    iteration: int | None = None
    pretrained: str = ""  # the run's starting weights ("" = random init)
    seed: int | None = None  # the run's seed (random-init baseline)
    load_summary: str = ""
    # the final norm's CLS, an untied cls_norm's, or with the head BatchNorm folded (dinocell.model.cls_fold)
    cls_space: str = CLS_SPACE_TIED
    config: dict | None = field(default=None, repr=False)  # the full stored config, when there is one

    def arch_kwargs(self, in_chans: int | None = None) -> dict:
        """Keyword arguments of DinoVisionTransformer for this architecture with teacher settings."""
        return {
            "patch_size": self.patch_size,
            "in_chans": self.in_chans if in_chans is None else in_chans,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "n_storage_tokens": self.n_storage_tokens,
            "untie_cls_and_patch_norms": self.untie_cls_and_patch_norms,
            "drop_path_rate": 0.0,
            "rope_rescale": None,
        }

    @property
    def untie_cls_and_patch_norms(self) -> bool:
        return self.cls_space != CLS_SPACE_TIED

    def to_dict(self, with_config: bool = False) -> dict:
        out = dataclasses.asdict(self)
        if not with_config:
            out.pop("config")
        return out


# ----------------------------------------------------------------------------------------------- architecture


def infer_architecture(state: Mapping[str, Tensor], origin: str) -> dict:
    """Architecture of an official-layout backbone state dict, from its shapes (see the module docstring)."""
    need = ("patch_embed.proj.weight", "cls_token", "blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(
            f"{origin}: not a DINOv3-layout backbone state dict: missing {missing} "
            f"(found {len(state)} keys, e.g. {sorted(state)[:5]})"
        )
    kernel = state["patch_embed.proj.weight"]
    if kernel.ndim != 4 or kernel.shape[-1] != kernel.shape[-2]:
        raise ValueError(f"{origin}: patch_embed.proj.weight must be [D, C, p, p], got {list(kernel.shape)}")
    embed_dim = int(state["cls_token"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_RE.match(k)))
    if "rope_embed.periods" in state:
        head_dim = 4 * int(state["rope_embed.periods"].numel())
    else:
        head_dim = 64  # every released DINOv3 ViT
    if embed_dim % head_dim:
        raise ValueError(f"{origin}: width {embed_dim} is not a multiple of the head dim {head_dim}")
    storage_tokens = state.get("storage_tokens")
    return {
        "patch_size": int(kernel.shape[-1]),
        "in_chans": int(kernel.shape[1]),
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": embed_dim // head_dim,
        "mlp_ratio": float(state["blocks.0.mlp.fc1.weight"].shape[0]) / embed_dim,
        "n_storage_tokens": 0 if storage_tokens is None else int(storage_tokens.shape[1]),
        "untie_cls_and_patch_norms": "cls_norm.weight" in state,
    }


def _info_from_model(model: DinoVisionTransformer, **kw) -> BackboneInfo:
    fc1 = model.blocks[0].mlp.fc1
    kw.setdefault("cls_space", cls_space_of(model))
    return BackboneInfo(
        patch_size=model.patch_size,
        in_chans=model.in_chans,
        embed_dim=model.embed_dim,
        depth=model.n_blocks,
        num_heads=model.num_heads,
        mlp_ratio=fc1.out_features / model.embed_dim,
        n_storage_tokens=model.n_storage_tokens,
        **kw,
    )


def _flat_section(obj: Mapping, which: str) -> dict:
    """A training checkpoint's section with flat keys (`backbone.*`, `dino_head.*`), whichever way it was stored."""
    section = obj[which]
    flat = {}
    for key, value in section.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


# ----------------------------------------------------------------------------------------------- sources


def _is_published(uri: str) -> bool:
    return storage.exists(storage.join(uri, "manifest.json")) or storage.exists(storage.join(uri, "latest"))


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(os.path.abspath(uri))


def _read_source(uri: str):
    """(checkpoint object, resolved URI) for a file or a run's checkpoint directory; verifies integrity records."""
    from dinocell.train.checkpoint import CheckpointManager

    if not uri.endswith(_FILE_SUFFIXES) and storage.exists(storage.join(uri, "latest.json")):
        found = CheckpointManager(uri).resolve()  # the newest checkpoint that verifies, and exactly which one
        if found is None:
            raise FileNotFoundError(f"{uri}: a checkpoint directory with latest.json but no committed checkpoint")
        for passed, why in found.passed_over:
            log.warning("checkpoint directory %s: passed over newer %s (%s)", uri, passed, why)
        log.info("checkpoint directory %s: using %s", uri, found.uri)
        return found.state, found.uri
    if uri.endswith(".safetensors"):
        return read_checkpoint(uri)[0], uri
    if not storage.exists(uri):
        raise FileNotFoundError(f"checkpoint not found: {uri}")
    # CheckpointManager.load verifies size + sha256 against <uri>.json when the trainer wrote one
    return CheckpointManager(_parent(uri)).load(uri), uri


def _section(obj: Mapping, which: str, origin: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(backbone state dict, the whole section with flat keys) of a training checkpoint's section (flat
    `backbone.*` or nested `backbone`)."""
    if not isinstance(obj.get(which), Mapping):
        present = [k for k in ("teacher", "student", "model") if isinstance(obj.get(k), Mapping)]
        raise ValueError(f"{origin}: no {which!r} section in the checkpoint (sections present: {present})")
    flat = _flat_section(obj, which)
    state, _, _, _ = extract_backbone_state_dict({which: flat}, which=which, origin=origin)
    return state, flat


def _training_info(config: dict, origin: str):
    """The Config of a checkpoint's stored config dict (validated as any config file)."""
    from dinocell.config import ConfigError, config_from_dict

    try:
        cfg = config_from_dict(config, source=f"{origin} (stored config)")
    except ConfigError as e:
        raise ValueError(f"{origin}: the stored training config does not fit this dinocell version: {e}") from e
    return cfg


# ----------------------------------------------------------------------------------------------- public


def load_backbone(
    uri_or_ckpt, which: str = "teacher", in_chans: int | None = 1, device: str | torch.device = "cpu",
    fold_head_norm: bool = True,
) -> tuple[DinoVisionTransformer, BackboneInfo]:
    """(backbone in eval mode on `device`, BackboneInfo) of any checkpoint this project handles (module docstring).

    which: section of a training checkpoint ("teacher", "student" or "model").
    in_chans: channels of the built model; 1 folds a 3-channel kernel (grey input); None keeps what is stored.
    fold_head_norm: fold a training checkpoint's DINO-head input BatchNorm into the CLS (module docstring).
    """
    if in_chans not in (None, 1, 3):
        raise ValueError(f"load_backbone: in_chans must be None, 1 or 3, got {in_chans!r}")
    if isinstance(uri_or_ckpt, Mapping):
        obj, origin = uri_or_ckpt, "<dict>"
    else:
        origin = os.fspath(uri_or_ckpt) if not isinstance(uri_or_ckpt, str) else uri_or_ckpt
        if not origin.endswith(_FILE_SUFFIXES) and _is_published(origin):
            return _load_published(origin, in_chans, device)
        obj, origin = _read_source(origin)

    if isinstance(obj.get("config"), Mapping) and any(isinstance(obj.get(k), Mapping) for k in ("teacher", "student",
                                                                                                  "model")):
        model, info = _load_training(obj, which, in_chans, origin, fold_head_norm)
    else:
        model, info = _load_plain(obj, in_chans, origin)
    return model.to(device).eval(), info


def _load_training(obj: Mapping, which: str, in_chans: int | None, origin: str, fold_head_norm: bool = True):
    cfg = _training_info(dict(obj["config"]), origin)
    state, flat = _section(obj, which, origin)
    kwargs = cfg.model.backbone_kwargs(student=False)
    stored_in_chans = int(state["patch_embed.proj.weight"].shape[1]) if "patch_embed.proj.weight" in state else (
        cfg.model.in_chans)
    kwargs["in_chans"] = stored_in_chans if in_chans is None else in_chans
    model = build_vit(cfg.model.arch, **kwargs)
    report = load_dinov3_checkpoint(model, state, strict=True)
    head_norm = head_input_norm_from_state(flat, f"{origin} [{which}]") if fold_head_norm else None
    if head_norm is not None:
        fold_head_input_norm(model, head_norm)
    iteration = obj.get("iteration")
    info = _info_from_model(
        model,
        source=origin,
        kind="training",
        section=which,
        arch=cfg.model.arch,
        stored_in_chans=stored_in_chans,
        norm_mean=float(cfg.augment.norm_mean),
        norm_std=float(cfg.augment.norm_std),
        norm_source="checkpoint config",
        channels=list(cfg.data.channels),
        global_size=int(cfg.augment.global_size),
        local_size=int(cfg.augment.local_size),
        iteration=int(iteration) if isinstance(iteration, (int, float)) else None,
        pretrained=cfg.model.pretrained,
        seed=int(cfg.train.seed),
        load_summary=report.summary().replace("<dict>", origin)
        + ("; the DINO head's input BatchNorm folded into the CLS norm" if head_norm is not None else ""),
        cls_space=cls_space_of(model, folded=head_norm is not None),
        config=cfg.to_dict(),
    )
    return model, info


def _load_plain(obj: Mapping, in_chans: int | None, origin: str):
    state, fmt, _, _ = extract_backbone_state_dict(obj, None, origin)
    arch = infer_architecture(state, origin)
    stored_in_chans = arch["in_chans"]
    if in_chans is not None:
        arch["in_chans"] = in_chans
    model = DinoVisionTransformer(**arch, drop_path_rate=0.0, rope_rescale=None)
    report = load_dinov3_checkpoint(model, obj, strict=True)
    info = _info_from_model(
        model,
        source=origin,
        kind="plain",
        section=fmt,
        arch="inferred",
        stored_in_chans=stored_in_chans,
        norm_mean=DEFAULT_NORM[0],
        norm_std=DEFAULT_NORM[1],
        norm_source="default (ImageNet mean/std over RGB)",
        load_summary=report.summary().replace("<dict>", origin),
    )
    return model, info


def _load_published(uri: str, in_chans: int | None, device):
    from dinocell.model.published import build_published, read_published

    published = read_published(uri, verify=True)
    model, report = build_published(published, in_chans=in_chans)
    cfg = published.config
    info = _info_from_model(
        model,
        source=published.uri,
        kind="published",
        section="plain",
        arch=str(cfg.get("architecture", "inferred")),
        stored_in_chans=int(cfg["in_chans"]),
        norm_mean=float(cfg["normalisation"]["mean"]),
        norm_std=float(cfg["normalisation"]["std"]),
        norm_source="published config",
        channels=list(cfg.get("channels") or []) or None,
        global_size=cfg.get("crop_sizes", {}).get("global"),
        local_size=cfg.get("crop_sizes", {}).get("local"),
        iteration=cfg.get("provenance", {}).get("iteration"),
        pretrained=cfg.get("provenance", {}).get("initial_weights", "") or "",
        seed=cfg.get("provenance", {}).get("seed"),
        load_summary=report.summary(),
        **({"cls_space": str(cfg["cls_space"])} if cfg.get("cls_space") else {}),
    )
    return model.to(device).eval(), info


def _build_like(info: BackboneInfo, in_chans: int) -> DinoVisionTransformer:
    """A fresh model of info's architecture; with the run's config exactly as the trainer builds its teacher
    (LayerScale init and all), else from the architecture fields."""
    if info.config and isinstance(info.config.get("model"), dict):
        cfg = _training_info(info.config, info.source)
        kwargs = cfg.model.backbone_kwargs(student=False)
        kwargs["in_chans"] = in_chans
        return build_vit(cfg.model.arch, **kwargs)
    return DinoVisionTransformer(**info.arch_kwargs(in_chans=in_chans))


def load_init_backbone(
    info: BackboneInfo, in_chans: int | None = 1, device: str | torch.device = "cpu"
) -> tuple[DinoVisionTransformer, BackboneInfo]:
    """The baseline: the initial weights of the run that produced `info` (see the module docstring)."""
    build_in = info.stored_in_chans if in_chans is None else in_chans
    with torch.random.fork_rng(devices=[]):  # building draws init weights: leave the caller's RNG stream untouched
        if info.pretrained:
            model = _build_like(info, build_in)
            # fold DINOv3's ImageNet normalisation to the run's grey normalisation, as the trainer did
            report = load_dinov3_checkpoint(model, info.pretrained, strict=True,
                                            input_norm=InputNorm((info.norm_mean,), (info.norm_std,)))
            how, summary = f"pretrained weights {info.pretrained}", report.summary()
        else:
            seed = 0 if info.seed is None else int(info.seed)
            torch.manual_seed(seed)
            # draw at the stored channel count (the kernel's shape decides the draws), then fold like a checkpoint
            drawn = _build_like(info, info.stored_in_chans)
            model = _build_like(info, build_in)
            load_dinov3_checkpoint(model, drawn.state_dict(), strict=True, checkpoint_norm=None)
            how, summary = f"random init (torch.manual_seed({seed}))", f"random initialisation, seed {seed}"
    base = dataclasses.replace(
        info,
        source=how,
        kind="init",
        section="init",
        in_chans=build_in,
        iteration=0,
        load_summary=summary,
        cls_space=cls_space_of(model),
    )
    return model.to(device).eval(), base
