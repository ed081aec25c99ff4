"""The SSL objective of DINOv3 (DINO + iBOT + KoLeo, Sinkhorn-Knopp teacher targets); see REFERENCE section 4.

The training loop composes the pieces:
    T_cls   = sinkhorn_knopp(teacher_dino_logits [2B, K], teacher_temp).unflatten(0, (2, B))
    g, l    = DINOLoss(K)(student_global [2, B, K], student_local [8, B, K], T_cls)
    dino    = combine_dino_terms(g, l, 2, 8)                      # 2/18 global + 16/18 local
    batch   = collate_masks(2 * B, (h, w), generator=rng)           # data side, per rank
    T_patch = sinkhorn_knopp(teacher_ibot_logits [M, K], teacher_temp)
    ibot    = iBOTPatchLoss(K)(student_ibot_logits [M, K], T_patch, batch.masks_weight, batch.n_images)
    koleo   = KoLeoLoss()(student_cls_pre_head [2, B, D])          # summed over the global crops
    loss    = total_loss(dino, ibot, koleo)
"""

from torch import Tensor

from dinocell.loss.cross_entropy import soft_cross_entropy_sum
from dinocell.loss.dino import DINOLoss, combine_dino_terms, dino_term_counts, dino_term_weights
from dinocell.loss.ibot import iBOTPatchLoss, masked_patch_weights
from dinocell.loss.koleo import KoLeoLoss
from dinocell.loss.masking import MaskBatch, MaskingGenerator, as_numpy_rng, collate_masks, mask_counts
from dinocell.loss.sinkhorn import sinkhorn_knopp

# DINOv3 defaults: 1.0 DINO + 1.0 iBOT + 0.1 KoLeo (KoLeo already summed over the global crops).
DEFAULT_LOSS_WEIGHTS = (1.0, 1.0, 0.1)


def total_loss(
    dino: Tensor, ibot: Tensor, koleo: Tensor, weights: tuple[float, float, float] = DEFAULT_LOSS_WEIGHTS
) -> Tensor:
    """weights[0] * dino + weights[1] * ibot + weights[2] * koleo, where ``koleo`` is the sum over global crops
    (``KoLeoLoss()(features [n_crops, B, D])``), so 0.1 applies to each crop as in DINOv3."""
    dino_weight, ibot_weight, koleo_weight = weights
    return dino_weight * dino + ibot_weight * ibot + koleo_weight * koleo


__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "DINOLoss",
    "KoLeoLoss",
    "MaskBatch",
    "MaskingGenerator",
    "as_numpy_rng",
    "collate_masks",
    "combine_dino_terms",
    "dino_term_counts",
    "dino_term_weights",
    "iBOTPatchLoss",
    "mask_counts",
    "masked_patch_weights",
    "sinkhorn_knopp",
    "soft_cross_entropy_sum",
    "total_loss",
]
