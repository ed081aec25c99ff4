"""Checkpoint loading: official layouts, strict errors, patch 16 -> 8 (PI-resize) fidelity, 3 -> 1 channel folding
(the ImageNet-normalisation fold on a real crop: tests/test_patch_fold.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinocell import storage
from dinocell.model import (
    DINOHead,
    fold_input_channels,
    load_dinov3_checkpoint,
    patch_embed_resize,
    resize_matrix,
    vit_small,
    vit_tiny,
)
from dinocell.model.patch_adapt import IMAGENET_NORM, InputNorm, fold_input_normalisation

torch.set_num_threads(2)


def _randomised(model):
    """Random weights everywhere (incl. LayerScale and registers), so a wrong key or a no-op load shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.2, 0.5)
            elif p.ndim == 1:
                p.normal_(std=0.1).add_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                p.normal_(std=0.05)
    return model


def _image(batch=2, chans=3, size=64, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, chans, size, size)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------- round trips
def test_plain_checkpoint_file_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    source = _randomised(vit_tiny(patch_size=8)).eval()
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)

    torch.manual_seed(1)
    target = vit_tiny(patch_size=8).eval()
    report = load_dinov3_checkpoint(target, path)
    assert report.source_format == "plain" and report.stripped_prefix == "" and report.source == str(path)
    assert report.loaded_keys == len(source.state_dict()) == 68
    assert report.adapted == [] and report.ignored_keys == [] and report.defaulted_keys == []
    x = _image()
    with torch.no_grad():
        a, b = source.forward_features(x), target.forward_features(x)
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
        assert torch.equal(a[key], b[key])
    assert "loaded 68 keys" in report.summary()


def test_training_checkpoint_with_prefixes_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    teacher = _randomised(vit_tiny(patch_size=8)).eval()
    student = _randomised(vit_tiny(patch_size=8)).eval()
    head = DINOHead(192, hidden_dim=64, bottleneck_dim=16, n_prototypes=32)

    def section(backbone):
        return {
            **{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
            **{f"dino_head.{k}": v for k, v in head.state_dict().items()},
        }

    ckpt = {"teacher": section(teacher), "student": section(student), "iteration": torch.tensor(1234)}
    path = tmp_path / "training.pth"
    torch.save(ckpt, path)

    loaded = vit_tiny(patch_size=8).eval()
    report = load_dinov3_checkpoint(loaded, path)
    assert (report.source_format, report.stripped_prefix) == ("teacher", "backbone.")
    assert report.ignored_keys == sorted(f"dino_head.{k}" for k in head.state_dict())
    x = _image()
    with torch.no_grad():
        assert torch.equal(loaded(x), teacher(x))
        report = load_dinov3_checkpoint(loaded, path, which="student")
        assert report.source_format == "student" and torch.equal(loaded(x), student(x))
    # {"model": ...} and an in-memory dict work the same way
    report = load_dinov3_checkpoint(loaded, {"model": section(teacher)})
    assert report.source_format == "model" and report.source == "<dict>"
    with torch.no_grad():
        assert torch.equal(loaded(x), teacher(x))


def test_checkpoint_from_s3(s3_bucket):
    torch.manual_seed(0)
    source = _randomised(vit_tiny(patch_size=8)).eval()
    import io

    buffer = io.BytesIO()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, buffer)
    uri = f"s3://{s3_bucket}/runs/r1/checkpoint.pth"
    storage.write_bytes(uri, buffer.getvalue())
    target = vit_tiny(patch_size=8).eval()
    report = load_dinov3_checkpoint(target, uri)
    assert report.source == uri and report.source_format == "teacher"
    x = _image()
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = _randomised(vit_tiny(patch_size=8)).eval()
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = vit_tiny(patch_size=8).eval()
    load_dinov3_checkpoint(target, path)
    x = _image()
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_periods_come_from_the_checkpoint_and_absent_buffers_are_reported():
    torch.manual_seed(0)
    source = _randomised(vit_tiny(patch_size=8))
    state = source.state_dict()
    rounded = state["rope_embed.periods"].to(torch.bfloat16)  # the released file stores bf16-rounded periods
    state["rope_embed.periods"] = rounded
    target = vit_tiny(patch_size=8)
    load_dinov3_checkpoint(target, state)
    assert torch.equal(target.rope_embed.periods, rounded.float())
    assert not torch.equal(target.rope_embed.periods, source.rope_embed.periods)

    del state["rope_embed.periods"], state["blocks.1.attn.qkv.bias_mask"]
    fresh = vit_tiny(patch_size=8)
    report = load_dinov3_checkpoint(fresh, state)
    assert report.defaulted_keys == ["rope_embed.periods", "blocks.1.attn.qkv.bias_mask"]  # state-dict order
    assert torch.equal(fresh.rope_embed.periods, source.rope_embed.periods)
    assert "defaulted (absent buffers): 2" in report.summary()


# ----------------------------------------------------------------------------------------------- errors
def test_mismatches_raise_one_error_naming_every_key(tmp_path):
    state = vit_tiny(patch_size=8).state_dict()
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(700, 192)
    del state["blocks.2.ls1.gamma"]
    state["blocks.9.attn.qkv.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    model = vit_tiny(patch_size=8)
    with pytest.raises(ValueError) as err:
        load_dinov3_checkpoint(model, path)
    message = str(err.value)
    assert str(path) in message and "3 problem(s)" in message
    assert "shape blocks.0.mlp.fc1.weight: expected [768, 192], found [700, 192]" in message
    assert "missing blocks.2.ls1.gamma: expected [192], not in checkpoint" in message
    assert "unexpected blocks.9.attn.qkv.weight: found [3], not in model" in message

    # non-strict: missing/unexpected are reported, the shape error still raises
    with pytest.raises(ValueError, match="shape blocks.0.mlp.fc1.weight"):
        load_dinov3_checkpoint(model, path, strict=False)
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(768, 192)
    report = load_dinov3_checkpoint(model, state, strict=False)
    assert report.missing_keys == ["blocks.2.ls1.gamma"] and report.unexpected_keys == ["blocks.9.attn.qkv.weight"]
    assert torch.count_nonzero(model.blocks[0].mlp.fc1.weight) == 0


def test_unadaptable_patch_kernel_and_bad_sources(tmp_path):
    state = vit_tiny(patch_size=16, in_chans=3).state_dict()
    with pytest.raises(
        ValueError, match=r"shape patch_embed.proj.weight: expected \[192, 5, 16, 16\], found \[192, 3, 16, 16\]"
    ):
        load_dinov3_checkpoint(vit_tiny(patch_size=16, in_chans=5), state)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.pth"):
        load_dinov3_checkpoint(vit_tiny(), tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: cannot read as a torch checkpoint"):
        load_dinov3_checkpoint(vit_tiny(), junk)
    with pytest.raises(ValueError, match=r"neither a state dict .* top-level keys: \['epoch', 'optimizer'\]"):
        load_dinov3_checkpoint(vit_tiny(), {"optimizer": {}, "epoch": 3})
    with pytest.raises(ValueError, match="no 'ema' section"):
        load_dinov3_checkpoint(vit_tiny(), {"teacher": state}, which="ema")


# ----------------------------------------------------------------------------------------------- patch resize
def test_pinv_resize_hand_case_2x2_to_1x1():
    # bilinear antialiased 2x2 -> 1x1 is the mean, A = [1/4 1/4 1/4 1/4]; pinv(A) = [1 1 1 1]^T: the new weight is
    # the sum of the old one, which preserves the response to any constant patch
    a = resize_matrix((2, 2), (1, 1))
    torch.testing.assert_close(a, torch.full((1, 4), 0.25, dtype=torch.float64))
    w = torch.tensor([[[[1.0, 2.0], [3.0, -4.0]]]])
    assert patch_embed_resize(w, 1).item() == pytest.approx(2.0)
    assert patch_embed_resize(w, 1, method="bilinear").item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown method 'nearest'"):
        patch_embed_resize(w, 1, method="nearest")


def test_resize_matrix_reproduces_image_resizing():
    x = torch.randn(5, 1, 16, 16, dtype=torch.float64)
    direct = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close((resize_matrix((16, 16), (8, 8)) @ x.reshape(5, 256, 1)).reshape(5, 1, 8, 8), direct)


def test_pinv_resize_is_exact_when_enlarging():
    # 8 -> 16: <resize(x), w16> == <x, w8> for every patch x (A has full column rank)
    torch.manual_seed(0)
    w8 = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    w16 = patch_embed_resize(w8, 16)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    x16 = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(F.conv2d(x16, w16, stride=16), F.conv2d(x, w8, stride=8))


def test_patch_16_to_8_fidelity_beats_bilinear():
    """ViT-S/16 on a 224 image vs the PI-resized ViT-S/8 on the same image at 112 (same 14x14 token grid).

    Random weights with LayerScale raised to 0.3 (at the init value 1e-5 the blocks would be near-identities and
    the final tokens would only echo the patch embedding); a smooth-ish image (Gaussian-blurred noise, sigma 3 px,
    like the cell-scale structure the crops hold); the half-size image is made with the same bilinear antialiased
    resize the kernel adaptation assumes.
    """
    torch.manual_seed(0)
    model16 = vit_small(patch_size=16).eval()
    with torch.no_grad():
        for block in model16.blocks:
            block.ls1.gamma.fill_(0.3)
            block.ls2.gamma.fill_(0.3)
    state = model16.state_dict()
    x = _gaussian_blur(torch.randn(2, 3, 224, 224), 3.0)
    x = (x - x.mean()) / x.std()
    x_half = F.interpolate(x, size=(112, 112), mode="bilinear", antialias=True, align_corners=False)

    errors = {}
    with torch.no_grad():
        ref_embed, _ = model16.patch_embed(x)
        ref = model16.forward_features(x)
        kernel16 = state["patch_embed.proj.weight"]
        candidates = {
            "pinv": None,
            "bilinear": None,
            # a stronger naive baseline: bilinear kernel resize scaled by the area ratio (16/8)^2
            "bilinear_x4": patch_embed_resize(kernel16, 8, method="bilinear") * 4.0,
        }
        for name, kernel in candidates.items():
            model8 = vit_small(patch_size=8).eval()
            source = dict(state)
            if kernel is not None:
                source["patch_embed.proj.weight"] = kernel
            report = load_dinov3_checkpoint(model8, source, patch_resize_method=name if kernel is None else "pinv")
            if kernel is None:
                assert [(a.key, a.old_shape, a.new_shape) for a in report.adapted] == [
                    ("patch_embed.proj.weight", (384, 3, 16, 16), (384, 3, 8, 8))
                ]
            embed, _ = model8.patch_embed(x_half)
            out = model8.forward_features(x_half)
            errors[name] = {
                "patch_embed": _rel(embed, ref_embed),
                "cls": _rel(out["x_norm_clstoken"], ref["x_norm_clstoken"]),
                "patch_tokens": _rel(out["x_norm_patchtokens"], ref["x_norm_patchtokens"]),
            }
    for name, e in errors.items():
        print(
            f"16->8 {name:12s} rel. error: patch embedding {e['patch_embed']:.4f}, "
            f"CLS {e['cls']:.4f}, patch tokens {e['patch_tokens']:.4f}"
        )
    for stage in ("patch_embed", "cls", "patch_tokens"):
        assert errors["pinv"][stage] < errors["bilinear"][stage]
        assert errors["pinv"][stage] < errors["bilinear_x4"][stage]
    assert errors["pinv"]["patch_embed"] < 0.15


# ----------------------------------------------------------------------------------------------- channels
def test_channel_folding_equals_grey_repeated_three_times():
    """checkpoint_norm=None (the checkpoint saw every channel normalised like the target): the plain channel sum is
    exactly the RGB model on the grey input repeated 3 times."""
    torch.manual_seed(0)
    rgb = _randomised(vit_tiny(patch_size=8, in_chans=3)).eval()
    grey_model = vit_tiny(patch_size=8, in_chans=1).eval()
    report = load_dinov3_checkpoint(grey_model, rgb.state_dict(), checkpoint_norm=None)
    assert [(a.old_shape, a.new_shape) for a in report.adapted] == [((192, 3, 8, 8), (192, 1, 8, 8))]
    assert report.adapted[0].how == "summed 3 input channels"
    torch.testing.assert_close(grey_model.patch_embed.proj.bias, rgb.patch_embed.proj.bias, rtol=0, atol=0)
    grey = _image(chans=1)
    with torch.no_grad():
        a = grey_model.forward_features(grey)
        b = rgb.forward_features(grey.repeat(1, 3, 1, 1))
    torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a["x_norm_clstoken"], b["x_norm_clstoken"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot adapt a 3-channel patch kernel to 2 channels"):
        fold_input_channels(torch.zeros(4, 3, 2, 2), 2)


def test_normalisation_fold_hand_case_and_errors():
    # one output, a 1x1 kernel per channel: y = sum_c w_c (g - m_c) / s_c + b must equal w' (g - m) / s + b'
    w = torch.tensor([[[[1.0]], [[2.0]], [[-1.0]]]], dtype=torch.float64)
    b = torch.tensor([0.5], dtype=torch.float64)
    src, dst = InputNorm((0.1, 0.2, 0.3), (0.5, 0.25, 2.0)), InputNorm((0.4,), (0.1,))
    w1, b1 = fold_input_normalisation(w, b, src, dst)
    # w' = 0.1 * (1/0.5 + 2/0.25 - 1/2) = 0.95; b' = 0.5 + 1*(0.3/0.5) + 2*(0.2/0.25) - 1*(0.1/2) = 2.65
    assert w1.shape == (1, 1, 1, 1) and w1.item() == pytest.approx(0.95) and b1.item() == pytest.approx(2.65)
    for g in (0.0, 0.37, 1.0):
        y3 = sum(w[0, c, 0, 0] * (g - src.mean[c]) / src.std[c] for c in range(3)) + b[0]
        assert (w1[0, 0, 0, 0] * (g - 0.4) / 0.1 + b1[0]).item() == pytest.approx(y3.item(), abs=1e-12)
    # equal statistics: the plain sum, bias untouched
    same = InputNorm((0.449,) * 3, (0.226,) * 3)
    w2, b2 = fold_input_normalisation(w, b, same, InputNorm((0.449,), (0.226,)))
    torch.testing.assert_close(w2, w.sum(1, keepdim=True))
    torch.testing.assert_close(b2, b)
    with pytest.raises(ValueError, match="source normalisation has 3 channels"):
        fold_input_normalisation(torch.zeros(2, 2, 1, 1), torch.zeros(2), IMAGENET_NORM, dst)
    with pytest.raises(ValueError, match="every std must be > 0"):
        InputNorm((0.5,), (0.0,))
    state = vit_tiny(patch_size=8, in_chans=3).state_dict()
    del state["patch_embed.proj.bias"]
    with pytest.raises(ValueError, match="patch_embed.proj.bias is not in the checkpoint"):
        load_dinov3_checkpoint(vit_tiny(patch_size=8, in_chans=1), state)


def test_fold_and_resize_together_are_reported():
    # the ViT-S/16 RGB release -> the 1-channel ViT-S/8 this project trains
    state = vit_small(patch_size=16, in_chans=3).state_dict()
    model = vit_small(patch_size=8, in_chans=1)
    report = load_dinov3_checkpoint(model, state)
    assert len(report.adapted) == 1
    adapted = report.adapted[0]
    assert (adapted.old_shape, adapted.new_shape) == ((384, 3, 16, 16), (384, 1, 8, 8))
    assert adapted.how == ("folded 3 input channels (mean 0.485/0.456/0.406, std 0.229/0.224/0.225 -> mean 0.449, "
                           "std 0.226; patch_embed.proj.bias shifted); pinv resize 16x16 -> 8x8")
    # the fold at patch 16 (ImageNet per-channel stats -> dinocell's grey 0.449 / 0.226), then the resize
    kernel16, bias = fold_input_normalisation(state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                                              IMAGENET_NORM, InputNorm((0.449,), (0.226,)))
    torch.testing.assert_close(model.patch_embed.proj.weight, patch_embed_resize(kernel16, 8))
    torch.testing.assert_close(model.patch_embed.proj.bias, bias)
    assert not torch.allclose(bias, state["patch_embed.proj.bias"])  # the mean shift lands in the bias
    assert report.loaded_keys == 188
