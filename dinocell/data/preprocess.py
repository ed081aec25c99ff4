"""16-bit raw channel -> uint8, the same way for the shard writer and the raw stream (pure array functions).

Per channel, in this order:

1. illumination correction (optional): raw / illum, with the plate's float Illum .npy;
2. robust intensity scaling to uint8: the `percentile_low` / `percentile_high` percentiles map to 0 / 255, values
   outside are clipped. The percentiles are estimated on a strided subsample (every `percentile_subsample`-th pixel in
   each axis): a full `np.percentile` over a 1080x1080 channel costs 7-16 ms, a 1-in-4 subsample about 0.5 ms. On the
   real fixture field the estimate moves the 0.1 % point by < 0.1 % of the range and the 99.9 % point by up to 2 %
   (sparse bright cells: only ~73 subsampled pixels lie above it); see tests/test_preprocess.py;
3. CLAHE (OpenCV, clip 3.0, 8x8 tiles by default);
4. area downsampling (2x by default).

Why CLAHE comes before downsampling: CLAHE's tiles and its clip limit are defined on the full-resolution field (the
clip limit is relative to the pixel count of a tile, and its histograms hold the native pixel statistics); doing it
first makes the half-resolution output exactly the area-average of what the full-resolution path produces, so shards
and raw streaming at any `downsample` show the same contrast as the reference full-resolution pipeline.
Scaling comes before CLAHE because OpenCV's CLAHE works on a fixed [0, 255] histogram range: the robust stretch
decides which part of the 16-bit range that histogram covers.
"""

from __future__ import annotations

import dataclasses
import io
import json

import cv2
import numpy as np
import tifffile

from dinocell.config import PreprocessConfig
from dinocell.data.clahe import clahe

# Bump when the output of preprocess_channel changes for the same config: it is part of every cache/shard signature.
PREPROCESS_VERSION = "1"

# OpenCV runs single-threaded in every process that imports this module. Two reasons: parallelism comes from processes
# (DataLoader workers, the shard writer's pool), so OpenCV's pool would only oversubscribe the cores; and OpenCV's
# thread pool is not fork-safe: once a parent has used it, a forked DataLoader worker that touches it (even through
# cv2.setNumThreads) hangs for ever (seen in tests/test_raw_stream.py before this line existed).
cv2.setNumThreads(1)

__all__ = [
    "PREPROCESS_VERSION",
    "CorruptImageError",
    "IllumError",
    "apply_illum",
    "clahe",
    "decode_tiff",
    "downsample2x",
    "downsample_area",
    "load_illum",
    "preprocess_channel",
    "preprocess_signature",
    "robust_percentiles",
    "scale_to_uint8",
    "validate_preprocess_config",
]


class CorruptImageError(ValueError):
    """Image bytes that do not decode to one single-plane 8/16-bit image; the message names the source."""


class IllumError(ValueError):
    """An illumination-function file that is unreadable or unusable; the message names the source."""


# --------------------------------------------------------------------------- decoding


def decode_tiff(data: bytes, source: str) -> np.ndarray:
    """Decode single-plane TIFF bytes (uncompressed, LZW, deflate, ... via imagecodecs) to uint16 [H, W].

    Raises CorruptImageError naming `source` for anything else: not a TIFF, truncated pixel data, a corrupt compressed
    stream, several pages, more than two dimensions, or a pixel type other than uint8/uint16 (uint8 is widened).
    Truncation needs an explicit check: for files whose directory sits after the pixel data (the Phenix export does
    that) tifffile returns an empty array instead of raising.
    """
    if not data:
        raise CorruptImageError(f"{source}: empty image object (0 bytes)")
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tf:
            n_pages = len(tf.pages)
            if n_pages != 1:
                raise CorruptImageError(
                    f"{source}: expected one image plane, found {n_pages} TIFF pages"
                    + (" (truncated or corrupt file?)" if n_pages == 0 else "")
                )
            page = tf.pages[0]
            for off, count in zip(page.dataoffsets, page.databytecounts):
                if off + count > len(data):
                    raise CorruptImageError(
                        f"{source}: truncated TIFF: pixel data runs to byte {off + count} but the object has {len(data)}"
                    )
            img = page.asarray()
    except CorruptImageError:
        raise
    except Exception as e:  # tifffile / imagecodecs raise many types for bad bytes; name the source once, here
        raise CorruptImageError(f"{source}: cannot decode TIFF ({len(data)} bytes): {type(e).__name__}: {e}") from e
    img = np.squeeze(img)
    if img.ndim != 2 or img.size == 0:
        raise CorruptImageError(f"{source}: expected a 2-D image, decoded shape {img.shape}")
    if img.dtype == np.uint8:
        img = img.astype(np.uint16)
    elif img.dtype != np.uint16:
        raise CorruptImageError(f"{source}: unsupported pixel type {img.dtype} (expected uint16 or uint8)")
    return img


def load_illum(data: bytes, source: str) -> np.ndarray:
    """Parse an illumination-function `.npy` (float [H, W], strictly positive) to float32; IllumError otherwise."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise IllumError(f"{source}: not a readable .npy array: {type(e).__name__}: {e}") from e
    arr = np.squeeze(arr)
    if arr.ndim != 2 or arr.size == 0:
        raise IllumError(f"{source}: expected a 2-D illumination function, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise IllumError(f"{source}: unsupported dtype {arr.dtype} for an illumination function")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all() or arr.min() <= 0:
        raise IllumError(f"{source}: illumination function must be finite and > 0 everywhere (min {arr.min()})")
    return arr


# --------------------------------------------------------------------------- array ops


def apply_illum(img: np.ndarray, illum: np.ndarray) -> np.ndarray:
    """Illumination correction: raw / illum as float32 (illum comes from `load_illum`)."""
    if img.shape != illum.shape:
        raise ValueError(f"illumination function shape {illum.shape} does not match the image shape {img.shape}")
    return np.divide(img, illum, dtype=np.float32)


def robust_percentiles(img: np.ndarray, low_pct: float, high_pct: float, subsample: int = 1) -> tuple[float, float]:
    """The (low, high) percentiles of `img`, estimated on every `subsample`-th pixel in each axis."""
    if subsample < 1:
        raise ValueError(f"percentile subsample must be >= 1, got {subsample}")
    view = img[::subsample, ::subsample] if img.ndim == 2 else img.reshape(-1)[::subsample]
    lo, hi = np.percentile(view, (low_pct, high_pct))
    return float(lo), float(hi)


def scale_to_uint8(img: np.ndarray, low_pct: float, high_pct: float, subsample: int = 4) -> np.ndarray:
    """Map the robust [low, high] percentile range linearly to [0, 255] (clipped, rounded half up) as uint8.

    A flat image (high <= low) has no contrast to stretch and maps to all zeros.
    uint16 input goes through a 65,536-entry lookup table (faster than float arithmetic on a 1080^2 channel);
    float input (after illumination correction) uses the same formula in float32.
    """
    lo, hi = robust_percentiles(img, low_pct, high_pct, subsample)
    if not hi > lo:
        return np.zeros(img.shape, np.uint8)
    # Multiply by 255 before dividing by the span: exact halves stay exact halves, so rounding is half up as stated.
    span = hi - lo
    if img.dtype == np.uint16:
        levels = np.arange(65536, dtype=np.float64)
        lut = np.clip((levels - lo) * 255.0 / span + 0.5, 0, 255).astype(np.uint8)
        return np.take(lut, img)
    x = np.asarray(img, dtype=np.float32)
    x = (x - np.float32(lo)) * np.float32(255.0)
    x /= np.float32(span)
    x += np.float32(0.5)
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def downsample_area(u8: np.ndarray, factor: int) -> np.ndarray:
    """Area downsampling by an integer factor of a 2-D uint8 image: each output pixel is the mean of a factor x factor
    block, rounded half up. Trailing rows/columns that do not fill a whole block are dropped.

    Works on one 2-D channel at a time (OpenCV 5's INTER_AREA refuses arrays with more than 4 channels). Factor 2 uses
    cv2.resize(INTER_AREA), which is bit-identical to the block mean there (checked in the tests) and ~10x faster than
    numpy; other factors use numpy, because OpenCV's fixed-point rounding differs by 1 for factors 4 and 8.
    """
    if factor < 1:
        raise ValueError(f"downsample factor must be >= 1, got {factor}")
    if u8.ndim != 2 or u8.dtype != np.uint8:
        raise ValueError(f"downsample expects a uint8 [H, W] image, got {u8.dtype} {u8.shape}")
    if factor == 1:
        return u8
    h, w = (u8.shape[0] // factor) * factor, (u8.shape[1] // factor) * factor
    if h == 0 or w == 0:
        raise ValueError(f"image {u8.shape} is smaller than the downsample factor {factor}")
    u8 = u8[:h, :w]
    if factor == 2:
        return cv2.resize(np.ascontiguousarray(u8), (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    return _block_mean(u8, factor)


def _block_mean(u8: np.ndarray, factor: int) -> np.ndarray:
    """Reference block mean (sum + n/2) // n over factor x factor blocks."""
    h, w = u8.shape
    acc = np.zeros((h // factor, w // factor), np.uint32)
    for dy in range(factor):
        for dx in range(factor):
            acc += u8[dy::factor, dx::factor]
    n = factor * factor
    return ((acc + n // 2) // n).astype(np.uint8)


def downsample2x(u8: np.ndarray) -> np.ndarray:
    return downsample_area(u8, 2)


# --------------------------------------------------------------------------- the whole channel


def validate_preprocess_config(cfg: PreprocessConfig) -> None:
    """Refuse settings that would silently produce nonsense (raises ValueError naming the field)."""
    if not 0.0 <= cfg.percentile_low < cfg.percentile_high <= 100.0:
        raise ValueError(
            f"preprocess.percentile_low/high must satisfy 0 <= low < high <= 100, "
            f"got {cfg.percentile_low}, {cfg.percentile_high}"
        )
    if cfg.percentile_subsample < 1:
        raise ValueError(f"preprocess.percentile_subsample must be >= 1, got {cfg.percentile_subsample}")
    if cfg.downsample < 1:
        raise ValueError(f"preprocess.downsample must be >= 1, got {cfg.downsample}")
    if cfg.clahe and (cfg.clahe_tiles < 1 or cfg.clahe_clip <= 0):
        raise ValueError(
            f"preprocess.clahe_tiles must be >= 1 and clahe_clip > 0, got {cfg.clahe_tiles}, {cfg.clahe_clip}"
        )


def preprocess_signature(cfg: PreprocessConfig) -> str:
    """A stable string naming everything that determines preprocess_channel's output (cache keys, shard metadata)."""
    fields = dataclasses.asdict(cfg)
    return f"v{PREPROCESS_VERSION}:" + json.dumps(fields, sort_keys=True, separators=(",", ":"))


def preprocess_channel(raw_u16: np.ndarray, cfg: PreprocessConfig, illum: np.ndarray | None = None) -> np.ndarray:
    """illum (when given) -> robust uint8 scaling -> CLAHE (when enabled) -> area downsampling; returns uint8 [h, w].

    `illum` is applied whenever it is passed; whether to pass it (cfg.illum_correction) is the caller's decision.
    """
    x = apply_illum(raw_u16, illum) if illum is not None else raw_u16
    u8 = scale_to_uint8(x, cfg.percentile_low, cfg.percentile_high, cfg.percentile_subsample)
    if cfg.clahe:
        u8 = clahe(u8, cfg.clahe_clip, cfg.clahe_tiles)
    if cfg.downsample > 1:
        u8 = downsample_area(u8, cfg.downsample)
    return np.ascontiguousarray(u8)
