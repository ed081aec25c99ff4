"""Loading official DINOv3-layout checkpoints into `DinoVisionTransformer`, with patch-size and input-channel adaptation.

Accepted sources: a local path (`torch.load(weights_only=True)`, or `.safetensors`), an `s3://` URI (read through
`dinocell.storage.read_bytes`), or an already-loaded dict. Accepted layouts: a plain backbone state dict (the
released `dinov3_vits16_pretrain_*.pth`), or a training checkpoint `{"teacher" | "model" | "student": {...}}` whose
backbone entries carry a `backbone.` prefix (head entries are skipped and listed in the report).

Adaptations of the patch kernel (16 -> 8, RGB -> 1 channel; dinocell.model.patch_adapt) are listed in the report with
old and new shape. RGB -> 1 folds DINOv3's per-channel ImageNet normalisation into the kernel and bias, for grey
inputs normalised the way dinocell normalises its crops (`input_norm`, default augment.norm_mean / norm_std's
defaults: pass the run's values when they differ).
Anything else that does not match (missing, unexpected or wrongly shaped entries) raises one ValueError that lists
every offending key with expected and found shapes. The only entries that may be absent are the derivable buffers
(`rope_embed.periods`, `*.attn.qkv.bias_mask`): they keep the model's computed values and are listed as defaulted.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dinocell.config.augment import AugmentConfig
from dinocell.model.patch_adapt import IMAGENET_NORM, AdaptedKey, InputNorm, adapt_patch_kernel

TRAINING_SECTIONS = ("teacher", "model", "student")
# tried in order; the first one that some keys start with is stripped (others are reported as ignored)
BACKBONE_PREFIXES = ("module.backbone.", "backbone.", "module.")


@dataclass
class LoadReport:
    source: str  # path, URI, or "<dict>"
    source_format: str  # "plain" or the training-checkpoint section used ("teacher", "model", "student")
    stripped_prefix: str  # "" when the keys had no prefix
    loaded_keys: int
    adapted: list[AdaptedKey] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)  # non-backbone entries of the section (heads, ...)
    defaulted_keys: list[str] = field(default_factory=list)  # derivable buffers absent from the checkpoint
    missing_keys: list[str] = field(default_factory=list)  # only with strict=False
    unexpected_keys: list[str] = field(default_factory=list)  # only with strict=False

    def summary(self) -> str:
        lines = [
            f"loaded {self.loaded_keys} keys from {self.source} (format {self.source_format}"
            + (f", prefix {self.stripped_prefix!r} stripped" if self.stripped_prefix else "")
            + ")"
        ]
        for a in self.adapted:
            lines.append(f"  adapted {a.key}: {list(a.old_shape)} -> {list(a.new_shape)} ({a.how})")
        for name, keys in (
            ("ignored (not backbone)", self.ignored_keys),
            ("defaulted (absent buffers)", self.defaulted_keys),
            ("missing", self.missing_keys),
            ("unexpected", self.unexpected_keys),
        ):
            if keys:
                lines.append(f"  {name}: {len(keys)}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- reading
def _torch_load_bytes(data: bytes, origin: str):
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ValueError(f"{origin}: cannot read as a torch checkpoint (weights_only=True): {exc}") from exc


def read_checkpoint(path_or_obj) -> tuple[Mapping, str]:
    """(checkpoint object, description of its source) from a path, an s3:// URI or a dict."""
    if isinstance(path_or_obj, Mapping):
        return path_or_obj, "<dict>"
    if not isinstance(path_or_obj, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path, an s3:// URI or a dict, got {type(path_or_obj).__name__}")
    src = os.fspath(path_or_obj)
    is_safetensors = src.endswith(".safetensors")
    if src.startswith("s3://"):
        from dinocell.storage import read_bytes  # lazy: boto3 is only needed for remote checkpoints

        data = read_bytes(src)
        if is_safetensors:
            from safetensors.torch import load as load_safetensors_bytes

            return load_safetensors_bytes(data), src
        return _torch_load_bytes(data, src), src
    if not os.path.isfile(src):
        raise FileNotFoundError(f"checkpoint not found: {src}")
    if is_safetensors:
        from safetensors.torch import load_file

        return load_file(src), src
    try:
        return torch.load(src, weights_only=True, map_location="cpu"), src
    except Exception as exc:
        raise ValueError(f"{src}: cannot read as a torch checkpoint (weights_only=True): {exc}") from exc


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def extract_backbone_state_dict(
    obj: Mapping, which: str | None = None, origin: str = "<dict>"
) -> tuple[dict[str, Tensor], str, str, list[str]]:
    """(backbone state dict, source format, stripped prefix, ignored keys) of a plain or training checkpoint."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"{origin}: checkpoint is a {type(obj).__name__}, expected a dict")
    if which is not None:
        if not isinstance(obj.get(which), Mapping):
            raise ValueError(f"{origin}: no {which!r} section; top-level keys: {sorted(map(str, obj))}")
        section, fmt = obj[which], which
    elif _is_state_dict(obj):
        section, fmt = obj, "plain"
    else:
        found = [k for k in TRAINING_SECTIONS if isinstance(obj.get(k), Mapping)]
        if not found:
            raise ValueError(
                f"{origin}: neither a state dict (all values tensors) nor a training checkpoint with one of "
                f"{list(TRAINING_SECTIONS)}; top-level keys: {sorted(map(str, obj))}"
            )
        section, fmt = obj[found[0]], found[0]
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in section.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(f"{origin}: section {fmt!r} has non-tensor entries: {', '.join(not_tensors)}")
    prefix = next((p for p in BACKBONE_PREFIXES if any(k.startswith(p) for k in section)), "")
    if not prefix:
        return dict(section), fmt, "", []
    state = {k[len(prefix) :]: v for k, v in section.items() if k.startswith(prefix)}
    ignored = sorted(k for k in section if not k.startswith(prefix))
    return state, fmt, prefix, ignored


# ----------------------------------------------------------------------------------------------- loading
def dinocell_input_norm(mean: float | None = None, std: float | None = None) -> InputNorm:
    """The grey-channel normalisation of dinocell's crops (x / 255 - mean) / std; None = AugmentConfig's default."""
    defaults = AugmentConfig()
    return InputNorm((defaults.norm_mean if mean is None else float(mean),),
                     (defaults.norm_std if std is None else float(std),))


def _is_derivable_buffer(key: str) -> bool:
    return key == "rope_embed.periods" or key.endswith(".attn.qkv.bias_mask")


def _untie_cls_norm(state: dict[str, Tensor], target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A tied checkpoint loaded into an untied model: cls_norm starts as a copy of the shared final norm (DINOv3
    unties the same way), so the model computes exactly what the checkpoint did."""
    if "cls_norm.weight" not in target or "cls_norm.weight" in state or "norm.weight" not in state:
        return state
    return {**state, **{f"cls_norm.{p}": state[f"norm.{p}"].clone() for p in ("weight", "bias") if f"norm.{p}" in state}}


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def load_dinov3_checkpoint(
    model: nn.Module,
    path_or_obj,
    strict: bool = True,
    which: str | None = None,
    patch_resize_method: str = "pinv",
    input_norm: InputNorm | None = None,
    checkpoint_norm: InputNorm | None = IMAGENET_NORM,
) -> LoadReport:
    """Load a DINOv3-layout checkpoint into `model` (adapting patch size / input channels) and report what was done.

    strict=True: any missing or unexpected backbone key raises. strict=False: they are listed in the report instead.
    Shape mismatches that cannot be adapted always raise. `which` picks a training-checkpoint section explicitly
    (default: the first of teacher, model, student that is present). A 3-channel kernel loaded into a 1-channel
    model is folded from `checkpoint_norm` (DINOv3's ImageNet per-channel statistics; None = only sum the
    channels) to `input_norm` (the model's grey inputs; default `dinocell_input_norm()`).
    """
    obj, source = read_checkpoint(path_or_obj)
    state, fmt, prefix, ignored = extract_backbone_state_dict(obj, which, source)
    target = model.state_dict()
    adapted = adapt_patch_kernel(state, target, patch_resize_method, source_norm=checkpoint_norm,
                                 target_norm=input_norm or dinocell_input_norm())

    state = _untie_cls_norm(state, target)
    absent = [k for k in target if k not in state]
    defaulted = [k for k in absent if _is_derivable_buffer(k)]
    missing = [k for k in absent if not _is_derivable_buffer(k)]
    unexpected = [k for k in state if k not in target]
    wrong_shape = [k for k in state if k in target and state[k].shape != target[k].shape]

    problems = [f"  shape {k}: expected {_shape(target[k])}, found {_shape(state[k])}" for k in wrong_shape]
    if strict:
        problems += [f"  missing {k}: expected {_shape(target[k])}, not in checkpoint" for k in missing]
        problems += [f"  unexpected {k}: found {_shape(state[k])}, not in model" for k in unexpected]
        if any(k.startswith("cls_norm.") for k in unexpected):
            problems.append("  (the checkpoint's CLS has its own norm: build the model with "
                            "untie_cls_and_patch_norms=True, config model.untie_cls_and_patch_norms: true)")
    if problems:
        raise ValueError(
            f"{source} (format {fmt}) does not fit {type(model).__name__}: {len(problems)} problem(s)\n"
            + "\n".join(problems)
        )

    to_load = {k: v for k, v in state.items() if k in target}
    to_load.update({k: target[k] for k in defaulted})  # keep the model's computed buffers
    model.load_state_dict(to_load, strict=not missing)
    return LoadReport(
        source=source,
        source_format=fmt,
        stripped_prefix=prefix,
        loaded_keys=len(to_load) - len(defaulted),
        adapted=adapted,
        ignored_keys=ignored,
        defaulted_keys=defaulted,
        missing_keys=missing,
        unexpected_keys=unexpected,
    )
