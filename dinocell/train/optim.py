"""AdamW over the student with DINOv3's parameter groups.

Each student parameter gets three properties, and parameters that share them share one optimizer group:
- wd_multiplier: 0 for biases, norm weights, LayerScale gammas and the learned tokens (cls, registers, mask), 1
  otherwise (decaying a scale or an offset towards 0 has no regularising meaning);
- lr_multiplier: layer-wise decay layer_decay^(depth + 1 - layer_id) with layer_id 0 for the patch embedding and
  tokens, i + 1 for block i, depth + 1 for the final norm and the heads (as DINOv2's get_vit_lr_decay_rate), times
  patch_embed_lr_mult for the patch embedding;
- is_last_layer: the heads' prototype matrices (`last_layer`), which follow the last-layer lr schedule (0 while
  frozen in the first epochs);
- is_backbone: the backbone's parameters, whose lr the head warm-up multiplies (optim.head_warmup_*), so backbone and
  head parameters never share a group.
`apply_schedules` writes the scheduled lr / weight decay into every group each iteration: lr = scheduled lr (or the
last-layer lr) x lr_multiplier x (backbone_lr_mult for backbone groups).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

TOKEN_NAMES = ("cls_token", "storage_tokens", "register_tokens", "mask_token")


@dataclass(frozen=True)
class ParamRule:
    lr_multiplier: float
    wd_multiplier: float
    is_last_layer: bool
    is_backbone: bool = False


def _layer_id(name: str, depth: int) -> int:
    """0 = patch embedding and tokens, i + 1 = block i, depth + 1 = everything after the blocks (norm, heads)."""
    if not name.startswith("backbone."):
        return depth + 1
    local = name[len("backbone.") :]
    if local.startswith("patch_embed.") or local.split(".")[0] in TOKEN_NAMES:
        return 0
    if local.startswith("blocks."):
        return int(local.split(".")[1]) + 1
    return depth + 1


def no_weight_decay(name: str) -> bool:
    """Biases, norm weights (norm, norm1, norm2, a head's input_norm), LayerScale gammas and the learned tokens."""
    parts = name.split(".")
    leaf = parts[-1]
    return (leaf in ("bias", "gamma") or leaf in TOKEN_NAMES
            or any(p.startswith("norm") or p.endswith("_norm") for p in parts[:-1]))


def param_rule(name: str, depth: int, layer_decay: float, patch_embed_lr_mult: float) -> ParamRule:
    """The (lr multiplier, wd multiplier, last-layer flag) of one student parameter, named '<part>.<path>'."""
    lr_mult = layer_decay ** (depth + 1 - _layer_id(name, depth))
    if name.startswith("backbone.patch_embed."):
        lr_mult *= patch_embed_lr_mult
    wd_mult = 0.0 if no_weight_decay(name) else 1.0
    return ParamRule(lr_mult, wd_mult, ".last_layer." in f".{name}", name.startswith("backbone."))


def build_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], depth: int, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> list[dict]:
    """Optimizer groups, in order of first appearance, each {"params", "names", "lr_multiplier", "wd_multiplier",
    "is_last_layer", "is_backbone"}; parameters that do not require grad are left out."""
    groups: dict[ParamRule, dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        rule = param_rule(name, depth, layer_decay, patch_embed_lr_mult)
        group = groups.get(rule)
        if group is None:
            group = groups[rule] = {
                "params": [],
                "names": [],
                "lr_multiplier": rule.lr_multiplier,
                "wd_multiplier": rule.wd_multiplier,
                "is_last_layer": rule.is_last_layer,
                "is_backbone": rule.is_backbone,
            }
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ValueError("build_param_groups: no trainable parameters")
    return list(groups.values())


def build_optimizer(named_params, depth: int, optim_cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the groups; lr and weight decay are placeholders until `apply_schedules` sets them."""
    groups = build_param_groups(named_params, depth, optim_cfg.layer_decay, optim_cfg.patch_embed_lr_mult)
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, **kwargs)


def apply_schedules(
    optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float, backbone_lr_mult: float = 1.0
) -> None:
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        mult = group["lr_multiplier"] * (backbone_lr_mult if group["is_backbone"] else 1.0)
        group["lr"] = base * mult
        group["weight_decay"] = wd * group["wd_multiplier"]
