"""The augmentation section of the config (`augment:`): crop sizes, scales, probabilities, normalisation.

Plain types only (no torch), so `dinocell.config` loads without the training stack; the augmentation itself is
dinocell.data.multiview.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, get_args

from dinocell.config.errors import ConfigError

# Which source each crop shows (dinocell.data.multiview): "multiview" is the method (global crop 1 the fluorescent
# mean, global crop 2 one channel, locals the mean with probability mean_prob_local); the two others are the
# ablation's naive designs: every crop from the mean ("mean_only"), every crop from its own random channel
# ("single_only").
CropPolicy = Literal["multiview", "mean_only", "single_only"]
CROP_POLICIES: tuple[str, ...] = get_args(CropPolicy)


@dataclass
class AugmentConfig:
    """All augmentation settings (plain types, so the YAML config can fill it). Defaults are the seed's values."""

    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)  # area fraction of the field
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w/h, sampled log-uniform
    crop_attempts: int = 10  # RandomResizedCrop tries before the centre-crop fallback
    crop_policy: CropPolicy = "multiview"  # see CROP_POLICIES
    mean_prob_local: float = 0.3  # probability that a local crop shows the fluorescent mean (multiview only)
    brightfield_prob: float = 0.0  # probability that a single-channel choice is a brightfield channel
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    rotate90: bool = True  # random quarter turns, k uniform in 0..3
    # From-scratch curriculum (0 = off): over the first curriculum_iters iterations the global crops' smallest area
    # goes linearly from curriculum_start_scale to global_scale[0], and the flip and quarter-turn probabilities from
    # 0 to their own. Random-init features are invariant to nothing, so DINO's cross-view targets only start on
    # near-aligned views (bench/measured/dino_objective_2026-12-03.md).
    curriculum_iters: int = 0
    curriculum_start_scale: float = 0.9
    jitter_prob: float = 0.8
    brightness: float = 0.4  # factor uniform in [1 - brightness, 1 + brightness]
    contrast: float = 0.4  # factor uniform in [1 - contrast, 1 + contrast]
    blur_prob_global1: float = 1.0
    blur_prob_global2: float = 0.1
    blur_prob_local: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in output pixels
    blur_kernel_size: int = 9  # DINOv2's kernel size
    solarize_prob: float = 0.2  # on global crop 2 only
    solarize_threshold: float = 128.0  # on the 0-255 scale
    norm_mean: float = 0.449
    norm_std: float = 0.226
    # How crops are resampled (same result either way, see image_ops.crop_resize): "taps" (a gather per filter tap,
    # fewest operations), "matmul" (dense batched matmuls), or "auto": matmul on CUDA, taps elsewhere.
    resample: str = "auto"

    def __post_init__(self):
        if self.crop_policy not in CROP_POLICIES:
            raise ConfigError(
                f"augment.crop_policy: must be one of {list(CROP_POLICIES)}, got {self.crop_policy!r}"
            )
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            setattr(self, name, _pair(self, name))
        for name in ("global_size", "local_size", "crop_attempts", "blur_kernel_size"):
            _check(self, name, isinstance(getattr(self, name), int) and getattr(self, name) >= 1, "an integer >= 1")
        _check(self, "n_local", isinstance(self.n_local, int) and self.n_local >= 0, "an integer >= 0")
        _check(self, "blur_kernel_size", self.blur_kernel_size % 2 == 1, "odd")
        _check(
            self,
            "blur_kernel_size",
            self.blur_kernel_size // 2 < min(self.global_size, self.local_size),
            "smaller than twice the crop sizes (reflect padding)",
        )
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            _check(self, name, 0 < lo <= hi <= 1, "0 < low <= high <= 1")
        _check(self, "ratio", 0 < self.ratio[0] <= self.ratio[1], "0 < low <= high")
        _check(self, "blur_sigma", 0 < self.blur_sigma[0] <= self.blur_sigma[1], "0 < low <= high")
        for name in (
            "mean_prob_local",
            "brightfield_prob",
            "hflip_prob",
            "vflip_prob",
            "jitter_prob",
            "blur_prob_global1",
            "blur_prob_global2",
            "blur_prob_local",
            "solarize_prob",
        ):
            _check(self, name, 0.0 <= getattr(self, name) <= 1.0, "a probability in [0, 1]")
        for name in ("brightness", "contrast"):
            _check(self, name, 0.0 <= getattr(self, name) < 1.0, "in [0, 1)")
        _check(self, "rotate90", isinstance(self.rotate90, bool), "a bool")
        _check(self, "curriculum_iters", isinstance(self.curriculum_iters, int) and not isinstance(
            self.curriculum_iters, bool) and self.curriculum_iters >= 0, "an integer >= 0")
        if self.curriculum_iters:
            _check(self, "curriculum_start_scale", isinstance(self.curriculum_start_scale, (int, float)) and
                   self.global_scale[0] <= self.curriculum_start_scale <= self.global_scale[1],
                   f"in [global_scale low, high] = {list(self.global_scale)} when curriculum_iters > 0")
        _check(self, "solarize_threshold", 0 < self.solarize_threshold <= 255, "in (0, 255]")
        _check(self, "norm_std", self.norm_std > 0, "> 0")
        _check(self, "resample", self.resample in ("auto", "taps", "matmul"), "one of 'auto', 'taps', 'matmul'")

    @classmethod
    def from_dict(cls, values: dict, where: str = "augment") -> AugmentConfig:
        """Build from a config mapping; unknown keys are an error naming `where` (e.g. the YAML section)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown augmentation keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


def _pair(cfg, name: str) -> tuple[float, float]:
    value = getattr(cfg, name)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"AugmentConfig.{name}: expected a pair [low, high], got {value!r}")
    try:
        low, high = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        raise ValueError(f"AugmentConfig.{name}: expected two numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"AugmentConfig.{name}: expected finite numbers, got {value!r}")
    return (low, high)


def _check(cfg, name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"AugmentConfig.{name}: must be {expected}, got {getattr(cfg, name)!r}")
