"""iBOT masks: BEiT-style block masking completed to an exact count, and the per-batch collation of DINOv3.

``MaskingGenerator(grid)(n, rng)`` places random rectangles (target area uniform in [4, budget], aspect ratio
log-uniform in [0.3, 1/0.3], sides rounded to whole patches, so a block can come out at 3 patches, as in DINOv3;
at most half the grid per block) until n patches are masked or 10 tries in a row add nothing, then masks random
remaining patches so that exactly n are masked (DINOv3's ``complete_mask_randomly``).

``collate_masks`` follows DINOv3's collate: of the N global-crop images, int(N * mask_probability) get a mask;
mask i masks floor(HW * r_i) patches with r = linspace(lo, hi, n_masked + 1)[1:] (the upper edges of n_masked
equal bins of the ratio range, so the ratios are spread evenly over it and the total number of masked patches is
the same every step, which keeps shapes static); the masks are then shuffled over the N images. (DINOv2 drew each
ratio uniformly inside its bin instead.) All randomness comes from the generator passed in; never a global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dinocell.loss.ibot import masked_patch_weights

RandomSource = np.random.Generator | torch.Generator | int | None


def as_numpy_rng(generator: RandomSource) -> np.random.Generator:
    """A numpy Generator from a numpy Generator (returned as is), a torch.Generator (one seed drawn from it),
    an int seed, or None (fresh OS entropy: not reproducible)."""
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return np.random.default_rng(seed)
    if generator is None or isinstance(generator, (int, np.integer)):
        return np.random.default_rng(generator)
    raise TypeError(f"expected a numpy Generator, torch.Generator, int seed or None, got {type(generator).__name__}")


class MaskingGenerator:
    """Block masks on an (h, w) patch grid; ``__call__(n, rng)`` returns a bool [h, w] array with exactly n True."""

    def __init__(
        self,
        grid: tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_tries: int = 10,
    ):
        height, width = grid
        if height < 1 or width < 1:
            raise ValueError(f"MaskingGenerator: grid must be positive, got {grid}")
        if not 0 < min_aspect <= (max_aspect or 1 / min_aspect):
            raise ValueError(f"MaskingGenerator: bad aspect range ({min_aspect}, {max_aspect})")
        self.height, self.width = int(height), int(width)
        self.n_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        # DINOv3 caps one block at half the grid.
        self.max_num_patches = max_num_patches if max_num_patches is not None else int(0.5 * self.n_patches)
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
        self.max_tries = max_tries

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Mask one random rectangle adding between 1 and ``budget`` new patches; returns how many it added (0: none)."""
        for _ in range(self.max_tries):
            # Between min_num_patches and the budget, either way round (a budget under 4 gives smaller targets).
            area = self.min_num_patches + (budget - self.min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect_range))
            h = round(math.sqrt(area / aspect))
            w = round(math.sqrt(area * aspect))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            block = mask[top : top + h, left : left + w]
            added = h * w - int(block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
        return 0

    def __call__(self, num_masking_patches: int, rng: RandomSource) -> np.ndarray:
        if not 0 <= num_masking_patches <= self.n_patches:
            raise ValueError(
                f"MaskingGenerator: cannot mask {num_masking_patches} patches of a {self.height}x{self.width} grid"
            )
        rng = as_numpy_rng(rng)
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        # Complete at random to the exact count (blocks stop when no block fits the remaining budget).
        flat = mask.reshape(-1)
        missing = num_masking_patches - count
        if missing > 0:
            flat[rng.choice(np.flatnonzero(~flat), size=missing, replace=False)] = True
        return mask


@dataclass(frozen=True)
class MaskBatch:
    """Masks of one rank's global-crop images, in the flattened crop-major order of the global-crop batch.

    masks: bool [n_images, HW]; mask_indices: long [M], flat indices of the masked patches into
    masks.flatten() (= patch tokens flattened to [n_images * HW]); masks_weight: fp32 [M], 1 / (masked patches
    of the image), see ``masked_patch_weights``; n_masked_patches: M.
    """

    masks: Tensor
    mask_indices: Tensor
    masks_weight: Tensor
    n_masked_patches: int

    @property
    def n_images(self) -> int:
        return self.masks.shape[0]

    @classmethod
    def from_masks(cls, masks: Tensor) -> MaskBatch:
        if masks.dim() != 2 or masks.dtype != torch.bool:
            raise ValueError(
                f"MaskBatch: masks must be a bool [n_images, HW] tensor, got {masks.dtype} {tuple(masks.shape)}"
            )
        indices = masks.reshape(-1).nonzero().reshape(-1)
        return cls(masks, indices, masked_patch_weights(masks), int(indices.numel()))


def mask_counts(n_images: int, n_patches: int, mask_ratio_range=(0.1, 0.5), mask_probability: float = 0.5) -> list[int]:
    """Masked patch count of each masked image (ascending), before shuffling: floor(HW * linspace(lo, hi, n+1)[1:])."""
    low, high = mask_ratio_range
    if not 0 <= low <= high <= 1:
        raise ValueError(f"mask_ratio_range must satisfy 0 <= low <= high <= 1, got {mask_ratio_range}")
    if not 0 <= mask_probability <= 1:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    n_masked = int(n_images * mask_probability)
    ratios = np.linspace(low, high, n_masked + 1)[1:]
    # The small epsilon keeps e.g. 784 * 0.3 = 235.2 from flooring differently because of binary rounding.
    return [math.floor(n_patches * r + 1e-9) for r in ratios]


def collate_masks(
    n_global_images: int,
    grid: tuple[int, int],
    mask_ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    generator: RandomSource = None,
    masking_generator: MaskingGenerator | None = None,
) -> MaskBatch:
    """Masks for ``n_global_images`` global crops on an (h, w) patch grid; see the module docstring."""
    if n_global_images < 1:
        raise ValueError(f"collate_masks: n_global_images must be >= 1, got {n_global_images}")
    rng = as_numpy_rng(generator)
    masker = masking_generator or MaskingGenerator(grid)
    if (masker.height, masker.width) != tuple(grid):
        raise ValueError(f"collate_masks: masking_generator grid {(masker.height, masker.width)} != grid {tuple(grid)}")
    n_patches = masker.n_patches
    counts = mask_counts(n_global_images, n_patches, mask_ratio_range, mask_probability)
    masks = np.zeros((n_global_images, n_patches), dtype=bool)
    for row, count in enumerate(counts):
        masks[row] = masker(count, rng).reshape(-1)
    masks = masks[rng.permutation(n_global_images)]
    return MaskBatch.from_masks(torch.from_numpy(masks))
