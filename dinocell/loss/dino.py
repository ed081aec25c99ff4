"""DINO (CLS-token) loss as DINOv3 computes it, with the global and local terms kept apart.

CE(t, s) = -sum_k t_k * log_softmax(s / student_temp)_k, t = Sinkhorn-Knopp teacher probabilities.

- global term: every teacher global crop t teaches every *other* student global crop s != t (the diagonal is
  removed: crop 1 teaches crop 2 and back). Normalised as DINOv3 does:
      global_loss = sum_{s != t} sum_b CE(T[t, b], S_global[s, b]) / (B * n_global * (n_global - 1))
- local term: every teacher global crop teaches every student local crop:
      local_loss = sum_{s, t} sum_b CE(T[t, b], S_local[s, b]) / (B * n_global * n_local)
  i.e. each term is the mean CE over its (teacher, student, sample) triples.
- combined (DINOv3 "loss scales"): with n_global_terms = n_global * (n_global - 1) and
  n_local_terms = n_global * n_local,
      dino = n_local_terms / (n_local_terms + n_global_terms) * local_loss
           + n_global_terms / (n_local_terms + n_global_terms) * global_loss,
  the mean CE over all pairs. For 2 global + 8 local crops: 16/18 local + 2/18 global.

Cost: the pairs are never expanded into [n_teacher * n_student, B, K]. CE is linear in the target, so the teachers
are summed first: each student crop s gets one target, sum_t T[t] (local) or sum_t T[t] - T[s] (global, diagonal
removed), and one chunked soft cross-entropy pass over the student logits does the rest (see cross_entropy.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dinocell.loss.cross_entropy import DEFAULT_CHUNK_ELEMENTS, soft_cross_entropy_sum


def dino_term_counts(n_global_crops: int, n_local_crops: int) -> tuple[int, int]:
    """(n_global_terms, n_local_terms): teacher/student crop pairs of each term, the diagonal excluded."""
    if n_global_crops < 1 or n_local_crops < 0:
        raise ValueError(
            f"dino_term_counts: need n_global_crops >= 1 and n_local_crops >= 0, got {n_global_crops}, {n_local_crops}"
        )
    return n_global_crops * (n_global_crops - 1), n_global_crops * n_local_crops


def dino_term_weights(n_global_crops: int = 2, n_local_crops: int = 8) -> tuple[float, float]:
    """(global_weight, local_weight) of DINOv3: each term's share of all pairs (2 + 8 crops: 2/18, 16/18)."""
    n_global_terms, n_local_terms = dino_term_counts(n_global_crops, n_local_crops)
    total = n_global_terms + n_local_terms
    if total == 0:
        raise ValueError("dino_term_weights: one global crop and no local crop give no teacher/student pair")
    return n_global_terms / total, n_local_terms / total


def combine_dino_terms(
    global_loss: Tensor, local_loss: Tensor, n_global_crops: int = 2, n_local_crops: int = 8
) -> Tensor:
    """DINOv3-weighted DINO loss from the two terms of ``DINOLoss.forward``."""
    global_weight, local_weight = dino_term_weights(n_global_crops, n_local_crops)
    return global_weight * global_loss + local_weight * local_loss


class DINOLoss(nn.Module):
    """Cross-entropy between teacher probabilities and student log-softmax(student / student_temp), DINOv3 style."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"DINOLoss: student_temp must be > 0, got {student_temp}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.chunk_elements = chunk_elements

    def _check(self, name: str, x: Tensor, batch: int | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.out_dim:
            raise ValueError(f"DINOLoss: {name} must be [n_crops, B, {self.out_dim}], got {tuple(x.shape)}")
        if batch is not None and x.shape[1] != batch:
            raise ValueError(f"DINOLoss: {name} has batch {x.shape[1]}, teacher_global has {batch}")

    def forward(
        self, student_global: Tensor, student_local: Tensor | None, teacher_global: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(global_loss, local_loss), each the mean CE over its pairs and samples (module docstring).

        student_global: [n_global, B, K] logits; student_local: [n_local, B, K] logits or None (no local crops);
        teacher_global: [n_global, B, K] probabilities (``sinkhorn_knopp`` rows), same crop order as student_global.
        A term with no pair (one global crop; no local crop) is returned as a zero tensor.
        """
        self._check("teacher_global", teacher_global, None)
        n_global, batch, _ = teacher_global.shape
        self._check("student_global", student_global, batch)
        if student_global.shape[0] != n_global:
            raise ValueError(f"DINOLoss: student_global has {student_global.shape[0]} crops, teacher_global {n_global}")
        if student_local is not None:
            self._check("student_local", student_local, batch)
        n_local = 0 if student_local is None else student_local.shape[0]
        n_global_terms, n_local_terms = dino_term_counts(n_global, n_local)

        teacher = teacher_global.detach().float()
        teacher_sum = teacher.sum(dim=0)  # [B, K]: all teacher crops at once (CE is linear in the target)
        zero = student_global.new_zeros((), dtype=torch.float32)

        global_loss = zero
        if n_global_terms > 0:
            # Student crop s is taught by every teacher crop except its own: sum_t T[t] - T[s].
            targets = teacher_sum.unsqueeze(0) - teacher
            total = soft_cross_entropy_sum(
                student_global, targets, self.student_temp, chunk_elements=self.chunk_elements
            )
            global_loss = total / (batch * n_global_terms)

        local_loss = zero
        if n_local_terms > 0:
            total = soft_cross_entropy_sum(
                student_local, teacher_sum, self.student_temp, chunk_elements=self.chunk_elements
            )
            local_loss = total / (batch * n_local_terms)
        return global_loss, local_loss
