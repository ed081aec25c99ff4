"""dinocell: continued DINOv3 pretraining on Cell Painting with multi-view channel consistency."""

__version__ = "0.1.0"

FLUORESCENT_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
BRIGHTFIELD_CHANNELS = ("HighZBF", "LowZBF", "Brightfield")
ALL_CHANNELS = FLUORESCENT_CHANNELS + BRIGHTFIELD_CHANNELS


def load_pretrained(uri: str, **kwargs):
    """Load a model published by `dinocell publish` (hashes verified). See dinocell.publish."""
    from dinocell.publish.load import load_pretrained as _load

    return _load(uri, **kwargs)
