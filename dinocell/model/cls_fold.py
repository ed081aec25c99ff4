"""Fold a DINO head's input BatchNorm (`model.head_bn`) into the backbone's CLS output: `fold_head_input_norm`.

With `model.head_bn` the prototypes score BatchNorm(CLS): the loss shapes the per-dimension standardised CLS, and
cosine retrieval on the raw CLS misses much of what it learned (bench/measured/multiview_recipe_2026-12-03.md:
held-out top-1 0.037 raw vs 0.053 through the BatchNorm, the same checkpoint). An eval-mode BatchNorm is a
per-dimension affine map, and so is the final LayerNorm's affine, so their composition is one LayerNorm affine:

    LN(x) = g * n(x) + b,  BN(y) = (y - mu) / sqrt(var + eps) * w + c
    BN(LN(x)) = (g * k) * n(x) + ((b - mu) * k + c),  k = w / sqrt(var + eps)

The patch tokens share the final norm but never pass the DINO head, so the folded affine goes into an untied
`cls_norm` (DINOv3's `untie_cls_and_patch_norms`: CLS and registers) and the patch tokens keep `norm`. The result
is exact up to fp32 rounding and stays a DINOv3-layout backbone (`cls_norm.*` keys; official code loads it with
untie_cls_and_patch_norms=True).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from dinocell.model.vit import DinoVisionTransformer

__all__ = ["CLS_SPACE_FOLDED", "CLS_SPACE_TIED", "CLS_SPACE_UNTIED", "HEAD_NORM_PREFIX", "cls_space_of",
           "fold_head_input_norm", "head_input_norm_from_state"]

# What a backbone's CLS output is (BackboneInfo.cls_space, a published config.json's "cls_space"): the shared final
# norm's, an untied cls_norm's, or an untied cls_norm that carries a DINO head's input BatchNorm.
CLS_SPACE_TIED = "backbone"
CLS_SPACE_UNTIED = "untied cls_norm"
CLS_SPACE_FOLDED = "head input BatchNorm folded"

# where the DINO head's input BatchNorm sits in a training checkpoint's teacher / student section
HEAD_NORM_PREFIX = "dino_head.input_norm."
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def cls_space_of(backbone: DinoVisionTransformer, folded: bool = False) -> str:
    """The CLS space of `backbone`; folded: a head BatchNorm was folded into its cls_norm."""
    if backbone.cls_norm is None:
        return CLS_SPACE_TIED
    return CLS_SPACE_FOLDED if folded else CLS_SPACE_UNTIED


def head_input_norm_from_state(section: Mapping[str, Tensor], origin: str = "<dict>") -> nn.BatchNorm1d | None:
    """The eval-mode DINO-head input BatchNorm stored in a checkpoint section (flat keys), or None without one."""
    found = {k[len(HEAD_NORM_PREFIX):]: v for k, v in section.items() if k.startswith(HEAD_NORM_PREFIX)}
    if not found:
        return None
    missing = [k for k in _BN_KEYS if k not in found]
    if missing:
        raise ValueError(f"{origin}: the DINO head's input BatchNorm lacks {[HEAD_NORM_PREFIX + k for k in missing]}")
    bn = nn.BatchNorm1d(int(found["running_mean"].numel()))
    bn.load_state_dict({k: v for k, v in found.items() if k in (*_BN_KEYS, "num_batches_tracked")}, strict=False)
    return bn.eval()


@torch.no_grad()
def fold_head_input_norm(backbone: DinoVisionTransformer, bn: nn.BatchNorm1d) -> DinoVisionTransformer:
    """`backbone` with `bn` (eval mode: running statistics) folded into an untied `cls_norm`, in place.

    Afterwards the backbone's CLS (and register) output equals bn(the CLS before), the patch tokens are unchanged.
    A backbone that already has a cls_norm gets the fold on top of it.
    """
    if bn.num_features != backbone.embed_dim:
        raise ValueError(f"fold_head_input_norm: BatchNorm of width {bn.num_features} for a backbone of width "
                         f"{backbone.embed_dim}")
    source = backbone.cls_norm if backbone.cls_norm is not None else backbone.norm
    gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = nn.LayerNorm(backbone.embed_dim, eps=source.eps).to(source.weight.device, source.weight.dtype)
    folded.weight.copy_(source.weight * gain)
    folded.bias.copy_((source.bias - bn.running_mean) * gain + bn.bias)
    backbone.cls_norm = folded
    return backbone
