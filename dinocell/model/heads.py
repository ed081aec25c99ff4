"""DINO / iBOT projection head as in DINOv3: MLP -> L2-normalised bottleneck -> bias-free linear to prototypes.

DINOv3 dropped DINOv2's weight-normalised last layer; the prototype matrix is a plain `nn.Linear(bias=False)`.
Key names (`mlp.0`, `mlp.2`, `mlp.4`, `last_layer`) match the official heads, so `dino_head.*` / `ibot_head.*`
entries of an official training checkpoint load with `load_state_dict` after stripping the prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _build_mlp(nlayers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int, bias: bool) -> nn.Sequential:
    if nlayers < 0:
        raise ValueError(f"DINOHead needs nlayers >= 0, got {nlayers}")
    if nlayers == 0:  # no MLP: the prototypes score the unit-norm input itself
        return nn.Sequential()
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim, bias=bias))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim, bias=bias), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """in_dim -> hidden -> ... -> bottleneck (L2-normalised) -> n_prototypes logits.

    nlayers 0: no MLP; the bottleneck is the L2-normalised input (width in_dim; hidden_dim and bottleneck_dim are
    unused), so the loss shapes the backbone's own token space, the one cosine retrieval on the CLS uses.

    input_bn: BatchNorm1d on the input before the MLP (or, with nlayers 0, before the normalisation), as DINO v1's
    heads had BatchNorm in the MLP: the prototypes then score per-dimension standardised tokens, so no dimension's
    offset or scale (the final LayerNorm's affine spreads them 20x from random init) outweighs the others. It
    keeps running statistics; an eval-mode copy (the EMA teacher) normalises with them.

    `forward_bottleneck` and `forward_prototypes` split the two stages so a caller can, e.g., run the large
    prototype matmul (and its softmax) fused or chunked, or freeze `last_layer` for the first epoch.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_prototypes: int = 65536,
        nlayers: int = 3,
        mlp_bias: bool = True,
        input_bn: bool = False,
    ):
        super().__init__()
        self.in_dim = in_dim
        bottleneck_dim = in_dim if nlayers == 0 else bottleneck_dim
        self.bottleneck_dim = bottleneck_dim
        self.n_prototypes = n_prototypes
        # absent (not an Identity) when off: an official head's state dict has no such keys
        self.input_norm = nn.BatchNorm1d(in_dim) if input_bn else None
        self.mlp = _build_mlp(nlayers, in_dim, hidden_dim, bottleneck_dim, mlp_bias)
        self.last_layer = nn.Linear(bottleneck_dim, n_prototypes, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated-normal (std 0.02) weights, zero biases, for the MLP and the prototypes.

        Same call as DINOv3: `trunc_normal_(std=0.02)` keeps torch's default bounds [-2, 2] (100 std), so the
        truncation practically never bites.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_bottleneck(self, x: Tensor) -> Tensor:
        """[..., in_dim] -> unit-norm [..., bottleneck_dim]."""
        if self.input_norm is not None:  # statistics over every token of the call (all leading dims)
            x = self.input_norm(x.reshape(-1, self.in_dim)).reshape(x.shape)
        z = self.mlp(x)
        # eps large enough not to underflow in fp16 (as DINOv3 chooses it)
        eps = 1e-6 if z.dtype == torch.float16 else 1e-12
        return F.normalize(z, dim=-1, p=2, eps=eps)

    def forward_prototypes(self, z: Tensor) -> Tensor:
        """Unit-norm bottleneck [..., bottleneck_dim] -> logits [..., n_prototypes]."""
        return self.last_layer(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_prototypes(self.forward_bottleneck(x))
