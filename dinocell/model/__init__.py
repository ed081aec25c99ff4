"""DINOv3-compatible ViT backbone, its checkpoint loading (patch 16 -> 8, 3 -> 1 channels) and the DINO/iBOT heads."""

from dinocell.model.heads import DINOHead
from dinocell.model.patch_adapt import AdaptedKey, fold_input_channels, patch_embed_resize, resize_matrix
from dinocell.model.pretrained import LoadReport, extract_backbone_state_dict, load_dinov3_checkpoint, read_checkpoint
from dinocell.model.rope import RopePositionEmbedding, rope_apply, rope_rotate_half
from dinocell.model.vit import DinoVisionTransformer, build_vit, vit_base, vit_small, vit_tiny

__all__ = [
    "AdaptedKey",
    "DINOHead",
    "DinoVisionTransformer",
    "LoadReport",
    "RopePositionEmbedding",
    "build_vit",
    "extract_backbone_state_dict",
    "fold_input_channels",
    "load_dinov3_checkpoint",
    "patch_embed_resize",
    "read_checkpoint",
    "resize_matrix",
    "rope_apply",
    "rope_rotate_half",
    "vit_base",
    "vit_small",
    "vit_tiny",
]
