"""Multi-view channel-consistency augmentation: sources, boxes, geometry, photometric ops, randomness, validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinocell.channels import FLUORESCENT_CHANNELS
from dinocell.data.augment_ops import (
    brightness_contrast,
    crop_resize,
    gaussian_blur,
    max_box_size,
    orientation_as_flips,
    sample_crop_boxes,
    solarize,
)
from dinocell.data.multiview import MEAN_SOURCE, AugmentConfig, MultiViewAugment

torch.set_num_threads(1)

FLUO = list(FLUORESCENT_CHANNELS)
# A permuted channel order with brightfield in the middle: provenance must index into *this* list.
MIXED = ["Mito", "DNA", "HighZBF", "ER", "RNA", "Brightfield", "AGP"]


def small_cfg(**overrides) -> AugmentConfig:
    """Small crops for 128x128 test fields."""
    values = {"global_size": 32, "local_size": 16}
    values.update(overrides)
    return AugmentConfig(**values)


def plain_cfg(**overrides) -> AugmentConfig:
    """No jitter, blur or solarize; normalisation reduced to x / 255 so outputs read back on the 0-255 scale."""
    values = {
        "jitter_prob": 0.0,
        "blur_prob_global1": 0.0,
        "blur_prob_global2": 0.0,
        "blur_prob_local": 0.0,
        "solarize_prob": 0.0,
        "norm_mean": 0.0,
        "norm_std": 1.0 / 255.0,
    }
    values.update(overrides)
    return small_cfg(**values)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def constant_fields(names, batch=8, size=128) -> tuple[torch.Tensor, torch.Tensor]:
    """Field b, channel c is the constant 20 * (c + 1) + b: a crop's value names its field and its channel."""
    values = torch.tensor([[20 * (c + 1) + b for c in range(len(names))] for b in range(batch)], dtype=torch.uint8)
    return values[:, :, None, None].expand(batch, len(names), size, size).contiguous(), values.float()


def expected_source_value(values: torch.Tensor, names, source: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    fluo_idx = [names.index(n) for n in FLUORESCENT_CHANNELS]
    mean = values[:, fluo_idx].mean(dim=1)
    single = values[field, source.clamp(min=0)]
    return torch.where(source == MEAN_SOURCE, mean[field], single)


def field_of_row(n_slots: int, batch: int) -> torch.Tensor:
    return torch.arange(batch).repeat(n_slots)  # crop-major: row s * B + b belongs to field b


# ---------------------------------------------------------------------------------------------------------------
# Low-level ops


@pytest.mark.parametrize("method", ["taps", "matmul"])
def test_crop_resize_equals_crop_then_antialiased_interpolate(method):
    images = torch.rand(4, 100, 80, generator=gen(1)) * 255
    boxes = torch.tensor([[10, 5, 50, 60], [0, 0, 80, 100], [7, 3, 20, 20], [79, 99, 1, 1]], dtype=torch.float32)
    for out_size in (16, 33, 40):  # downsampling, near 1:1, upsampling
        got = crop_resize(images, torch.arange(4), boxes, out_size, method=method)
        for i, (x0, y0, w, h) in enumerate(boxes.long().tolist()):
            crop = images[i, y0 : y0 + h, x0 : x0 + w][None, None]
            ref = F.interpolate(crop, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
            torch.testing.assert_close(got[i], ref[0, 0], atol=1e-3, rtol=0)


def test_crop_resize_reads_nothing_outside_its_box_and_picks_its_image():
    images = torch.full((3, 64, 64), 255.0)
    images[1, 20:40, 10:30] = 7.0
    out = crop_resize(images, torch.tensor([1, 1]), torch.tensor([[10.0, 20.0, 20.0, 20.0]] * 2), 6)
    torch.testing.assert_close(out, torch.full_like(out, 7.0))


def test_crop_resize_methods_agree_on_fractional_boxes_with_flips():
    images = torch.rand(3, 90, 70, generator=gen(23)) * 255
    n = 12
    index = torch.randint(0, 3, (n,), generator=gen(24))
    boxes = sample_crop_boxes(n, 90, 70, (0.05, 1.0), (3 / 4, 4 / 3), gen(25), torch.device("cpu"))
    flips = [torch.rand(n, generator=gen(26 + i)) < 0.5 for i in range(3)]
    taps = crop_resize(images, index, boxes, 24, None, "taps", *flips)
    dense = crop_resize(images, index, boxes, 24, None, "matmul", *flips)
    torch.testing.assert_close(taps, dense, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="method"):
        crop_resize(images, index, boxes, 24, method="nearest")


def test_orientation_hand_computed_and_all_sixteen_combinations():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    hflip = torch.tensor([True, False, False, True])
    vflip = torch.tensor([False, True, False, True])
    rot = torch.tensor([0, 0, 1, 1])
    whole = torch.tensor([[0.0, 0.0, 2.0, 2.0]] * 4)
    flips = orientation_as_flips(hflip, vflip, rot)
    out = crop_resize(x[None], torch.zeros(4, dtype=torch.long), whole, 2, None, "taps", *flips)
    assert out[0].tolist() == [[2, 1], [4, 3]]  # left-right
    assert out[1].tolist() == [[3, 4], [1, 2]]  # up-down
    assert out[2].tolist() == [[2, 4], [1, 3]]  # a quarter turn counter-clockwise
    assert out[3].tolist() == [[3, 1], [4, 2]]  # hflip + vflip (a half turn), then a quarter turn

    image = torch.arange(25.0).view(1, 5, 5)  # no symmetry
    combos = [(h, v, k) for h in (False, True) for v in (False, True) for k in range(4)]
    h, v, k = (torch.tensor(c) for c in zip(*combos))
    whole = torch.tensor([[0.0, 0.0, 5.0, 5.0]] * 16)
    out = crop_resize(image, torch.zeros(16, dtype=torch.long), whole, 5, None, "taps", *orientation_as_flips(h, v, k))
    for i, (hi, vi, ki) in enumerate(combos):
        expected = image[0]
        if hi:
            expected = expected.flip(-1)
        if vi:
            expected = expected.flip(-2)
        torch.testing.assert_close(out[i], torch.rot90(expected, ki, dims=(-2, -1)), atol=1e-4, rtol=0)


def test_gaussian_blur_of_a_point_is_the_normalised_kernel_outer_product():
    sigma = 1.3
    image = torch.zeros(1, 15, 15)
    image[0, 7, 7] = 1.0
    out = gaussian_blur(image, torch.tensor([sigma]), kernel_size=9)
    d = torch.arange(-4, 5, dtype=torch.float32)
    k = torch.exp(-(d**2) / (2 * sigma**2))
    k = k / k.sum()
    expected = torch.zeros(15, 15)
    expected[3:12, 3:12] = torch.outer(k, k)
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)


def test_gaussian_blur_per_image_sigma_identity_and_reflect_border():
    images = torch.rand(3, 12, 12, generator=gen(2)) * 255
    images[2] = 77.0
    out = gaussian_blur(images, torch.tensor([0.0, 2.0, 2.0]), kernel_size=9)
    assert torch.equal(out[0], images[0])  # sigma 0: untouched
    assert not torch.allclose(out[1], images[1])
    torch.testing.assert_close(out[2], images[2])  # reflect padding keeps a constant image constant
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(images, torch.ones(3), kernel_size=4)


def test_brightness_contrast_hand_computed():
    x = torch.tensor([[[0.0, 100.0], [0.0, 100.0]], [[200.0, 200.0], [100.0, 100.0]]])
    out = brightness_contrast(x, torch.tensor([1.0, 1.5]), torch.tensor([0.5, 1.0]))
    assert out[0].tolist() == [[25.0, 75.0], [25.0, 75.0]]  # mean 50, deviations halved
    assert out[1].tolist() == [[255.0, 255.0], [150.0, 150.0]]  # 300 clamps to 255


def test_solarize_inverts_at_and_above_threshold_only_where_applied():
    x = torch.tensor([[[10.0, 127.0, 128.0, 250.0]]]).expand(2, 1, 4)
    out = solarize(x, torch.tensor([True, False]), threshold=128)
    assert out[0].tolist() == [[10.0, 127.0, 127.0, 5.0]]
    assert torch.equal(out[1], x[1])


def test_sample_crop_boxes_respect_scale_ratio_and_field():
    for height, width in ((128, 128), (96, 160)):
        for scale in ((0.32, 1.0), (0.05, 0.32)):
            boxes = sample_crop_boxes(4000, height, width, scale, (3 / 4, 4 / 3), gen(3), torch.device("cpu"))
            x0, y0, w, h = boxes.unbind(1)
            area = w * h / (height * width)
            aspect = w / h
            assert area.min() >= scale[0] - 1e-5 and area.max() <= scale[1] + 1e-5
            assert aspect.min() >= 3 / 4 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5
            assert x0.min() >= 0 and y0.min() >= 0
            assert (x0 + w).max() <= width + 1e-3 and (y0 + h).max() <= height + 1e-3
            # The whole range is used: near both ends (a square field can hold every allowed area).
            span = scale[1] - scale[0]
            assert area.min() < scale[0] + 0.05 * span
            if height == width:
                assert area.max() > scale[1] - 0.1 * span


def test_max_box_size_bounds_the_sampled_boxes_tightly():
    for height, width in ((128, 128), (96, 160), (300, 60)):
        for scale in ((0.32, 1.0), (0.05, 0.32)):
            boxes = sample_crop_boxes(4000, height, width, scale, (3 / 4, 4 / 3), gen(27), torch.device("cpu"))
            max_w, max_h = max_box_size(height, width, scale, (3 / 4, 4 / 3))
            assert boxes[:, 2].max() <= max_w + 1e-3 and boxes[:, 3].max() <= max_h + 1e-3
            assert boxes[:, 2].max() > 0.9 * max_w and boxes[:, 3].max() > 0.9 * max_h  # tight: few taps wasted


def test_sample_crop_boxes_falls_back_to_a_centre_crop():
    # Area 1.0 at aspect 2..3 never fits a square: torchvision's fallback clamps the aspect to 2 and centres.
    boxes = sample_crop_boxes(5, 100, 100, (1.0, 1.0), (2.0, 3.0), gen(), torch.device("cpu"))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 25.0, 100.0, 50.0]]).expand(5, 4))


# ---------------------------------------------------------------------------------------------------------------
# Views: which source fed which crop, from which field


def test_output_shapes_and_counts():
    fields, _ = constant_fields(FLUO)
    out = MultiViewAugment(small_cfg(n_local=3))(fields, FLUO, gen())
    assert out.global_crops.shape == (16, 1, 32, 32) and out.global_crops.dtype == torch.float32
    assert out.local_crops.shape == (24, 1, 16, 16)
    assert (out.n_global_crops, out.n_local_crops, out.batch_size, out.field_size) == (2, 3, 8, (128, 128))
    assert out.global_views.box.shape == (16, 4) and out.local_views.source.shape == (24,)
    no_locals = MultiViewAugment(small_cfg(n_local=0))(fields, FLUO, gen())
    assert no_locals.local_crops.shape == (0, 1, 16, 16) and no_locals.n_local_crops == 0


def test_each_crop_shows_its_recorded_source_from_its_own_field():
    fields, values = constant_fields(MIXED)
    out = MultiViewAugment(plain_cfg())(fields, MIXED, gen(4))
    batch = 8
    for crops, views, n_slots in ((out.global_crops, out.global_views, 2), (out.local_crops, out.local_views, 8)):
        field = field_of_row(n_slots, batch)
        expected = expected_source_value(values, MIXED, views.source, field)
        torch.testing.assert_close(crops[:, 0], expected[:, None, None].expand_as(crops[:, 0]), atol=1e-3, rtol=0)
    g_src = out.global_views.source
    assert torch.all(g_src[:batch] == MEAN_SOURCE)  # global crop 1: the fluorescent mean
    fluo_idx = torch.tensor([MIXED.index(n) for n in FLUORESCENT_CHANNELS])
    assert torch.isin(g_src[batch:], fluo_idx).all()  # global crop 2: one fluorescent channel (brightfield off)
    local_single = out.local_views.source[out.local_views.source != MEAN_SOURCE]
    assert torch.isin(local_single, fluo_idx).all()


def test_source_frequencies_match_the_probabilities():
    aug = MultiViewAugment(plain_cfg(global_size=16, local_size=8))
    fields, _ = constant_fields(FLUO, batch=64, size=24)
    g = gen(5)
    local_src, global2_src = [], []
    for _ in range(8):  # 8 x 64 fields x 8 locals = 4096 local crops, 512 second global crops
        out = aug(fields, FLUO, g)
        local_src.append(out.local_views.source)
        global2_src.append(out.global_views.source[64:])
    local_src, global2_src = torch.cat(local_src), torch.cat(global2_src)
    mean_fraction = (local_src == MEAN_SOURCE).float().mean().item()
    assert abs(mean_fraction - 0.3) < 0.03, mean_fraction  # 4 sigma; 0.25 or 0.35 would already fail
    singles = torch.cat([local_src[local_src != MEAN_SOURCE], global2_src])
    counts = torch.bincount(singles, minlength=5).float() / len(singles)
    assert torch.all((counts - 0.2).abs() < 0.03), counts  # each fluorescent channel equally likely


def test_brightfield_probability_semantics():
    fields, values = constant_fields(MIXED, batch=64, size=24)
    bf_idx = torch.tensor([MIXED.index("HighZBF"), MIXED.index("Brightfield")])
    aug = MultiViewAugment(plain_cfg(global_size=16, local_size=8, brightfield_prob=0.4))
    g = gen(6)
    sources, global1 = [], []
    for _ in range(6):
        out = aug(fields, MIXED, g)
        assert out.brightfield_available
        # Crops show their recorded source; the mean stays over the fluorescent channels only.
        expected = expected_source_value(values, MIXED, out.local_views.source, field_of_row(8, 64))
        torch.testing.assert_close(out.local_crops[:, 0, 0, 0], expected, atol=1e-3, rtol=0)
        sources += [out.global_views.source[64:], out.local_views.source]
        global1.append(out.global_views.source[:64])
    sources = torch.cat(sources)
    singles = sources[sources != MEAN_SOURCE]
    is_bf = torch.isin(singles, bf_idx)
    assert abs(is_bf.float().mean().item() - 0.4) < 0.03
    bf_counts = torch.bincount(singles[is_bf], minlength=len(MIXED))[bf_idx].float()
    assert abs(bf_counts[0] / bf_counts.sum() - 0.5) < 0.05  # uniform among the brightfield channels present
    assert torch.all(torch.cat(global1) == MEAN_SOURCE)  # the mean stays fluorescent-only

    # Brightfield requested but absent: fluorescent channels only, and the batch says so.
    fluo_fields, _ = constant_fields(FLUO, batch=16, size=24)
    out = aug(fluo_fields, FLUO, g)
    assert not out.brightfield_available
    assert int(out.local_views.source.max()) < 5
    stats = out.stats()
    assert stats["local/brightfield_fraction"] == 0.0 and stats["global/mean_fraction"] == 0.5

    # Off by default even when brightfield channels are present.
    out = MultiViewAugment(plain_cfg(global_size=16, local_size=8))(fields, MIXED, g)
    assert not torch.isin(torch.cat([out.global_views.source, out.local_views.source]), bf_idx).any()


def test_crop_boxes_in_provenance_respect_the_scale_ranges():
    fields, _ = constant_fields(FLUO)
    g = gen(7)
    aug = MultiViewAugment(plain_cfg())
    for _ in range(4):
        out = aug(fields, FLUO, g)
        for views, (lo, hi) in ((out.global_views, (0.32, 1.0)), (out.local_views, (0.05, 0.32))):
            x0, y0, w, h = views.box.unbind(1)
            area = w * h / (128 * 128)
            assert area.min() >= lo - 1e-5 and area.max() <= hi + 1e-5
            assert x0.min() >= 0 and (x0 + w).max() <= 128 + 1e-3 and y0.min() >= 0 and (y0 + h).max() <= 128 + 1e-3


def test_crops_show_the_recorded_box_flip_and_rotation():
    """Random textures (no symmetry): each crop equals crop+resize of its recorded box, then its recorded flips/turn."""
    fields = torch.randint(0, 256, (8, 5, 64, 64), dtype=torch.uint8, generator=gen(8))
    out = MultiViewAugment(plain_cfg(global_size=24, local_size=12))(fields, FLUO, gen(9))
    means = fields.float().mean(dim=1)
    for crops, views, n_slots, size in (
        (out.global_crops, out.global_views, 2, 24),
        (out.local_crops, out.local_views, 8, 12),
    ):
        field = field_of_row(n_slots, 8)
        source = views.source
        images = torch.where(
            (source == MEAN_SOURCE)[:, None, None], means[field], fields[field, source.clamp(min=0)].float()
        )
        plain = crop_resize(images, torch.arange(len(images)), views.box, size)
        for i in range(len(plain)):
            expected = plain[i]
            if views.hflip[i]:
                expected = expected.flip(-1)
            if views.vflip[i]:
                expected = expected.flip(-2)
            expected = torch.rot90(expected, int(views.rot90[i]), dims=(-2, -1))
            torch.testing.assert_close(crops[i, 0], expected, atol=1e-3, rtol=0)
    views = out.local_views
    assert 0 < views.hflip.sum() < len(views.hflip) and 0 < views.vflip.sum() < len(views.vflip)
    assert set(views.rot90.tolist()) == {0, 1, 2, 3}


def test_resample_methods_give_the_same_crops():
    fields = torch.randint(0, 256, (4, 5, 64, 64), dtype=torch.uint8, generator=gen(28))
    taps = MultiViewAugment(small_cfg(resample="taps"))(fields, FLUO, gen(29))
    dense = MultiViewAugment(small_cfg(resample="matmul"))(fields, FLUO, gen(29))
    torch.testing.assert_close(taps.global_crops, dense.global_crops, atol=1e-4, rtol=0)
    torch.testing.assert_close(taps.local_crops, dense.local_crops, atol=1e-4, rtol=0)


def test_orientation_transforms_can_be_switched_off():
    fields = torch.randint(0, 256, (8, 5, 64, 64), dtype=torch.uint8, generator=gen(10))
    out = MultiViewAugment(plain_cfg(hflip_prob=0.0, vflip_prob=0.0, rotate90=False))(fields, FLUO, gen())
    views = out.local_views
    assert not views.hflip.any() and not views.vflip.any() and not views.rot90.any()


def test_curriculum_starts_from_near_whole_unturned_crops_and_ends_as_configured():
    """augment.curriculum_iters: iteration 0 = global crops of area >= curriculum_start_scale, no flip or turn; half-way
    the bounds and probabilities are half-way; from curriculum_iters on the crops are bit-identical to no curriculum."""
    fields = torch.randint(0, 256, (64, 5, 128, 128), dtype=torch.uint8, generator=gen(40))
    cfg = plain_cfg(curriculum_iters=100, curriculum_start_scale=0.9)
    aug, off = MultiViewAugment(cfg), MultiViewAugment(plain_cfg())

    first = aug(fields, FLUO, gen(41), iteration=0)
    for views in (first.global_views, first.local_views):
        assert not views.hflip.any() and not views.vflip.any() and not views.rot90.any()
    x0, y0, w, h = first.global_views.box.unbind(1)
    assert (w * h / 128**2).min() >= 0.9 - 1e-5

    half = aug(fields, FLUO, gen(42), iteration=50).global_views
    area = half.box[:, 2] * half.box[:, 3] / 128**2
    assert area.min() >= (0.9 + 0.32) / 2 - 1e-5 and area.min() < 0.7  # bound half-way, and reached
    local = aug(fields, FLUO, gen(42), iteration=50).local_views  # 512 crops: probabilities about half theirs
    assert 0.1 < local.hflip.float().mean() < 0.4 and 0.2 < (local.rot90 > 0).float().mean() < 0.55

    for it in (100, 5000, None):
        done, plain = aug(fields, FLUO, gen(43), iteration=it), off(fields, FLUO, gen(43))
        assert torch.equal(done.global_crops, plain.global_crops) and torch.equal(done.local_crops, plain.local_crops)
    # no curriculum: the iteration changes nothing
    assert torch.equal(off(fields, FLUO, gen(44), iteration=0).global_crops, off(fields, FLUO, gen(44)).global_crops)


def test_curriculum_settings_are_validated():
    with pytest.raises(ValueError, match="curriculum_iters: must be an integer >= 0"):
        small_cfg(curriculum_iters=-1)
    with pytest.raises(ValueError, match="curriculum_start_scale: must be in \\[global_scale low, high\\]"):
        small_cfg(curriculum_iters=10, global_scale=(0.32, 0.8), curriculum_start_scale=0.9)
    small_cfg(global_scale=(0.95, 1.0))  # the default start scale is only checked when the curriculum is on


# ---------------------------------------------------------------------------------------------------------------
# Photometric steps


def test_blur_probabilities_per_slot_and_effect():
    fields = torch.randint(0, 256, (64, 5, 32, 32), dtype=torch.uint8, generator=gen(11))
    cfg = plain_cfg(global_size=16, local_size=8, blur_prob_global1=1.0, blur_prob_global2=0.1, blur_prob_local=0.5)
    g = gen(12)
    g1, g2, loc = [], [], []
    for _ in range(8):
        views = MultiViewAugment(cfg)(fields, FLUO, g).global_views
        g1.append(views.blurred[:64])
        g2.append(views.blurred[64:])
        loc.append(MultiViewAugment(cfg)(fields, FLUO, g).local_views.blurred)
    assert torch.cat(g1).all()
    assert abs(torch.cat(g2).float().mean().item() - 0.1) < 0.04  # 512 draws: sd 0.013
    assert abs(torch.cat(loc).float().mean().item() - 0.5) < 0.03  # 4096 draws: sd 0.008

    # Same seed with blur off: every other draw is unchanged, so unblurred crops are identical and blurred ones
    # are exactly the blur (with the recorded sigma) of the unblurred crop.
    blurred = MultiViewAugment(cfg)(fields, FLUO, gen(13))
    sharp = MultiViewAugment(plain_cfg(global_size=16, local_size=8))(fields, FLUO, gen(13))
    views = blurred.local_views
    assert 0 < views.blurred.sum() < len(views.blurred)
    torch.testing.assert_close(views.box, sharp.local_views.box)
    assert torch.all((views.blur_sigma[views.blurred] >= 0.1) & (views.blur_sigma[views.blurred] <= 2.0))
    expected = gaussian_blur(sharp.local_crops[:, 0] * 1.0, views.blur_sigma, 9)
    torch.testing.assert_close(blurred.local_crops[:, 0], expected, atol=1e-3, rtol=0)
    unblurred = ~views.blurred
    assert torch.equal(blurred.local_crops[unblurred], sharp.local_crops[unblurred])
    assert not torch.allclose(blurred.local_crops[views.blurred], sharp.local_crops[views.blurred])


def test_solarize_only_on_second_global_crop_with_its_probability():
    fields = torch.randint(0, 256, (64, 5, 32, 32), dtype=torch.uint8, generator=gen(14))
    cfg = plain_cfg(global_size=16, local_size=8, solarize_prob=0.2)
    g = gen(15)
    second = []
    for _ in range(8):
        out = MultiViewAugment(cfg)(fields, FLUO, g)
        assert not out.global_views.solarized[:64].any() and not out.local_views.solarized.any()
        second.append(out.global_views.solarized[64:])
    assert abs(torch.cat(second).float().mean().item() - 0.2) < 0.05  # 512 draws: sd 0.018

    on = MultiViewAugment(cfg)(fields, FLUO, gen(16))
    off = MultiViewAugment(plain_cfg(global_size=16, local_size=8))(fields, FLUO, gen(16))
    applied = on.global_views.solarized
    assert applied.any()
    expected = solarize(off.global_crops[:, 0], applied, threshold=128)
    torch.testing.assert_close(on.global_crops[:, 0], expected, atol=1e-4, rtol=0)
    assert not torch.equal(on.global_crops[applied], off.global_crops[applied])


def test_brightness_jitter_on_constant_fields_and_its_probability():
    fields = torch.full((64, 5, 24, 24), 100, dtype=torch.uint8)
    aug = MultiViewAugment(plain_cfg(global_size=16, local_size=8, jitter_prob=0.8, brightness=0.4, contrast=0.4))
    g = gen(17)
    jittered = []
    for _ in range(4):
        out = aug(fields, FLUO, g)
        views = out.local_views
        jittered.append(views.jittered)
        # A constant image equals its mean, so contrast cannot change it: value = 100 * brightness.
        expected = (100.0 * views.brightness).clamp(0, 255)
        torch.testing.assert_close(out.local_crops[:, 0, 0, 0], expected, atol=1e-3, rtol=0)
        assert torch.all(views.brightness[~views.jittered] == 1.0) and torch.all(views.contrast[~views.jittered] == 1)
        b = views.brightness[views.jittered]
        assert b.min() >= 0.6 and b.max() <= 1.4
    assert abs(torch.cat(jittered).float().mean().item() - 0.8) < 0.03  # 2048 draws: sd 0.009


def test_normalisation_default_and_configurable():
    fields = torch.full((2, 5, 32, 32), 200, dtype=torch.uint8)
    base = {
        "jitter_prob": 0.0,
        "blur_prob_global1": 0.0,
        "blur_prob_global2": 0.0,
        "blur_prob_local": 0.0,
        "solarize_prob": 0,
    }
    out = MultiViewAugment(small_cfg(**base))(fields, FLUO, gen())
    torch.testing.assert_close(out.global_crops, torch.full_like(out.global_crops, (200 / 255 - 0.449) / 0.226))
    out = MultiViewAugment(small_cfg(norm_mean=0.5, norm_std=0.25, **base))(fields, FLUO, gen())
    torch.testing.assert_close(out.local_crops, torch.full_like(out.local_crops, (200 / 255 - 0.5) / 0.25))


def test_downsampling_is_antialiased():
    """A 1-pixel checkerboard has all its energy at the Nyquist frequency: an antialiased downsample is nearly flat
    grey, while point sampling (grid_sample, bilinear) aliases it into strong patterns."""
    size = 128
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((yy + xx) % 2 * 255).to(torch.uint8)
    fields = board.expand(4, 5, size, size).contiguous()
    out = MultiViewAugment(plain_cfg())(fields, FLUO, gen(18))
    for crops in (out.global_crops, out.local_crops):
        assert (crops.mean() - 127.5).abs() < 3
        assert crops.std(dim=(1, 2, 3)).max() < 5, crops.std(dim=(1, 2, 3)).max()  # measured: under 1

    # The same boxes read with grid_sample (no antialiasing) alias: the check above can fail.
    views = out.local_views
    x0, y0, w, h = views.box.unbind(1)
    theta = torch.zeros(len(x0), 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w / size, (2 * x0 + w) / size - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / size, (2 * y0 + h) / size - 1
    grid = F.affine_grid(theta, [len(x0), 1, 16, 16], align_corners=False)
    naive = F.grid_sample(board.float().expand(len(x0), 1, size, size), grid, align_corners=False)
    assert naive.std(dim=(1, 2, 3)).mean() > 40


# ---------------------------------------------------------------------------------------------------------------
# Randomness


def test_seeded_generator_makes_runs_reproducible_and_resumable():
    fields = torch.randint(0, 256, (4, 5, 48, 48), dtype=torch.uint8, generator=gen(19))
    aug = MultiViewAugment(small_cfg(global_size=24, local_size=12))
    a, b = aug(fields, FLUO, gen(20)), aug(fields, FLUO, gen(20))
    assert torch.equal(a.global_crops, b.global_crops) and torch.equal(a.local_crops, b.local_crops)
    assert torch.equal(a.local_views.box, b.local_views.box)
    assert not torch.equal(a.local_crops, aug(fields, FLUO, gen(21)).local_crops)

    g = gen(22)
    aug(fields, FLUO, g)
    state = g.get_state()
    second = aug(fields, FLUO, g)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(aug(fields, FLUO, resumed).local_crops, second.local_crops)


# ---------------------------------------------------------------------------------------------------------------
# Validation


def test_bad_input_is_rejected_with_a_clear_error():
    aug = MultiViewAugment(small_cfg())
    fields, _ = constant_fields(FLUO, batch=2, size=32)
    with pytest.raises(TypeError, match="uint8"):
        aug(fields.float(), FLUO)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        aug(fields[0], FLUO)
    with pytest.raises(ValueError, match="4 channel_names"):
        aug(fields, FLUO[:4])
    with pytest.raises(ValueError, match="duplicate"):
        aug(fields, ["DNA", "ER", "RNA", "AGP", "DNA"])
    with pytest.raises(ValueError, match="no fluorescent channel"):
        aug(fields[:, :2], ["Phase", "LowZBF"])
    # Other channel sets are valid (unknown names are fluorescent unless transmitted light, tests/test_crop_policy.py)
    assert aug(fields, ["DNA", "ER", "RNA", "AGP", "GFP"], gen()).mean_channels == ("DNA", "ER", "RNA", "AGP", "GFP")
    assert aug(fields[:, :4], ["DNA", "ER", "RNA", "AGP"], gen()).mean_channels == ("DNA", "ER", "RNA", "AGP")
    with pytest.raises(ValueError, match="empty batch"):
        aug(fields[:0], FLUO)


def test_config_validation_and_from_dict():
    cfg = AugmentConfig.from_dict({"global_scale": [0.4, 0.9], "n_local": 6})
    assert cfg.global_scale == (0.4, 0.9) and cfg.n_local == 6 and cfg.local_size == 96
    defaults = AugmentConfig()
    assert (defaults.mean_prob_local, defaults.brightfield_prob, defaults.solarize_prob) == (0.3, 0.0, 0.2)
    assert math.isclose(defaults.ratio[0], 0.75) and defaults.blur_sigma == (0.1, 2.0)
    with pytest.raises(ValueError, match="train.augment: unknown augmentation keys \\['n_locals'\\]"):
        AugmentConfig.from_dict({"n_locals": 6}, where="train.augment")
    with pytest.raises(ValueError, match="AugmentConfig.local_scale"):
        AugmentConfig(local_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="AugmentConfig.blur_prob_local"):
        AugmentConfig(blur_prob_local=1.5)
    with pytest.raises(ValueError, match="AugmentConfig.ratio"):
        AugmentConfig(ratio=(0.75,))
    with pytest.raises(ValueError, match="AugmentConfig.blur_kernel_size"):
        AugmentConfig(blur_kernel_size=8)
    with pytest.raises(ValueError, match="AugmentConfig.norm_std"):
        AugmentConfig(norm_std=0.0)
