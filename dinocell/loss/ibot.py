"""iBOT masked-patch loss as DINOv3 computes it.

Only the student's masked global-crop patch tokens enter (the student saw ``mask_token`` there, the teacher saw
the image). With M masked patches over all global-crop images of this rank, teacher probabilities T [M, K]
(``sinkhorn_knopp`` over the masked patches of all ranks) and student logits S [M, K]:

    ibot = sum_m w_m * CE(T[m], S[m]) / n_images,   w_m = 1 / (masked patches in the image of patch m),

CE as in dino.py, n_images = number of global-crop images on this rank, *masked or not* (DINOv3 divides by
``masks.shape[0]``). So each masked image contributes the mean CE over its masked patches, and with half of the
images masked the loss is about half of that per-image mean.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinocell.loss.cross_entropy import DEFAULT_CHUNK_ELEMENTS, soft_cross_entropy_sum


def masked_patch_weights(masks: Tensor) -> Tensor:
    """Per masked patch weight 1 / (masked patches in its image), in ``masks.flatten().nonzero()`` order.

    masks: bool [n_images, n_patches]. Returns fp32 [M], M = masks.sum(); the weights of each masked image sum to 1.
    """
    if masks.dim() != 2 or masks.dtype != torch.bool:
        raise ValueError(
            f"masked_patch_weights: masks must be a bool [n_images, n_patches] tensor, got {masks.dtype} {tuple(masks.shape)}"
        )
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).to(torch.float32)
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


class iBOTPatchLoss(nn.Module):
    """Weighted cross-entropy on masked patches; see the module docstring for the normalisation."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"iBOTPatchLoss: student_temp must be > 0, got {student_temp}")
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp
        self.chunk_elements = chunk_elements

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, masks_weight: Tensor, n_images: int) -> Tensor:
        """student_logits, teacher_probs: [M, K] for the masked patches (same order); masks_weight: [M]
        (``masked_patch_weights`` or ``MaskBatch.masks_weight``); n_images: global-crop images on this rank."""
        expected = ("M", self.patch_out_dim)
        for name, x in (("student_logits", student_logits), ("teacher_probs", teacher_probs)):
            if x.dim() != 2 or x.shape[1] != self.patch_out_dim:
                raise ValueError(f"iBOTPatchLoss: {name} must be {expected}, got {tuple(x.shape)}")
        n_masked = student_logits.shape[0]
        if teacher_probs.shape[0] != n_masked or masks_weight.shape != (n_masked,):
            raise ValueError(
                f"iBOTPatchLoss: masked patch counts differ: student_logits {n_masked}, "
                f"teacher_probs {teacher_probs.shape[0]}, masks_weight {tuple(masks_weight.shape)}"
            )
        if n_images < 1:
            raise ValueError(f"iBOTPatchLoss: n_images must be >= 1, got {n_images}")
        if n_masked == 0:
            return student_logits.sum(dtype=torch.float32) * 0.0  # keeps the graph connected
        total = soft_cross_entropy_sum(
            student_logits, teacher_probs.detach(), self.student_temp, masks_weight, chunk_elements=self.chunk_elements
        )
        return total / n_images
