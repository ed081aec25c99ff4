"""The Cell Painting channel names dinocell knows by default (JUMP: 5 fluorescent + 3 brightfield planes).

A leaf module (no imports), so every layer may use it. Datasets with other channels name them in `data.channels`.
"""

FLUORESCENT_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
BRIGHTFIELD_CHANNELS = ("HighZBF", "LowZBF", "Brightfield")
ALL_CHANNELS = FLUORESCENT_CHANNELS + BRIGHTFIELD_CHANNELS
