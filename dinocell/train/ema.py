"""The EMA teacher: built as a copy of the student, never trained by gradients, moved towards the student after
every applied update.

    teacher = momentum * teacher + (1 - momentum) * student        (every parameter, after the optimizer step)

The momentum follows its schedule (dinocell.train.schedules: from optim.momentum_teacher up to 1.0). The teacher
has no gradient and is always in eval mode (no drop path, no RoPE rescale: its backbone is built with the
teacher's kwargs), so its targets are deterministic. Its buffers are not averaged (they are constants: RoPE periods,
k-bias masks), except the BatchNorm running statistics of a head with `model.head_bn`: those are the student's,
copied at every update, so that the eval-mode teacher standardises tokens as the student does. A skipped
(non-finite) update moves neither the student nor the teacher.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["build_teacher", "copy_batchnorm_statistics", "reset_teacher", "update_teacher"]


def build_teacher(student: nn.ModuleDict, teacher_backbone: nn.Module) -> nn.ModuleDict:
    """The teacher of `student` (parts backbone, dino_head[, ibot_head]): `teacher_backbone` plus copies of the
    student's heads, all weights equal to the student's, frozen and in eval mode."""
    parts = {"backbone": teacher_backbone}
    parts.update({k: copy.deepcopy(v) for k, v in student.items() if k != "backbone"})
    teacher = nn.ModuleDict(parts)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


@torch.no_grad()
def reset_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """teacher <- student (after loading pretrained weights or after DDP broadcast rank 0's student)."""
    teacher.load_state_dict(student.state_dict())


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, over all parameters at once."""
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
    copy_batchnorm_statistics(teacher, student)


@torch.no_grad()
def copy_batchnorm_statistics(teacher: nn.Module, student: nn.Module) -> None:
    """The teacher's BatchNorm running mean / var / count <- the student's (no-op without BatchNorm)."""
    t_norms = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    s_norms = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if len(t_norms) != len(s_norms):
        raise ValueError(f"EMA: the teacher has {len(t_norms)} BatchNorm layers, the student {len(s_norms)}")
    for t, s in zip(t_norms, s_norms):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            t_buf, s_buf = getattr(t, name), getattr(s, name)
            if t_buf is not None and s_buf is not None:
                t_buf.copy_(s_buf)
