"""The image objects of a synthetic bucket: one field's 8 TIFFs (planted faults applied) and the illumination functions.

Images are 8 uncompressed single-page uint16 TIFFs per site (chN as in `CPJUMP1_CHANNEL_NUMBERS`), rendered by
`dinocell.synth.cells.render_field`: every channel shows the same cells. The illumination functions are the exact
vignetting each plate's images got, normalised to mean 1, so `raw / illum` flattens the field.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import tifffile

from dinocell import storage
from dinocell.channels import ALL_CHANNELS
from dinocell.jump import layout
from dinocell.synth.cells import VignetteParams, render_field, vignetting
from dinocell.synth.faults import PlantedFault, damage_image
from dinocell.synth.plan import TAG_FIELD, SynthField, seeded_rng

__all__ = ["encode_npy", "encode_tiff", "illum_function", "write_field"]


def encode_tiff(img: np.ndarray) -> bytes:
    """One uncompressed single-page grayscale TIFF (as cpg0000 stores them); deterministic bytes."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, img, photometric="minisblack", metadata=None)
    return buf.getvalue()


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=32)  # a few plates' worth: fields are rendered plate by plate
def _vignette_array(size: int, params: VignetteParams) -> np.ndarray:
    arr = vignetting(size, params)
    arr.setflags(write=False)
    return arr


def illum_function(size: int, params: VignetteParams) -> np.ndarray:
    """A plate's illumination function for one channel: its vignetting, normalised to mean 1 (float32)."""
    v = _vignette_array(size, params)
    return (v / np.float32(v.mean(dtype=np.float64))).astype(np.float32)


def write_field(
    i: int,
    f: SynthField,
    *,
    seed: int,
    size: int,
    images_root: str,
    image_faults: dict[tuple[int, str], str],
    fault_seed: int,
) -> tuple[int, int, list[PlantedFault]]:
    """Render field `i` of the plan and write its images; returns (images written, bytes written, planted faults).

    The pixels depend only on the run's seed and the field's position, so fields can be written in any order.
    Local files are written without an fsync each (a rerun rewrites them; one fsync per image made runs I/O-bound).
    """
    p = f.plate
    rng = seeded_rng(seed, TAG_FIELD, p.batch_index, p.plate_index, f.row, f.col, f.site)
    vig = {ch: _vignette_array(size, p.vignette_params(ch)) for ch in ALL_CHANNELS}
    brightness = float(np.exp(rng.normal(0.0, 0.08)))
    images, _ = render_field(f.phenotype, size, rng, vig, brightness=brightness)
    n_img = n_bytes = 0
    planted = []
    for ch in ALL_CHANNELS:
        uri = layout.image_uri(images_root, p.batch, p.plate_dir, f.filename(ch))
        data = encode_tiff(images[ch])
        kind = image_faults.get((i, ch))
        if kind is not None:
            planted.append(PlantedFault(kind, uri, p.batch, p.barcode, f.well, f.site, ch))
            data = damage_image(kind, data, fault_seed, i, ch)
            if data is None:  # a missing image: listed in load_data.csv, never written
                continue
        storage.write_bytes(uri, data, fsync=False)
        n_img += 1
        n_bytes += len(data)
    return n_img, n_bytes, planted
