"""DINOv3's per-channel ImageNet normalisation folded into the RGB -> 1 patch-embedding fold, on a real Cell Painting
crop (tests/data, see its NOTICE.md): the 1-channel model on the crop normalised the way dinocell normalises its grey
crops equals the RGB model on the crop repeated 3 times and normalised per channel with ImageNet's statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinocell.config.augment import AugmentConfig
from dinocell.model import build_vit, load_dinov3_checkpoint
from dinocell.model.patch_adapt import IMAGENET_MEAN, IMAGENET_STD
from dinocell.monitor.consistency import default_normalisation

torch.set_num_threads(2)

CROP = Path(__file__).parent / "data" / "phenix_BR00121482_A01_s1_DNA_crop128.npy"


@pytest.fixture(scope="module")
def crop() -> torch.Tensor:
    """The real DNA crop as g = x / 255 in [0, 1], [1, 1, 128, 128] float32."""
    u8 = np.load(CROP)
    assert u8.shape == (128, 128) and u8.dtype == np.uint8 and u8.std() > 20  # nuclei, not empty background
    return torch.from_numpy(u8).float().div(255.0).view(1, 1, 128, 128)


def _dinocell_norm(g: torch.Tensor) -> torch.Tensor:
    """What the model sees in training (AugmentConfig norm_mean / norm_std) and in evaluation (default_normalisation)."""
    mean, std = default_normalisation()
    cfg = AugmentConfig()
    assert (mean, std) == (cfg.norm_mean, cfg.norm_std)  # one normalisation for training and evaluation
    return (g - mean) / std


def _imagenet_norm(g: torch.Tensor) -> torch.Tensor:
    """The grey image repeated on R, G, B and normalised per channel, as DINOv3 was trained."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (g.expand(-1, 3, -1, -1) - mean) / std


def vit_small(patch_size: int, in_chans: int) -> torch.nn.Module:
    """ViT-S (width 384, 6 heads, the released patch kernel's shape) with 4 blocks instead of 12: same layers, a
    third of the time (building and initialising 21M parameters dominates these tests)."""
    return build_vit("vit_small", patch_size=patch_size, in_chans=in_chans, depth=4)


def _rgb_vits16() -> torch.nn.Module:
    """The released architecture (ViT-S/16, RGB; 4 blocks) with random weights, LayerScale raised to 0.3 so the final
    features depend on the input (at 1e-5 the blocks are near-identities); the patch kernel keeps its init."""
    torch.manual_seed(0)
    model = vit_small(patch_size=16, in_chans=3).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.ls1.gamma.fill_(0.3)
            block.ls2.gamma.fill_(0.3)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _errors(model_a, x_a, model_b, x_b) -> dict[str, float]:
    with torch.no_grad():
        emb_a, _ = model_a.patch_embed(x_a)
        emb_b, _ = model_b.patch_embed(x_b)
        out_a, out_b = model_a.forward_features(x_a), model_b.forward_features(x_b)
    return {
        "patch_embed": _rel(emb_a, emb_b),
        "cls": _rel(out_a["x_norm_clstoken"], out_b["x_norm_clstoken"]),
        "patch_tokens": _rel(out_a["x_norm_patchtokens"], out_b["x_norm_patchtokens"]),
    }


def test_folded_grey_model_equals_rgb_model_with_imagenet_stats_on_a_real_crop(crop):
    rgb = _rgb_vits16()
    reference_input = _imagenet_norm(crop)

    grey = vit_small(patch_size=16, in_chans=1).eval()
    report = load_dinov3_checkpoint(grey, rgb.state_dict())
    assert [(a.key, a.old_shape, a.new_shape) for a in report.adapted] == [
        ("patch_embed.proj.weight", (384, 3, 16, 16), (384, 1, 16, 16))
    ]
    assert "ImageNet" not in report.adapted[0].how and "mean 0.485/0.456/0.406" in report.adapted[0].how
    folded = _errors(grey, _dinocell_norm(crop), rgb, reference_input)

    # the plain channel sum (what the loader did before): ignores ImageNet's per-channel mean and std
    summed = vit_small(patch_size=16, in_chans=1).eval()
    load_dinov3_checkpoint(summed, rgb.state_dict(), checkpoint_norm=None)
    naive = _errors(summed, _dinocell_norm(crop), rgb, reference_input)
    print(f"rel. error vs the RGB model: folded {folded}, plain sum {naive}")

    for stage in ("patch_embed", "cls", "patch_tokens"):
        assert folded[stage] < 1e-5, (stage, folded)  # fp32 precision: the fold is exact
        assert naive[stage] > 0.02, (stage, naive)  # and it matters on a real crop
    with torch.no_grad():  # elementwise too, not only in norm
        torch.testing.assert_close(grey.patch_embed(_dinocell_norm(crop))[0], rgb.patch_embed(reference_input)[0],
                                   rtol=1e-5, atol=1e-5)


def test_fold_composes_with_the_16_to_8_resize_on_a_real_crop(crop):
    """The released RGB ViT-S/16 on the crop vs the 1-channel ViT-S/8 this project trains on the half-size crop (same
    8x8 token grid): the fold adds no error to what the PI-resize alone costs (the RGB ViT-S/8 on the half-size
    ImageNet-normalised crop), and that stays as before (< 15% at the patch embedding)."""
    rgb16 = _rgb_vits16()
    reference_input = _imagenet_norm(crop)

    def half(x):  # the bilinear antialiased downsampling the PI-resize assumes (per channel, so it commutes)
        return F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)

    grey8 = vit_small(patch_size=8, in_chans=1).eval()
    report = load_dinov3_checkpoint(grey8, rgb16.state_dict())
    assert report.adapted[0].new_shape == (384, 1, 8, 8) and report.adapted[0].how.endswith("pinv resize 16x16 -> 8x8")
    folded = _errors(grey8, half(_dinocell_norm(crop)), rgb16, reference_input)

    rgb8 = vit_small(patch_size=8, in_chans=3).eval()
    load_dinov3_checkpoint(rgb8, rgb16.state_dict())
    resize_only = _errors(rgb8, half(reference_input), rgb16, reference_input)
    print(f"16->8 rel. error vs the RGB ViT-S/16: fold + resize {folded}, resize only {resize_only}")

    assert folded["patch_embed"] < 0.15
    for stage in ("patch_embed", "cls", "patch_tokens"):
        assert folded[stage] <= resize_only[stage] * 1.01 + 1e-6, (stage, folded, resize_only)
