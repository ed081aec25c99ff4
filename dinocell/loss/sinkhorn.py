"""Sinkhorn-Knopp teacher targets, as DINOv2/DINOv3 compute them, summed across ranks.

With Q = exp(logits / temp).T ([K prototypes, B samples]), DINOv3 runs, n_iterations times:
    rows    (prototypes): Q /= Q.sum(1) (all-reduced over ranks); Q /= K   -> each prototype holds mass 1/K
    columns (samples):    Q /= Q.sum(0) (local, a sample lives on one rank); Q /= B  -> each sample holds 1/B
and returns (Q * B).T, so each sample's row sums to 1. Only the per-prototype sums [K] cross ranks, so ranks may
hold different numbers of rows, including none: this one function serves DINO (global-crop CLS rows) and iBOT
(a variable number of masked patches per rank; DINOv2's ``n_masked_patches_tensor`` variant).

Two exact simplifications, both invisible in the result (equal up to float rounding, see tests):
- The constants 1/K and 1/B and DINOv3's initial division by the total sum rescale every entry uniformly before
  a normalisation, so they cancel; we skip them (hence the global sample count B is never needed).
- Before exp we subtract each prototype's maximum logit over all samples of all ranks (one MAX all-reduce of [K]):
  the first step normalises every prototype row, which cancels any per-prototype factor, and it keeps exp from
  overflowing fp32 (logits / 0.04 > 88 would give inf and then NaN). A sample whose every entry still underflows
  to 0 gets an all-zero target row instead of NaN (denominators are clamped to the smallest normal float).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    *,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Teacher assignment probabilities [B_local, K] (fp32, rows sum to 1) from teacher logits [B_local, K].

    When torch.distributed is initialised the prototype marginals are computed over the rows of every rank in
    ``group`` (default: the whole world); every rank must call this function, even with zero rows.
    """
    if teacher_logits.dim() != 2:
        raise ValueError(f"sinkhorn_knopp: teacher_logits must be [B, K], got {tuple(teacher_logits.shape)}")
    if not teacher_logits.is_floating_point():
        raise TypeError(f"sinkhorn_knopp: teacher_logits must be floating point, got {teacher_logits.dtype}")
    if not teacher_temp > 0:
        raise ValueError(f"sinkhorn_knopp: teacher_temp must be > 0, got {teacher_temp}")
    if n_iterations < 1:
        raise ValueError(f"sinkhorn_knopp: n_iterations must be >= 1, got {n_iterations}")
    distributed = distributed_is_active()
    n_rows, n_prototypes = teacher_logits.shape
    tiny = torch.finfo(torch.float32).tiny

    # Per-prototype max over every sample of every rank; -inf where a rank has no rows.
    if n_rows > 0:
        proto_max = teacher_logits.amax(dim=0).float()
    else:
        proto_max = torch.full((n_prototypes,), -torch.inf, device=teacher_logits.device)
    if distributed:
        dist.all_reduce(proto_max, op=dist.ReduceOp.MAX, group=group)

    # q is Q.T: [samples, prototypes]. The subtraction makes the one fp32 working copy (bf16 logits promote).
    q = teacher_logits - proto_max
    q = q.float() if q.dtype != torch.float32 else q
    q.mul_(1.0 / teacher_temp).exp_()
    for _ in range(n_iterations):
        prototype_mass = q.sum(dim=0)
        if distributed:
            dist.all_reduce(prototype_mass, group=group)
        q.div_(prototype_mass.clamp_min_(tiny))
        q.div_(q.sum(dim=1, keepdim=True).clamp_min_(tiny))
    return q
