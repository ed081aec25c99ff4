"""KoLeo regulariser (Kozachenko-Leonenko entropy estimator), as DINOv2/DINOv3 use it.

For L2-normalised features x_1..x_B, with n(i) the nearest other sample of x_i in the batch:
    koleo = -mean_i log(||x_i - x_n(i)|| + 1e-8)
It pushes each feature away from its nearest neighbour, spreading the batch over the sphere.

Use in the objective (REFERENCE section 4): applied to the student's pre-head normed CLS token of each global crop
*separately* and summed over the crops, weight 0.1 each (DINOv3: sum/n_crops scaled by n_crops * 0.1).
``forward`` accepts [n_crops, B, D] and returns that per-crop sum, so the caller multiplies by 0.1 only.
Computed on this rank's batch only, as in DINOv2 (DINOv3's distributed variant is not implemented).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def single(self, features: Tensor) -> Tensor:
        """KoLeo of one crop's features [B, D] (B >= 2), computed in fp32."""
        if features.dim() != 2:
            raise ValueError(f"KoLeoLoss: features must be [B, D], got {tuple(features.shape)}")
        if features.shape[0] < 2:
            raise ValueError(
                f"KoLeoLoss: needs at least 2 samples per crop for a nearest neighbour, got {features.shape[0]}"
            )
        x = F.normalize(features.float(), p=2, dim=-1, eps=self.eps)
        with torch.no_grad():
            # On the unit sphere the nearest neighbour has the largest dot product; never pick oneself.
            similarity = x @ x.T
            similarity.fill_diagonal_(-torch.inf)
            neighbour = similarity.argmax(dim=1)
        # eps inside the norm (as torch.nn.PairwiseDistance) keeps the gradient finite for duplicate features.
        distance = torch.linalg.vector_norm(x - x[neighbour] + self.eps, dim=-1)
        return -torch.log(distance + self.eps).mean()

    def forward(self, features: Tensor) -> Tensor:
        """[B, D] -> KoLeo of that batch; [n_crops, B, D] -> sum over crops of each crop's KoLeo."""
        if features.dim() == 3:
            return torch.stack([self.single(crop) for crop in features.unbind(0)]).sum()
        return self.single(features)
