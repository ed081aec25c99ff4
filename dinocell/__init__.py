"""dinocell: continued DINOv3 pretraining on Cell Painting with multi-view channel consistency.

Nothing inside the package imports this module (each layer imports the modules it needs), so the lazy
`load_pretrained` below adds no import edge to the layering checked by tests/test_layering.py.
"""

from dinocell._version import __version__
from dinocell.channels import ALL_CHANNELS, BRIGHTFIELD_CHANNELS, FLUORESCENT_CHANNELS

__all__ = ["ALL_CHANNELS", "BRIGHTFIELD_CHANNELS", "FLUORESCENT_CHANNELS", "__version__", "load_pretrained"]


def load_pretrained(uri: str, **kwargs):
    """Load a model published by `dinocell publish` (hashes verified). See dinocell.model.published."""
    from dinocell.model.published import load_pretrained as _load

    return _load(uri, **kwargs)
