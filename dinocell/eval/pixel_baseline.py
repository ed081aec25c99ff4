"""Backbones without learning, scored by exactly the evaluation's code: what layout and pixels alone achieve.

Both are nn.Modules with the interface consistency.embed_views uses (`forward_features(x)` -> {"x_norm_clstoken":
[B, D], "x_norm_patchtokens": [B, 1, D]}, `in_chans`, `patch_size`), so their numbers come from the same views,
matrices and retrieval as the checkpoint's. The single "patch token" is the vector itself, so "cls" and
"patch_mean" give the same numbers.

- PixelBackbone(grid): the view average-pooled to grid x grid, minus its own mean (cosine then compares the pattern,
  not the brightness). On aligned whole fields this finds a field from any channel by where its cells are.
- PositionsProbe: sees only where the cells are: the view thresholded at its own mean (a binary foreground mask),
  a fixed random 5x5 convolution (8 filters, seeded) with ReLU, average-pooled to 8 x 8, minus its mean. It knows
  nothing about intensity or texture, so anything it scores comes from positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PIXEL_GRIDS", "PixelBackbone", "PositionsProbe"]

PIXEL_GRIDS = (8, 16)


def _features(v: torch.Tensor) -> dict[str, torch.Tensor]:
    v = v - v.mean(dim=1, keepdim=True)
    return {"x_norm_clstoken": v, "x_norm_patchtokens": v[:, None, :]}


class PixelBackbone(nn.Module):
    """Average pooling to grid x grid, mean-subtracted per image (module docstring)."""

    patch_size = 1  # any view size is valid

    def __init__(self, grid: int, in_chans: int = 1):
        super().__init__()
        if grid < 2:
            raise ValueError(f"PixelBackbone: grid must be >= 2, got {grid}")
        self.grid, self.in_chans, self.embed_dim = int(grid), int(in_chans), int(grid) ** 2

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = F.adaptive_avg_pool2d(x.float().mean(dim=1, keepdim=True), self.grid)
        return _features(pooled.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["x_norm_clstoken"]


class PositionsProbe(nn.Module):
    """A binary cell mask through a fixed random convolution, pooled (module docstring)."""

    patch_size = 1

    def __init__(self, grid: int = 8, filters: int = 8, kernel: int = 5, seed: int = 0, in_chans: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        self.register_buffer("weight", torch.randn(filters, 1, kernel, kernel, generator=g) / kernel)
        self.grid, self.in_chans, self.embed_dim = int(grid), int(in_chans), int(filters) * int(grid) ** 2

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        grey = x.float().mean(dim=1, keepdim=True)
        mask = (grey > grey.mean(dim=(-2, -1), keepdim=True)).float()
        maps = F.relu(F.conv2d(mask, self.weight.to(mask.device), padding=self.weight.shape[-1] // 2))
        return _features(F.adaptive_avg_pool2d(maps, self.grid).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["x_norm_clstoken"]
