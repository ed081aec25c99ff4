"""Axial rotary position embedding (RoPE) as DINOv3 uses it.

Only patch tokens are rotated (the cls and register tokens carry no position). Each head's dimension D is split in
two halves; inside each half the first D/4 channels rotate with the y coordinate and the next D/4 with the x
coordinate, one frequency per channel: angle = 2*pi*coord/period, period_i = base^(i/(D/4)).
Coordinates are patch centres mapped to [-1, 1] separately per axis, so every grid size spans the same range
(this is what lets one set of weights run at patch 16 and patch 8, at 224 px and at 96 px).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def rope_rotate_half(x: Tensor) -> Tensor:
    """[a, b] -> [-b, a] over the two halves of the last dimension."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate channel pairs (j, j + D/2) of x by the angles whose sin/cos are given (broadcast over leading dims)."""
    return x * cos + rope_rotate_half(x) * sin


def patch_center_coords(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """[H*W, 2] (y, x) patch-centre coordinates in [-1, 1], row-major like the patch tokens."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * grid - 1.0


class RopePositionEmbedding(nn.Module):
    """Produces (sin, cos), each [H*W, head_dim], for a patch grid.

    `periods` is a persistent buffer (key `rope_embed.periods`) so that a checkpoint's exact values (the released
    DINOv3 file stores them rounded to bf16) are used after loading.

    rescale_coords: if set to r, training mode multiplies all coordinates by one factor s drawn log-uniformly from
    [1/r, r] per call (the ViT calls once per block and crop, as DINOv3 does). Eval mode never rescales.
    """

    def __init__(self, head_dim: int, base: float = 100.0, rescale_coords: float | None = None):
        super().__init__()
        if head_dim % 4 != 0:
            raise ValueError(f"RoPE needs head_dim divisible by 4 (2 axes x sin/cos halves), got {head_dim}")
        if rescale_coords is not None and rescale_coords < 1.0:
            raise ValueError(f"rescale_coords must be >= 1 (range [1/r, r]), got {rescale_coords}")
        self.head_dim = head_dim
        self.base = base
        self.rescale_coords = rescale_coords
        self.register_buffer("periods", torch.empty(head_dim // 4), persistent=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        n = self.head_dim // 4
        # period_i = base^(2i / (D/2)) = base^(i / (D/4)); for D = 64 and base 100: 100^(i/16), i = 0..15
        exponents = torch.arange(n, dtype=torch.float64) / n
        self.periods.copy_((self.base**exponents).to(self.periods.dtype))

    @property
    def is_random(self) -> bool:
        """True when calls draw a random coordinate scale (training mode with rescaling configured)."""
        return self.training and self.rescale_coords is not None and self.rescale_coords > 1.0

    def sample_scale(self) -> Tensor | None:
        """The coordinate scale for one call: log-uniform in [1/r, r] when training with rescaling, else None."""
        if not self.is_random:
            return None
        log_r = math.log(self.rescale_coords)
        return torch.empty(1, device=self.periods.device, dtype=torch.float32).uniform_(-log_r, log_r).exp()

    def sincos(self, height: int, width: int, scale: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
        """Deterministic (sin, cos) for a grid and an explicit coordinate scale (None = 1)."""
        coords = patch_center_coords(height, width, device=self.periods.device)  # [HW, 2]
        if scale is not None:
            coords = coords * scale
        periods = self.periods.to(torch.float32)
        angles = 2.0 * math.pi * coords.unsqueeze(-1) / periods  # [HW, 2, D/4]: y angles then x angles
        angles = angles.flatten(1, 2).tile(2)  # [HW, D]: the same D/2 angles for both halves
        return torch.sin(angles), torch.cos(angles)

    def forward(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        return self.sincos(height, width, self.sample_scale())
