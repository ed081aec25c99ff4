"""Building blocks of the DINOv3 ViT: patch embedding, attention with RoPE and masked k-bias, MLP, LayerScale,
batch-subset drop path, and the pre-norm transformer block.

Module and parameter names follow the official DINOv3 code so that `state_dict()` keys match the released files.
Blocks work on lists of token tensors (one per crop size) so that the token-wise layers (norms, qkv, proj, MLP) run
once over all crops; attention itself runs per crop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinocell.model.rope import rope_apply

Rope = tuple[Tensor, Tensor]  # (sin, cos), each [N, head_dim] over all N tokens of a sequence


# ----------------------------------------------------------------------------------------------- token lists
def cat_tokens(xs: Sequence[Tensor]) -> tuple[Tensor, list[torch.Size]]:
    """Flatten [B_i, N_i, D] tensors to one [sum B_i*N_i, D] tensor (token-wise layers then run once)."""
    shapes = [x.shape for x in xs]
    if len(xs) == 1:
        return xs[0].reshape(-1, xs[0].shape[-1]), shapes
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs], dim=0), shapes


def split_tokens(flat: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Inverse of `cat_tokens` (the last dimension may have changed)."""
    sizes = [s[0] * s[1] for s in shapes]
    parts = [flat] if len(shapes) == 1 else flat.split(sizes, dim=0)
    return [p.reshape(s[0], s[1], flat.shape[-1]) for p, s in zip(parts, shapes)]


# ----------------------------------------------------------------------------------------------- drop path
def add_residual_with_batch_drop(
    xs: Sequence[Tensor],
    branch: Callable[[list[Tensor]], list[Tensor]],
    drop_rate: float,
    training: bool,
) -> list[Tensor]:
    """x + branch(x) per tensor, with DINOv3's stochastic depth when training and drop_rate > 0.

    Stochastic depth as DINOv3 implements it: the residual branch runs only on a random subset of
    max(int(B * (1 - drop_rate)), 1) samples of each batch, and its output is added back scaled by
    B / subset_size (so the expectation is unchanged). The dropped samples cost no compute.
    """
    if not training or drop_rate <= 0.0:
        return [x + r for x, r in zip(xs, branch(list(xs)))]
    indices, scales, subsets = [], [], []
    for x in xs:
        batch = x.shape[0]
        keep = max(int(batch * (1.0 - drop_rate)), 1)
        idx = torch.randperm(batch, device=x.device)[:keep]
        indices.append(idx)
        scales.append(batch / keep)
        subsets.append(x[idx])
    residuals = branch(subsets)
    return [
        torch.index_add(x, 0, idx, r.to(x.dtype), alpha=scale)
        for x, idx, r, scale in zip(xs, indices, residuals, scales)
    ]


# ----------------------------------------------------------------------------------------------- layers
class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (key `gamma`)."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()  # exact (erf) GELU, as the released model
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (key `proj`): [B, C, H, W] -> tokens [B, (H/p)*(W/p), D], row-major."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def reset_parameters(self) -> None:
        # uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, as DINOv3's PatchEmbed
        bound = 1.0 / math.sqrt(self.in_chans * self.patch_size**2)
        nn.init.uniform_(self.proj.weight, -bound, bound)
        if self.proj.bias is not None:
            nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"PatchEmbed: expected images [B, {self.in_chans}, H, W], got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"PatchEmbed: image size {height}x{width} is not a multiple of the patch size {p}")
        x = self.proj(x)  # [B, D, H/p, W/p]
        return x.flatten(2).transpose(1, 2), (height // p, width // p)


class LinearKMaskedBias(nn.Linear):
    """The qkv projection whose bias is multiplied by the `bias_mask` buffer (1 for q and v, 0 for k).

    A k bias adds q.b_k to every score of a query row, which softmax ignores; DINOv3 masks it to zero so it never
    receives gradient noise. The mask is a persistent buffer because the released checkpoints contain it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        if out_features % 3:
            raise ValueError(f"qkv projection needs out_features divisible by 3, got {out_features}")
        if bias:
            self.register_buffer("bias_mask", torch.ones(out_features), persistent=True)
            self.reset_bias_mask()

    def reset_bias_mask(self) -> None:
        if self.bias is not None:
            third = self.out_features // 3
            self.bias_mask.fill_(1.0)
            self.bias_mask[third : 2 * third] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    """Multi-head self-attention; qkv rows are [q | k | v], each head-major. RoPE rotates q and k."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True, mask_k_bias: bool = True
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        linear = LinearKMaskedBias if (mask_k_bias and qkv_bias) else nn.Linear
        self.qkv = linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def heads(self, qkv: Tensor, rope: Rope | None) -> tuple[Tensor, Tensor, Tensor]:
        """qkv [B, N, 3D] -> q, k, v [B, heads, N, head_dim], with RoPE applied to q and k."""
        batch, n_tok, _ = qkv.shape
        q, k, v = qkv.reshape(batch, n_tok, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            sin, cos = rope
            # rotate in the rope's dtype (fp32) even under bf16 autocast, as DINOv3 does, then cast back
            q = rope_apply(q.to(sin.dtype), sin, cos).to(v.dtype)
            k = rope_apply(k.to(sin.dtype), sin, cos).to(v.dtype)
        return q, k, v

    def attend(self, qkv: Tensor, rope: Rope | None) -> Tensor:
        """qkv [B, N, 3D] -> attention output before proj, [B, N, D]."""
        q, k, v = self.heads(qkv, rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)

    def forward(self, x: Tensor, rope: Rope | None = None) -> Tensor:
        return self.proj(self.attend(self.qkv(x), rope))

    def attention_probs(self, x: Tensor, rope: Rope | None = None) -> Tensor:
        """Explicit softmax(q k^T / sqrt(d)) [B, heads, N, N] for inspection (x is the normed block input)."""
        q, k, _ = self.heads(self.qkv(x), rope)
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim)
        return scores.softmax(dim=-1)


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), each with batch-subset drop path."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layerscale_init: float = 1e-5,
        norm_eps: float = 1e-5,
        qkv_bias: bool = True,
        mask_k_bias: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, qkv_bias=qkv_bias, mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init)
        self.drop_path = drop_path

    def _attn_branch(self, xs: list[Tensor], ropes: Sequence[Rope | None]) -> list[Tensor]:
        flat, shapes = cat_tokens(xs)
        qkv_list = split_tokens(self.attn.qkv(self.norm1(flat)), shapes)
        attended = [self.attn.attend(qkv, rope) for qkv, rope in zip(qkv_list, ropes)]
        flat_out, _ = cat_tokens(attended)
        return split_tokens(self.ls1(self.attn.proj(flat_out)), shapes)

    def _mlp_branch(self, xs: list[Tensor]) -> list[Tensor]:
        flat, shapes = cat_tokens(xs)
        return split_tokens(self.ls2(self.mlp(self.norm2(flat))), shapes)

    def forward_list(self, xs: Sequence[Tensor], ropes: Sequence[Rope | None]) -> list[Tensor]:
        if len(xs) != len(ropes):
            raise ValueError(f"Block.forward_list: {len(xs)} token tensors but {len(ropes)} rope entries")
        xs = add_residual_with_batch_drop(xs, lambda sub: self._attn_branch(sub, ropes), self.drop_path, self.training)
        return add_residual_with_batch_drop(xs, self._mlp_branch, self.drop_path, self.training)

    def forward(self, x: Tensor, rope: Rope | None = None) -> Tensor:
        return self.forward_list([x], [rope])[0]
