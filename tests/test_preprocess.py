"""Preprocessing on a real Phenix field (LZW TIFFs) and on hand-made arrays with hand-computed answers."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dinocell.config import PreprocessConfig
from dinocell.data.preprocess import (
    CorruptImageError,
    IllumError,
    _block_mean,
    apply_illum,
    clahe,
    decode_tiff,
    downsample2x,
    downsample_area,
    load_illum,
    preprocess_channel,
    preprocess_signature,
    robust_percentiles,
    scale_to_uint8,
    validate_preprocess_config,
)

_FIXTURE_NAME = "phenix_BR00121482_A01_s1"
_CANDIDATES = [
    Path(__file__).parent / "data" / _FIXTURE_NAME,
    Path(__file__).resolve().parents[2] / "shared" / "fixtures" / _FIXTURE_NAME,
]
FIXTURE = next((p for p in _CANDIDATES if (p / "load_data.csv").exists()), None)
needs_fixture = pytest.mark.skipif(FIXTURE is None, reason=f"real field fixture not found in {_CANDIDATES}")


def _fixture_channels() -> dict[str, Path]:
    """Channel name -> TIFF path, from the fixture's load_data.csv (FileName_Orig<Ch> columns), never from chN."""
    with open(FIXTURE / "load_data.csv", newline="") as f:
        row = next(csv.DictReader(f))
    return {k[len("FileName_Orig") :]: FIXTURE / v for k, v in row.items() if k.startswith("FileName_Orig")}


@pytest.fixture(scope="module")
def raw_field() -> dict[str, np.ndarray]:
    if FIXTURE is None:
        pytest.skip("fixture missing")
    return {ch: decode_tiff(p.read_bytes(), str(p)) for ch, p in _fixture_channels().items()}


# --------------------------------------------------------------------------- the real field


@needs_fixture
def test_fixture_field_decodes_all_channels(raw_field):
    assert sorted(raw_field) == sorted(["DNA", "ER", "RNA", "AGP", "Mito", "Brightfield"])
    for ch, img in raw_field.items():
        assert img.dtype == np.uint16 and img.shape == (1080, 1080), ch
        assert img.max() > img.min() + 1000, ch  # real signal, not an empty decode
    # The files really are LZW (the reason imagecodecs is needed).
    with tifffile.TiffFile(_fixture_channels()["DNA"]) as tf:
        assert tf.pages[0].compression == tifffile.COMPRESSION.LZW


@needs_fixture
def test_fixture_field_preprocesses_to_full_range_uint8(raw_field):
    cfg = PreprocessConfig()
    for ch, img in raw_field.items():
        out = preprocess_channel(img, cfg)
        assert out.dtype == np.uint8 and out.shape == (540, 540), ch
        # Full-resolution scaled channel spans the whole range (0.1/99.9 % clipped to 0/255).
        u8 = scale_to_uint8(img, cfg.percentile_low, cfg.percentile_high, cfg.percentile_subsample)
        assert u8.min() == 0 and u8.max() == 255, ch
        assert (u8 == 0).mean() >= 0.0005 and (u8 == 255).mean() >= 0.0005, ch
        assert out.max() >= 200 and out.min() <= 10, ch  # after CLAHE + 2x area averaging


@needs_fixture
def test_subsampled_percentiles_close_to_full(raw_field):
    errors = {}
    for ch, img in raw_field.items():
        full_lo, full_hi = np.percentile(img, (0.1, 99.9))
        lo, hi = robust_percentiles(img, 0.1, 99.9, subsample=4)
        span = full_hi - full_lo
        errors[ch] = (abs(lo - full_lo) / span, abs(hi - full_hi) / span)
    print(
        "subsample-4 percentile error / range (low, high):",
        {k: (round(float(a), 4), round(float(b), 4)) for k, (a, b) in errors.items()},
    )
    assert max(a for a, _ in errors.values()) < 0.002  # measured <= 0.04 %
    assert max(b for _, b in errors.values()) < 0.03  # measured <= 1.9 % (sparse bright cells above 99.9 %)
    # subsample=1 is the exact np.percentile
    img = raw_field["DNA"]
    assert robust_percentiles(img, 0.1, 99.9, 1) == tuple(float(v) for v in np.percentile(img, (0.1, 99.9)))


@needs_fixture
def test_clahe_equalises_the_real_field(raw_field):
    def entropy(a):
        h = np.bincount(a.ravel(), minlength=256) / a.size
        h = h[h > 0]
        return float(-(h * np.log2(h)).sum())

    def tile_mean_std(a):
        return float(a.reshape(8, 135, 8, 135).mean(axis=(1, 3)).std())

    for ch, img in raw_field.items():
        u8 = scale_to_uint8(img, 0.1, 99.9, 4)
        eq = clahe(u8, 3.0, 8)
        assert eq.shape == u8.shape and eq.dtype == np.uint8
        # The histogram is spread over more grey levels (>= 0.7 bit more entropy on every channel).
        assert entropy(eq) > entropy(u8) + 0.7, ch
        if ch in ("DNA", "ER", "RNA", "AGP", "Mito"):
            # Sparse fluorescence: the dark background is lifted, fewer pixels sit at the bottom levels.
            assert (eq <= 2).mean() < 0.5 * (u8 <= 2).mean(), ch
    # Brightfield: uneven illumination between tiles is flattened (tile means closer together).
    bf = scale_to_uint8(raw_field["Brightfield"], 0.1, 99.9, 4)
    assert tile_mean_std(clahe(bf, 3.0, 8)) < 0.8 * tile_mean_std(bf)


# --------------------------------------------------------------------------- hand-computed cases


def test_scale_to_uint8_hand_computed():
    img = (np.arange(101, dtype=np.uint16) * 10).reshape(1, 101)  # 0, 10, ..., 1000
    out = scale_to_uint8(img, 0.0, 100.0, subsample=1)  # lo = 0, hi = 1000: out = floor(x * 0.255 + 0.5)
    expected = np.floor(np.arange(101) * 10 * 0.255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[0], expected)
    assert out[0, 0] == 0 and out[0, 50] == 128 and out[0, 100] == 255
    # Clipping outside the percentile range: lo = 100, hi = 900.
    out = scale_to_uint8(img, 10.0, 90.0, subsample=1)
    assert out[0, 5] == 0 and out[0, 10] == 0 and out[0, 90] == 255 and out[0, 95] == 255
    assert out[0, 50] == 128  # (500 - 100) * 255 / 800 = 127.5 -> 128
    # Float input (after illumination correction) follows the same formula as the uint16 lookup table.
    np.testing.assert_array_equal(scale_to_uint8(img.astype(np.float32), 10.0, 90.0, 1), out)
    # A flat image has no contrast to stretch.
    np.testing.assert_array_equal(
        scale_to_uint8(np.full((4, 4), 7, np.uint16), 0.1, 99.9, 1), np.zeros((4, 4), np.uint8)
    )


def test_downsample2x_exact_on_hand_made_array():
    a = np.arange(16, dtype=np.uint8).reshape(4, 4)
    # Block means 2.5, 4.5, 10.5, 12.5, rounded half up.
    np.testing.assert_array_equal(downsample2x(a), np.array([[3, 5], [11, 13]], np.uint8))
    # No overflow at the top of the range: (255 * 3 + 254) / 4 = 254.75 -> 255.
    np.testing.assert_array_equal(downsample2x(np.array([[255, 255], [255, 254]], np.uint8)), [[255]])
    # An odd trailing row/column is dropped.
    odd = np.arange(25, dtype=np.uint8).reshape(5, 5)
    np.testing.assert_array_equal(downsample2x(odd), downsample2x(odd[:4, :4]))
    # Factor 3 (numpy path): block of 0..8 arranged 3x3 -> mean 4.
    b = np.arange(9, dtype=np.uint8).reshape(3, 3)
    np.testing.assert_array_equal(downsample_area(b, 3), [[4]])
    assert downsample_area(a, 1) is a


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_downsample_matches_block_mean_reference(factor):
    rng = np.random.default_rng(factor)
    a = rng.integers(0, 256, (12 * factor, 10 * factor), dtype=np.uint8)
    ref = (a.reshape(12, factor, 10, factor).astype(np.int64).sum(axis=(1, 3)) * 2 + factor * factor) // (
        2 * factor * factor
    )
    np.testing.assert_array_equal(downsample_area(a, factor), ref.astype(np.uint8))
    np.testing.assert_array_equal(_block_mean(a, factor), ref.astype(np.uint8))


def test_illum_division_with_known_illum():
    # A flat 1000-count field seen through vignetting 0.5..2.0: dividing by the illum function flattens it again.
    illum = np.outer(np.linspace(0.5, 2.0, 16), np.linspace(1.0, 1.5, 12)).astype(np.float32)
    raw = np.round(1000 * illum).astype(np.uint16)
    corrected = apply_illum(raw, illum)
    assert corrected.dtype == np.float32
    np.testing.assert_allclose(corrected, raw.astype(np.float32) / illum, rtol=1e-6)
    assert np.abs(corrected - 1000).max() <= 0.5 / illum.min() + 1e-3
    with pytest.raises(ValueError, match=r"\(8, 8\).*\(16, 12\)"):
        apply_illum(raw, np.ones((8, 8), np.float32))
    # preprocess_channel applies it first: a vignetted gradient becomes the un-vignetted one.
    texture = np.tile(np.arange(12, dtype=np.float32) * 100 + 500, (16, 1))
    cfg = PreprocessConfig(clahe=False, downsample=1, percentile_low=0.0, percentile_high=100.0, percentile_subsample=1)
    out = preprocess_channel(np.round(texture * illum).astype(np.uint16), cfg, illum)
    expected = scale_to_uint8(texture, 0.0, 100.0, 1)
    assert np.abs(out.astype(int) - expected).max() <= 1  # rounding of the uint16 raw values only


def test_load_illum_parses_and_refuses(tmp_path):
    good = np.full((4, 5), 1.5, np.float64)
    buf = io.BytesIO()
    np.save(buf, good)
    arr = load_illum(buf.getvalue(), "s3://b/illum/P1_IllumDNA.npy")
    assert arr.dtype == np.float32 and arr.shape == (4, 5) and float(arr[0, 0]) == 1.5
    for bad, why in [(np.zeros((4, 5)), "> 0"), (np.full((4, 5), np.nan), "finite"), (np.ones((2, 3, 4)), "2-D")]:
        buf = io.BytesIO()
        np.save(buf, bad)
        with pytest.raises(IllumError, match=why) as e:
            load_illum(buf.getvalue(), "s3://b/illum/P1_IllumDNA.npy")
        assert "P1_IllumDNA.npy" in str(e.value)
    with pytest.raises(IllumError, match="P1_IllumER.npy.*not a readable"):
        load_illum(b"not numpy", "P1_IllumER.npy")


def test_preprocess_order_is_illum_scale_clahe_downsample():
    rng = np.random.default_rng(0)
    raw = rng.integers(100, 5000, (64, 64)).astype(np.uint16)
    illum = rng.uniform(0.8, 1.2, (64, 64)).astype(np.float32)
    cfg = PreprocessConfig()
    manual = downsample2x(clahe(scale_to_uint8(apply_illum(raw, illum), 0.1, 99.9, 4), 3.0, 8))
    np.testing.assert_array_equal(preprocess_channel(raw, cfg, illum), manual)
    # Without CLAHE / downsampling the steps are skipped.
    plain = PreprocessConfig(clahe=False, downsample=1)
    np.testing.assert_array_equal(preprocess_channel(raw, plain), scale_to_uint8(raw, 0.1, 99.9, 4))


def test_config_validation_and_signature():
    with pytest.raises(ValueError, match="percentile_low/high"):
        validate_preprocess_config(PreprocessConfig(percentile_low=99.0, percentile_high=1.0))
    with pytest.raises(ValueError, match="downsample"):
        validate_preprocess_config(PreprocessConfig(downsample=0))
    assert preprocess_signature(PreprocessConfig()) == preprocess_signature(PreprocessConfig())
    assert preprocess_signature(PreprocessConfig()) != preprocess_signature(PreprocessConfig(clahe_clip=2.0))


# --------------------------------------------------------------------------- bad bytes


def _tiff_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def test_decode_roundtrip_and_uint8_widening():
    a = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)
    np.testing.assert_array_equal(decode_tiff(_tiff_bytes(a, compression="lzw"), "x.tiff"), a)
    b = (np.arange(12, dtype=np.uint8) * 20).reshape(3, 4)
    out = decode_tiff(_tiff_bytes(b), "y.tiff")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, b)


@needs_fixture
def test_truncated_and_corrupt_real_tiff_raise_naming_source():
    src = "s3://bucket/plate/r01c01f01p01-ch5sk1fk1fl1.tiff"
    data = _fixture_channels()["DNA"].read_bytes()
    cases = {
        "truncated half": data[: len(data) // 2],  # the Phenix export keeps its directory at the end
        "header only": data[:8],
        "empty": b"",
        "not a tiff": b"<html>403 Forbidden</html>" * 4,
    }
    corrupt = bytearray(data)
    corrupt[len(data) // 2 : len(data) // 2 + 1000] = b"\xff" * 1000  # garbage inside the LZW stream
    cases["corrupt LZW"] = bytes(corrupt)
    for what, bad in cases.items():
        with pytest.raises(CorruptImageError) as e:
            decode_tiff(bad, src)
        assert src in str(e.value), what


def test_truncated_pixel_data_with_leading_directory():
    # tifffile writes its directory first: a cut inside the pixel data must still be caught.
    data = _tiff_bytes(np.arange(128 * 128, dtype=np.uint16).reshape(128, 128))
    with pytest.raises(CorruptImageError, match=r"img\.tiff: truncated TIFF"):
        decode_tiff(data[: len(data) - 1000], "img.tiff")


def test_unsupported_images_raise_naming_source():
    with pytest.raises(CorruptImageError, match="f.tiff.*float32"):
        decode_tiff(_tiff_bytes(np.zeros((4, 4), np.float32)), "f.tiff")
    two_pages = io.BytesIO()
    with tifffile.TiffWriter(two_pages) as w:
        w.write(np.zeros((4, 4), np.uint16))
        w.write(np.zeros((4, 4), np.uint16))
    with pytest.raises(CorruptImageError, match="m.tiff.*2 TIFF pages"):
        decode_tiff(two_pages.getvalue(), "m.tiff")
    with pytest.raises(CorruptImageError, match="rgb.tiff.*2-D"):
        decode_tiff(_tiff_bytes(np.zeros((4, 4, 3), np.uint16)), "rgb.tiff")
