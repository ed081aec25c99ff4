"""The DINOv3 vision transformer (state-dict compatible with the released DINOv3 ViT backbones).

Tokens are [cls, n_storage_tokens registers, patches row-major]; there is no absolute position embedding, only
axial RoPE on the patch tokens. At patch 16, in_chans 3, `vit_small().state_dict()` has exactly the 188 keys of
`dinov3_vits16_pretrain_lvd1689m-08c60483.pth`.

`untie_cls_and_patch_norms=True` (DINOv3's option of the same name and key, `cls_norm.*`) gives the CLS and register
tokens their own final LayerNorm. This project uses it to carry a trained head's input BatchNorm into the backbone's
CLS output (dinocell.model.cls_fold), so that the exported CLS is the space the loss shaped.

Teacher / student: build the student with the drop path rate you train with and RoPE rescaling (`rope_rescale=2`,
active only in train mode); build the EMA teacher with drop_path_rate=0 (and keep it in eval mode, or pass
rope_rescale=None) so its targets are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinocell.model.layers import Block, LayerScale, LinearKMaskedBias, PatchEmbed, Rope
from dinocell.model.rope import RopePositionEmbedding


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        n_storage_tokens: int = 4,
        layerscale_init: float = 1e-5,
        norm_eps: float = 1e-5,
        rope_base: float = 100.0,
        rope_rescale: float | None = 2.0,
        qkv_bias: bool = True,
        mask_k_bias: bool = True,
        activation_checkpointing: bool = False,
        untie_cls_and_patch_norms: bool = False,
    ):
        super().__init__()
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_heads = num_heads
        self.n_blocks = depth
        self.n_storage_tokens = n_storage_tokens
        self.activation_checkpointing = activation_checkpointing

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim))
        else:
            self.storage_tokens = None
        self.rope_embed = RopePositionEmbedding(embed_dim // num_heads, base=rope_base, rescale_coords=rope_rescale)
        # DINOv3 gives every block the same drop path rate (no linear ramp over depth)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                drop_path=drop_path_rate,
                layerscale_init=layerscale_init,
                norm_eps=norm_eps,
                qkv_bias=qkv_bias,
                mask_k_bias=mask_k_bias,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        # absent (not shared) when tied, so an official backbone's state dict has no cls_norm keys
        self.register_module("cls_norm", nn.LayerNorm(embed_dim, eps=norm_eps) if untie_cls_and_patch_norms else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # 2-D, as in the released files
        self.init_weights()

    # ------------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self) -> None:
        """DINOv3's initialisation: tokens N(0, 0.02), mask token 0, linears trunc-normal(0.02) with zero bias."""
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, LinearKMaskedBias):
                    module.reset_bias_mask()
            elif isinstance(module, (nn.LayerNorm, LayerScale, PatchEmbed)):
                module.reset_parameters()

    # ------------------------------------------------------------------------------------------- tokens
    @property
    def n_prefix_tokens(self) -> int:
        return 1 + self.n_storage_tokens

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """Images [B, C, H, W] -> tokens [B, 1+R+HW, D] (masked patches replaced by mask_token), and the grid."""
        patches, grid = self.patch_embed(x)
        # the residual stream stays in the parameters' dtype (fp32 master weights) even when the patch projection
        # ran in bf16 under autocast, as DINOv3 (whose token concatenation promotes to fp32)
        patches = patches.to(self.cls_token.dtype)
        batch, n_patches, _ = patches.shape
        if masks is not None:
            if masks.shape != (batch, n_patches) or masks.dtype != torch.bool:
                raise ValueError(
                    f"masks must be bool [B, HW] = [{batch}, {n_patches}], got {masks.dtype} {tuple(masks.shape)}"
                )
            patches = torch.where(masks.unsqueeze(-1), self.mask_token.unsqueeze(0), patches)
            cls_token = self.cls_token
        else:
            # keeps mask_token in the graph so DDP sees a gradient for it on every step (adds exactly 0)
            cls_token = self.cls_token + 0 * self.mask_token
        prefix = [cls_token.expand(batch, -1, -1)]
        if self.storage_tokens is not None:
            prefix.append(self.storage_tokens.expand(batch, -1, -1))
        tokens = torch.cat(prefix + [patches], dim=1)
        return tokens, grid

    def _rope(self, grid: tuple[int, int]) -> Rope:
        """(sin, cos) over all tokens: identity rotation (sin 0, cos 1) on the prefix tokens."""
        sin, cos = self.rope_embed(*grid)
        n_prefix = self.n_prefix_tokens
        sin = torch.cat([sin.new_zeros(n_prefix, sin.shape[1]), sin], dim=0)
        cos = torch.cat([cos.new_ones(n_prefix, cos.shape[1]), cos], dim=0)
        return sin, cos

    def _ropes_per_block(self, grids: Sequence[tuple[int, int]]) -> Callable[[], list[Rope]]:
        """A rope source for each block: a fresh random rescale per block and crop in training, else one shared."""
        if not self.rope_embed.is_random:  # no randomness: compute once for all blocks
            fixed = [self._rope(g) for g in grids]
            return lambda: fixed
        return lambda: [self._rope(g) for g in grids]

    def _run_block(self, block: Block, xs: list[Tensor], ropes: list[Rope]) -> list[Tensor]:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block.forward_list, xs, ropes, use_reentrant=False)
        return block.forward_list(xs, ropes)

    # ------------------------------------------------------------------------------------------- forward
    def forward_features_list(
        self, xs: Sequence[Tensor], masks_list: Sequence[Tensor | None] | None = None
    ) -> list[dict[str, Tensor | None]]:
        """Run several crop sizes (e.g. global 224 and local 96 batches) through the blocks together."""
        if masks_list is None:
            masks_list = [None] * len(xs)
        if len(masks_list) != len(xs):
            raise ValueError(f"forward_features_list: {len(xs)} image batches but {len(masks_list)} masks entries")
        tokens, grids = [], []
        for x, masks in zip(xs, masks_list):
            t, grid = self.prepare_tokens(x, masks)
            tokens.append(t)
            grids.append(grid)
        ropes_for_block = self._ropes_per_block(grids)
        for block in self.blocks:
            tokens = self._run_block(block, tokens, ropes_for_block())
        outputs = []
        n_prefix = self.n_prefix_tokens
        for x, masks in zip(tokens, masks_list):
            if self.cls_norm is None:
                x_norm = self.norm(x)
                prefix, patches = x_norm[:, :n_prefix], x_norm[:, n_prefix:]
            else:  # as DINOv3: the CLS and registers through cls_norm, the patches through norm
                prefix, patches = self.cls_norm(x[:, :n_prefix]), self.norm(x[:, n_prefix:])
            outputs.append(
                {
                    "x_norm_clstoken": prefix[:, 0],
                    "x_storage_tokens": prefix[:, 1:],
                    "x_norm_patchtokens": patches,
                    "x_prenorm": x,
                    "masks": masks,
                }
            )
        return outputs

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        return self.forward_features_list([x], [masks])[0]

    def forward(self, x: Tensor, masks: Tensor | None = None, is_training: bool = False):
        """The feature dict when is_training, else the normed CLS token [B, D] (as DINOv3's backbone with no head)."""
        out = self.forward_features(x, masks)
        return out if is_training else out["x_norm_clstoken"]

    def get_last_self_attention(self, x: Tensor) -> Tensor:
        """CLS -> patch attention weights of the last block, [B, heads, HW], computed explicitly (with RoPE).

        Meant for visualising a few images (run it in eval mode, under torch.no_grad()); the weights of one head
        over the patches sum to 1 minus the attention on the cls and register tokens.
        """
        tokens, grid = self.prepare_tokens(x)
        ropes_for_block = self._ropes_per_block([grid])
        xs = [tokens]
        for block in self.blocks[:-1]:
            xs = block.forward_list(xs, ropes_for_block())
        last = self.blocks[-1]
        probs = last.attn.attention_probs(last.norm1(xs[0]), ropes_for_block()[0])
        return probs[:, :, 0, self.n_prefix_tokens :]


# ----------------------------------------------------------------------------------------------- builders
_ARCHS: dict[str, dict] = {
    # CPU-test size, NOT the standard ViT-Ti (which has depth 12): head_dim 64 like ViT-S, so RoPE matches
    "vit_tiny": {"embed_dim": 192, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4.0},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0},
}


def _build(arch: str, patch_size: int, in_chans: int, overrides: dict) -> DinoVisionTransformer:
    kwargs = dict(_ARCHS[arch])
    kwargs.update(overrides)
    return DinoVisionTransformer(patch_size=patch_size, in_chans=in_chans, **kwargs)


def vit_tiny(patch_size: int = 8, in_chans: int = 3, **overrides) -> DinoVisionTransformer:
    """Small CPU-test model: width 192, depth 4, 3 heads of 64, 4 registers (not the standard ViT-Ti depth)."""
    return _build("vit_tiny", patch_size, in_chans, overrides)


def vit_small(patch_size: int = 8, in_chans: int = 3, **overrides) -> DinoVisionTransformer:
    """DINOv3 ViT-S: width 384, depth 12, 6 heads of 64, MLP 1536, 4 registers (patch 8 by default here)."""
    return _build("vit_small", patch_size, in_chans, overrides)


def vit_base(patch_size: int = 8, in_chans: int = 3, **overrides) -> DinoVisionTransformer:
    """DINOv3 ViT-B: width 768, depth 12, 12 heads of 64, MLP 3072, 4 registers."""
    return _build("vit_base", patch_size, in_chans, overrides)


_BUILDERS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def build_vit(arch: str, **kwargs) -> DinoVisionTransformer:
    """Build a backbone by name ("vit_tiny", "vit_small", "vit_base"); kwargs go to the builder."""
    try:
        builder = _BUILDERS[arch]
    except KeyError:
        raise ValueError(f"unknown ViT architecture {arch!r}; known: {sorted(_BUILDERS)}") from None
    return builder(**kwargs)
