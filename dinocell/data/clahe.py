"""CLAHE (contrast-limited adaptive histogram equalisation) of one uint8 channel, as the seed runs it.

OpenCV's implementation, clip 3.0 and 8x8 tiles by default (`preprocess.clahe_clip`, `preprocess.clahe_tiles`);
where it sits in the preprocessing chain, and why, is dinocell.data.preprocess's docstring.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

__all__ = ["clahe"]


_clahe_local = threading.local()


def clahe(u8: np.ndarray, clip: float = 3.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV) of a uint8 [H, W] image.

    The CLAHE object is cached per thread and per (clip, tiles): OpenCV objects are not safe to share across threads.
    """
    if u8.dtype != np.uint8 or u8.ndim != 2:
        raise ValueError(f"clahe expects a uint8 [H, W] image, got {u8.dtype} {u8.shape}")
    objs = getattr(_clahe_local, "objs", None)
    if objs is None:
        objs = _clahe_local.objs = {}
    key = (float(clip), int(tiles))
    obj = objs.get(key)
    if obj is None:
        obj = objs[key] = cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(int(tiles), int(tiles)))
    return obj.apply(np.ascontiguousarray(u8))
