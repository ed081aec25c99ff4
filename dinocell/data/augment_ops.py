"""Batched low-level image ops for the multi-view augmentation (torch only, any device).

Every op works on a stack of single-channel images [N, H, W] (float, 0-255 scale) with one set of parameters per
image, so a whole crop slot (or all crops of one size) is one call: no Python loop over samples.

Resampling choice: a crop + resize is separable, rows then columns, each output sample a weighted sum of source
pixels. The weights are the triangle filter that `F.interpolate(mode="bilinear", antialias=True)` (and PIL) use:
its half-width is the downsampling factor (1 when upsampling), so every source pixel under the crop contributes
(antialiased, unlike `grid_sample`, which reads 4 pixels per output and aliases at the 2.5-11x factors these crops
see). Per image the weights differ only in numbers, not in shape (a static number of taps from a bound on the box
size), so boxes of every size and fractional corner batch together. Two equivalent evaluations: a fused gather and
weighted sum of the few source rows under each output's filter (F.embedding_bag; the fewest operations), or dense
matrices, crop = Wy @ image @ Wx^T (more operations, but plain batched matmuls).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device,
    attempts: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop boxes for n crops of a height x width image, as float [n, 4] = (x0, y0, w, h) in pixels.

    Same distribution as torchvision's RandomResizedCrop.get_params: up to `attempts` tries of area fraction
    ~ U(scale) and aspect ratio (w/h) log-uniform in `ratio`; the first try that fits wins; if none fits, a centre
    crop of the whole image with its aspect ratio clamped into `ratio`. Unlike torchvision, the box is not rounded
    to whole pixels (the resampler reads fractional boxes), so its area fraction lies exactly in `scale`.
    All tries are drawn at once (a fixed number of random numbers per call keeps the generator stream stable).
    """
    area = float(height * width)
    shape = (n, attempts)
    area_frac = _uniform(shape, scale[0], scale[1], generator, device)
    log_ratio = _uniform(shape, math.log(ratio[0]), math.log(ratio[1]), generator, device)
    pos_x = torch.rand(shape, generator=generator, device=device)
    pos_y = torch.rand(shape, generator=generator, device=device)

    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * area_frac * aspect)
    h = torch.sqrt(area * area_frac / aspect)
    fits = (w <= width) & (h <= height)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)  # index of the first fitting try (0 if none)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    x0 = pos_x.gather(1, first)[:, 0] * (width - w)
    y0 = pos_y.gather(1, first)[:, 0] * (height - h)

    fw, fh = _fallback_size(height, width, ratio)
    none_fit = ~fits.any(dim=1)
    w = torch.where(none_fit, torch.full_like(w, fw), w)
    h = torch.where(none_fit, torch.full_like(h, fh), h)
    x0 = torch.where(none_fit, torch.full_like(x0, (width - fw) / 2), x0)
    y0 = torch.where(none_fit, torch.full_like(y0, (height - fh) / 2), y0)
    return torch.stack([x0, y0, w, h], dim=1)


def max_box_size(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[float, float]:
    """Largest (w, h) that sample_crop_boxes can return for these settings (a static bound: no device sync)."""
    area = height * width * scale[1]
    widest_try, tallest_try = math.sqrt(area * ratio[1]), math.sqrt(area / ratio[0])
    # A fitting try lies inside the image with its aspect ratio in range.
    max_w = min(width, height * ratio[1], widest_try)
    max_h = min(height, width / ratio[0], tallest_try)
    if widest_try > width or tallest_try > height:  # some try can fail, so can all of them: the fallback box
        fallback_w, fallback_h = _fallback_size(height, width, ratio)
        max_w, max_h = max(max_w, fallback_w), max(max_h, fallback_h)
    return max_w, max_h


def _fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[float, float]:
    """torchvision's fallback when no try fits: the whole image with its aspect ratio clamped into `ratio`."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return float(width), width / ratio[0]
    if in_ratio > ratio[1]:
        return height * ratio[1], float(height)
    return float(width), float(height)


def resample_taps(
    start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, max_length: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Antialiased 1-D resampling of source intervals [start, start + length) to out_size samples, as taps:
    source indices [n, out_size, taps] (long) and weights [n, out_size, taps] (float, summing to 1 per output).

    Pixel i covers [i, i + 1) (centre i + 0.5); output pixel o samples the source at start + (o + 0.5) * step with
    a triangle filter of half-width max(step, 1), step = length / out_size. Only pixels whose centre lies inside the
    interval contribute (a crop sees nothing outside its box, as with crop-then-resize; the pixel under the
    interval's middle always counts, so even a sub-pixel interval reads something), weights renormalised.
    This equals F.interpolate(mode="bilinear", antialias=True, align_corners=False) on whole-pixel crops.
    `max_length` >= every length fixes the (static) number of taps, 2 * max(max_length / out_size, 1) + 1.
    """
    dtype = torch.float32
    device = start.device
    taps = math.ceil(2 * max(max_length / out_size, 1.0) * (1 + 1e-6)) + 1  # margin for float rounding
    start, length = start.to(dtype), length.to(dtype)
    step = length / out_size
    half_width = step.clamp(min=1.0)[:, None, None]
    centres = start[:, None] + (torch.arange(out_size, device=device, dtype=dtype) + 0.5)[None, :] * step[:, None]
    first = torch.ceil(centres - half_width[..., 0] - 0.5)  # first pixel whose centre is within the filter
    index = first[..., None] + torch.arange(taps, device=device, dtype=dtype)  # [n, out, taps]
    weights = (1.0 - ((index + 0.5 - centres[..., None]) / half_width).abs()).clamp(min=0.0)
    end = (start + length)[:, None, None]
    inside = (index + 0.5 >= start[:, None, None]) & (index + 0.5 <= end) & (index >= 0) & (index < in_size)
    weights = weights * inside
    index = index.clamp(0, in_size - 1).long()
    # An output whose filter misses every inside pixel (an upsampled sub-pixel box) reads the middle pixel.
    middle = ((start + length / 2).floor().clamp(0, in_size - 1)).long()[:, None].expand(-1, out_size)
    empty = weights.sum(dim=-1) <= 0
    index[..., 0] = torch.where(empty, middle, index[..., 0])
    weights[..., 0] = torch.where(empty, torch.ones_like(weights[..., 0]), weights[..., 0])
    return index, weights / weights.sum(dim=-1, keepdim=True)


def resample_matrices(taps: tuple[torch.Tensor, torch.Tensor], in_size: int) -> torch.Tensor:
    """The taps of resample_taps as dense matrices [n, out_size, in_size] (one row of weights per output)."""
    index, weights = taps
    dense = torch.zeros((*index.shape[:2], in_size), dtype=weights.dtype, device=weights.device)
    return dense.scatter_add_(2, index, weights)


def crop_resize(
    images: torch.Tensor,
    image_index: torch.Tensor,
    boxes: torch.Tensor,
    out_size: int,
    max_box: tuple[float, float] | None = None,
    method: str = "taps",
    flip_rows: torch.Tensor | None = None,
    flip_cols: torch.Tensor | None = None,
    transpose: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crops [n, out_size, out_size]: crop i is box i (x0, y0, w, h) of images[image_index[i]] (images: [M, H, W]
    float), resized with antialiasing, then optionally flipped (rows reversed / columns reversed) and transposed.

    Flips cost nothing (they reverse the order of the output taps) and the transpose is one select, so any of the 8
    square symmetries (see orientation_as_flips) comes with the resize. max_box: a static bound (w, h) on the boxes
    (default: the image) that sets the number of filter taps; boxes must not exceed it.
    method "taps": each output row is a weighted sum of the few source rows under its filter (one fused
    gather-and-sum), then the same over columns: work ~ out * taps * (W + out), best on CPUs. "matmul": the same weights
    as dense matrices, crop = Wy @ image @ Wx^T: work ~ out * H * W, but only plain batched matmuls. Both give the
    same result.
    """
    n = image_index.shape[0]
    count, height, width = images.shape
    if boxes.shape != (n, 4):
        raise ValueError(f"crop_resize: boxes must be [{n}, 4] for {n} crops, got {tuple(boxes.shape)}")
    if method not in ("taps", "matmul"):
        raise ValueError(f"crop_resize: method must be 'taps' or 'matmul', got {method!r}")
    max_w, max_h = max_box if max_box is not None else (width, height)
    row_index, row_weights = _flip_outputs(resample_taps(boxes[:, 1], boxes[:, 3], height, out_size, max_h), flip_rows)
    col_index, col_weights = _flip_outputs(resample_taps(boxes[:, 0], boxes[:, 2], width, out_size, max_w), flip_cols)
    if method == "matmul":
        wy = resample_matrices((row_index, row_weights), height)
        wx = resample_matrices((col_index, col_weights), width)
        out_t = torch.matmul(torch.matmul(wx, images.index_select(0, image_index).transpose(1, 2)), wy.transpose(1, 2))
    else:
        # Rows: each output row is a weighted sum of `taps` source rows -> [n, out, W].
        flat_rows = image_index[:, None, None] * height + row_index
        tall = weighted_row_sums(images.reshape(count * height, width), flat_rows, row_weights)
        # Columns, as rows of the transposed result -> [n, out (columns), out (rows)].
        tall_t = tall.view(n, out_size, width).transpose(1, 2).reshape(n * width, out_size)
        flat_cols = torch.arange(n, device=images.device)[:, None, None] * width + col_index
        out_t = weighted_row_sums(tall_t, flat_cols, col_weights).view(n, out_size, out_size)
    # out_t is the transposed crop: keep it where a transpose was asked for.
    if transpose is None:
        return out_t.transpose(1, 2).contiguous()
    return torch.where(transpose[:, None, None], out_t, out_t.transpose(1, 2))


def weighted_row_sums(table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[i] = sum_k weights[i, k] * table[index[i, k]] for table [R, M] and index/weights [..., taps]: [prod(...), M].

    F.embedding_bag does the gather and the weighted sum in one kernel, without a [rows, taps, M] intermediate.
    """
    taps = index.shape[-1]
    return F.embedding_bag(
        index.reshape(-1, taps), table, per_sample_weights=weights.reshape(-1, taps).to(table.dtype), mode="sum"
    )


def orientation_as_flips(
    hflip: torch.Tensor, vflip: torch.Tensor, rot90: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flip_rows, flip_cols, transpose) for crop_resize equal to: flip left-right if hflip, then up-down if vflip,
    then torch.rot90(x, rot90, dims=(-2, -1)) (counter-clockwise quarter turns).

    torch.rot90 by 1 = flip columns then transpose, by 2 = flip both, by 3 = flip rows then transpose; flips commute,
    so each composition is some flips then at most one transpose.
    """
    odd = rot90 % 2 == 1
    flip_rows = vflip ^ (rot90 >= 2)  # k = 2, 3 add a row flip
    flip_cols = hflip ^ ((rot90 == 1) | (rot90 == 2))  # k = 1, 2 add a column flip
    return flip_rows, flip_cols, odd


def _flip_outputs(taps: tuple[torch.Tensor, torch.Tensor], flip: torch.Tensor | None):
    """Reverse the order of the outputs (a flip of the resized crop) where flip [n] is set."""
    if flip is None:
        return taps
    index, weights = taps
    mask = flip[:, None, None]
    return torch.where(mask, index.flip(1), index), torch.where(mask, weights.flip(1), weights)


def brightness_contrast(
    x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, max_value: float = 255.0
) -> torch.Tensor:
    """torchvision's adjust_brightness then adjust_contrast for one channel, per image factors [n].

    brightness: x * b, clamped to [0, max]; contrast: blend with the image's mean, (x - m) * c + m, clamped. Without
    the clamps both orders give b * (c * (x - m) + m), so a fixed order loses little against ColorJitter's random one.
    """
    x = (x * brightness[:, None, None]).clamp(0.0, max_value)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return ((x - mean) * contrast[:, None, None] + mean).clamp(0.0, max_value)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels [n, kernel_size], one per sigma; sigma <= 0 gives the identity (a delta)."""
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    safe_sigma = sigma.to(torch.float32).clamp(min=1e-6)[:, None]
    kernels = torch.exp(-0.5 * (offsets[None, :] / safe_sigma) ** 2)
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    delta = (offsets == 0).to(torch.float32).expand_as(kernels)
    return torch.where((sigma > 0)[:, None], kernels, delta)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of each image of x [n, H, W] with its own sigma [n] (sigma <= 0: unchanged).

    Reflect padding as torchvision's gaussian_blur. Each pass is one weighted gather-and-sum of rows over the whole
    batch (per-image kernels cost nothing extra; a grouped conv with n groups was several times slower on CPU).
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"gaussian_blur kernel_size must be odd, got {kernel_size}")
    _n, height, width = x.shape
    if kernel_size // 2 >= min(height, width):
        raise ValueError(f"gaussian_blur kernel_size {kernel_size} too large for images of {height}x{width}")
    kernels = gaussian_kernels(sigma, kernel_size)
    y = _blur_along_dim1(x, kernels)
    return _blur_along_dim1(y.transpose(1, 2), kernels).transpose(1, 2)


def _blur_along_dim1(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    n, length, other = x.shape
    taps = kernels.shape[1]
    offsets = torch.arange(length, device=x.device)[:, None] + torch.arange(taps, device=x.device) - taps // 2
    offsets = offsets.abs()  # reflect at the start: -1 -> 1
    offsets = torch.where(offsets >= length, 2 * (length - 1) - offsets, offsets)  # reflect at the end: L -> L - 2
    index = torch.arange(n, device=x.device)[:, None, None] * length + offsets[None]  # [n, length, taps]
    weights = kernels[:, None, :].expand(n, length, taps)
    return weighted_row_sums(x.reshape(n * length, other), index, weights).view(n, length, other)


def solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float, max_value: float = 255.0) -> torch.Tensor:
    """Where apply [n] is set, invert the pixels at or above threshold (max - x), as torchvision's solarize."""
    inverted = torch.where(x >= threshold, max_value - x, x)
    return torch.where(apply[:, None, None], inverted, x)


def _uniform(shape, low: float, high: float, generator: torch.Generator | None, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)
