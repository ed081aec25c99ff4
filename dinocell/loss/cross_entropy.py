"""Soft-target cross-entropy over many prototypes, without full-size fp32 temporaries.

Both SSL terms reduce to  sum_rows w_r * CE(targets_r, softmax(student_r / temp))  with K = 65,536 prototypes.
The plain autograd expression ``-(t * log_softmax(s.float() / temp)).sum()`` allocates several fp32 copies of the
student logits and keeps one for backward: for the iBOT term (about 15,000 masked patches x 65,536 per GPU) each
copy is about 4 GB. This function instead works on chunks of rows and saves only the log-sum-exp of each row
(one float per row); backward recomputes the softmax chunk by chunk. Results equal the plain expression (tests).

Per row, with x = student / temp:
    CE = -sum_k t_k * log_softmax(x)_k = (sum_k t_k) * logsumexp(x) - sum_k t_k * x_k
    dCE/dstudent = (softmax(x) * sum_k t_k - t) / temp
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per chunk are chosen so that one fp32 chunk holds about this many elements (256 MiB).
DEFAULT_CHUNK_ELEMENTS = 1 << 26


def _rows_per_chunk(n_rows: int, n_classes: int, chunk_elements: int) -> int:
    return max(1, min(n_rows, chunk_elements // max(n_classes, 1)))


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """Sum over rows of w_n * CE(targets, softmax(logits / temp)); see module docstring."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, row_weights: Tensor | None, temp: float, chunk_elements: int):
        # logits [S, N, K] (any float dtype); targets [St, N, K] fp32 with St in {1, S}; row_weights [N] or None.
        n_crops, n_rows, n_classes = logits.shape
        step = _rows_per_chunk(n_rows, n_classes, chunk_elements)
        inv_temp = 1.0 / temp
        lse = torch.empty((n_crops, n_rows), dtype=torch.float32, device=logits.device)
        target_mass = torch.empty((n_crops, n_rows), dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(n_crops):
            t_crop = targets[s if targets.shape[0] > 1 else 0]
            for start in range(0, n_rows, step):
                stop = min(start + step, n_rows)
                # One fp32 copy per chunk: the logits may be bf16, and softmax over 65k entries needs fp32.
                x = logits[s, start:stop].to(torch.float32, copy=True).mul_(inv_temp)
                t = t_crop[start:stop]
                row_lse = torch.logsumexp(x, dim=-1)
                mass = t.sum(dim=-1)
                row_loss = mass * row_lse - (x.mul_(t)).sum(dim=-1)
                if row_weights is not None:
                    row_loss = row_loss * row_weights[start:stop]
                total += row_loss.sum()
                lse[s, start:stop] = row_lse
                target_mass[s, start:stop] = mass
        ctx.save_for_backward(logits, targets, lse, target_mass, row_weights)
        ctx.temp = temp
        ctx.chunk_elements = chunk_elements
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        logits, targets, lse, target_mass, row_weights = ctx.saved_tensors
        n_crops, n_rows, n_classes = logits.shape
        step = _rows_per_chunk(n_rows, n_classes, ctx.chunk_elements)
        inv_temp = 1.0 / ctx.temp
        grad_logits = torch.empty_like(logits)
        for s in range(n_crops):
            t_crop = targets[s if targets.shape[0] > 1 else 0]
            for start in range(0, n_rows, step):
                stop = min(start + step, n_rows)
                scale = grad_total * inv_temp
                if row_weights is not None:
                    scale = scale * row_weights[start:stop]
                else:
                    scale = scale.expand(stop - start)
                # softmax(x) * mass - t, scaled: computed in place on one fp32 chunk.
                g = logits[s, start:stop].to(torch.float32, copy=True).mul_(inv_temp)
                g.sub_(lse[s, start:stop, None]).exp_().mul_(target_mass[s, start:stop, None])
                g.sub_(t_crop[start:stop]).mul_(scale[:, None])
                grad_logits[s, start:stop].copy_(g)
        return grad_logits, None, None, None, None


def soft_cross_entropy_sum(
    student_logits: Tensor,
    targets: Tensor,
    temp: float,
    row_weights: Tensor | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Sum over all rows of ``row_weight * -sum_k targets_k * log_softmax(student_logits / temp)_k`` (fp32 scalar).

    student_logits: [N, K] or [S, N, K], any float dtype (bf16 is computed in fp32 chunk by chunk).
    targets: same shape as student_logits, or [N, K] shared by all S leading rows (broadcast, never expanded);
        fp32 probabilities (other dtypes are cast); treated as constants, so they must not require grad.
    row_weights: optional [N] weight per row (shared over S).
    The result is a sum, not a mean: callers divide by their own normaliser.
    """
    if student_logits.dim() not in (2, 3):
        raise ValueError(
            f"soft_cross_entropy_sum: student_logits must be [N, K] or [S, N, K], got {tuple(student_logits.shape)}"
        )
    if not student_logits.is_floating_point():
        raise TypeError(f"soft_cross_entropy_sum: student_logits must be floating point, got {student_logits.dtype}")
    if targets.requires_grad:
        raise ValueError("soft_cross_entropy_sum: targets (teacher probabilities) must not require grad; detach them")
    if temp <= 0:
        raise ValueError(f"soft_cross_entropy_sum: temp must be > 0, got {temp}")
    logits3 = student_logits if student_logits.dim() == 3 else student_logits.unsqueeze(0)
    targets3 = targets if targets.dim() == 3 else targets.unsqueeze(0)
    n_crops, n_rows, n_classes = logits3.shape
    if targets3.shape[1:] != (n_rows, n_classes) or targets3.shape[0] not in (1, n_crops):
        raise ValueError(
            f"soft_cross_entropy_sum: targets shape {tuple(targets.shape)} does not match student_logits "
            f"{tuple(student_logits.shape)} (expected the same shape or [N, K])"
        )
    if row_weights is not None and row_weights.shape != (n_rows,):
        raise ValueError(f"soft_cross_entropy_sum: row_weights must be [{n_rows}], got {tuple(row_weights.shape)}")
    targets3 = targets3.to(torch.float32)
    if row_weights is not None:
        row_weights = row_weights.detach().to(device=logits3.device, dtype=torch.float32)
    return _SoftTargetCrossEntropy.apply(logits3, targets3, row_weights, float(temp), int(chunk_elements))
