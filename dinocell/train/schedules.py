"""Per-iteration schedules (DINOv2/DINOv3's CosineScheduler, in closed form).

A schedule over `total_iters` iterations: `freeze_iters` at 0, then a linear warm-up from `start_warmup_value`
to `base_value` over `warmup_iters`, then a half cosine from `base_value` to `final_value` over the rest:

    i < freeze:                 0
    i < freeze + warmup:        start + (base - start) * (i - freeze) / warmup
    otherwise, with j = i - freeze - warmup and n = total - freeze - warmup:
                                final + 0.5 * (base - final) * (1 + cos(pi * j / n))

Iterations past the end keep the final value. Closed form means no per-iteration array (the full run is 240,000
iterations) and the value at any iteration is known after a resume from the iteration number alone.
`TrainingSchedules` bundles the schedules of a run (lr, last-layer lr, weight decay, teacher momentum, teacher
temperature, and the head warm-up's backbone lr multiplier: a step from optim.head_warmup_backbone_lr_mult to 1 at
head_warmup_iters) built from the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CosineSchedule:
    base_value: float
    final_value: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup_value: float = 0.0
    freeze_iters: int = 0

    def __post_init__(self):
        if self.total_iters < 1:
            raise ValueError(f"CosineSchedule: total_iters must be >= 1, got {self.total_iters}")
        if self.warmup_iters < 0 or self.freeze_iters < 0:
            raise ValueError(
                f"CosineSchedule: warmup_iters and freeze_iters must be >= 0, got {self.warmup_iters}, {self.freeze_iters}"
            )
        if self.freeze_iters + self.warmup_iters > self.total_iters:
            raise ValueError(
                f"CosineSchedule: freeze ({self.freeze_iters}) + warm-up ({self.warmup_iters}) iterations exceed "
                f"the total ({self.total_iters})"
            )

    def __call__(self, iteration: int) -> float:
        if iteration < 0:
            raise ValueError(f"CosineSchedule: iteration must be >= 0, got {iteration}")
        i = iteration
        if i < self.freeze_iters:
            return 0.0
        i -= self.freeze_iters
        if i < self.warmup_iters:
            return self.start_warmup_value + (self.base_value - self.start_warmup_value) * i / self.warmup_iters
        i -= self.warmup_iters
        n = self.total_iters - self.freeze_iters - self.warmup_iters
        if n <= 0 or i >= n:
            return self.final_value if n > 0 else self.base_value
        return self.final_value + 0.5 * (self.base_value - self.final_value) * (1.0 + math.cos(math.pi * i / n))

    def array(self) -> np.ndarray:
        """All total_iters values (float64), for plots and tests."""
        return np.array([self(i) for i in range(self.total_iters)], dtype=np.float64)


def linear_warmup_then_constant(value: float, start: float, warmup_iters: int, total_iters: int) -> CosineSchedule:
    """start -> value linearly over warmup_iters, then value (a cosine from value to value)."""
    return CosineSchedule(value, value, total_iters, warmup_iters=warmup_iters, start_warmup_value=start)


def epochs_to_iters(epochs: float, iters_per_epoch: int) -> int:
    return round(epochs * iters_per_epoch)


@dataclass(frozen=True)
class TrainingSchedules:
    lr: CosineSchedule
    last_layer_lr: CosineSchedule | _FrozenStart
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    # head warm-up: the backbone's lr is multiplied by head_warmup_backbone_lr_mult before head_warmup_iters
    head_warmup_iters: int = 0
    head_warmup_backbone_lr_mult: float = 0.0

    @classmethod
    def from_config(cls, optim, loss, iters_per_epoch: int, head_warmup_iters: int | None = None) -> TrainingSchedules:
        """Schedules of a run with `optim.epochs` epochs of `iters_per_epoch` iterations (DINOv3's definitions:
        lr warm-up then cosine to min_lr; the last layer's lr is the same with the first
        freeze_last_layer_epochs at 0; weight decay and momentum cosines; teacher temperature warm-up then flat).
        head_warmup_iters: None = optim.head_warmup_iters (the trainer passes 0 for a random-init backbone)."""
        if iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
        total = optim.epochs * iters_per_epoch
        warmup = epochs_to_iters(optim.warmup_epochs, iters_per_epoch)
        lr = CosineSchedule(optim.lr, optim.min_lr, total, warmup_iters=warmup)
        freeze = min(epochs_to_iters(optim.freeze_last_layer_epochs, iters_per_epoch), total)
        last_layer_lr = _with_freeze(lr, freeze)
        wd = CosineSchedule(optim.weight_decay, optim.weight_decay_end, total)
        momentum = CosineSchedule(optim.momentum_teacher, optim.momentum_teacher_end, total)
        temp_warmup = min(epochs_to_iters(loss.warmup_teacher_temp_epochs, iters_per_epoch), total)
        teacher_temp = linear_warmup_then_constant(loss.teacher_temp, loss.warmup_teacher_temp, temp_warmup, total)
        head_warmup = optim.head_warmup_iters if head_warmup_iters is None else head_warmup_iters
        if not 0 <= head_warmup <= total:
            raise ValueError(f"optim.head_warmup_iters={head_warmup} must be in [0, {total}] (the run's iterations)")
        return cls(lr, last_layer_lr, wd, momentum, teacher_temp, head_warmup, optim.head_warmup_backbone_lr_mult)

    @property
    def total_iters(self) -> int:
        return self.lr.total_iters

    def backbone_lr_mult(self, iteration: int) -> float:
        """The head warm-up's factor on the backbone's lr: the configured multiplier during warm-up, then 1."""
        return self.head_warmup_backbone_lr_mult if iteration < self.head_warmup_iters else 1.0

    def at(self, iteration: int) -> dict[str, float]:
        return {
            "lr": self.lr(iteration),
            "last_layer_lr": self.last_layer_lr(iteration),
            "wd": self.weight_decay(iteration),
            "momentum": self.momentum(iteration),
            "teacher_temp": self.teacher_temp(iteration),
            "backbone_lr_mult": self.backbone_lr_mult(iteration),
        }


@dataclass(frozen=True)
class _FrozenStart:
    """A schedule that is 0 for the first `freeze_iters` iterations and equal to `inner` afterwards."""

    inner: CosineSchedule
    freeze_iters: int

    @property
    def total_iters(self) -> int:
        return self.inner.total_iters

    def __call__(self, iteration: int) -> float:
        return 0.0 if iteration < self.freeze_iters else self.inner(iteration)

    def array(self) -> np.ndarray:
        return np.array([self(i) for i in range(self.total_iters)], dtype=np.float64)


def _with_freeze(schedule: CosineSchedule, freeze_iters: int):
    """DINOv2's last-layer lr: the lr schedule with its first freeze_iters values set to 0 (not shifted)."""
    return _FrozenStart(schedule, freeze_iters) if freeze_iters > 0 else schedule
