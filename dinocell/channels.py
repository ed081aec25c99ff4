"""The Cell Painting channel names dinocell knows by default (JUMP: 5 fluorescent + 3 brightfield planes).

A leaf module (no imports), so every layer may use it. Datasets with other channels name them in `data.channels`;
`is_transmitted_light` decides which of any channel set are transmitted light (never averaged into the mean view)
and which are fluorescent.
"""

FLUORESCENT_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
BRIGHTFIELD_CHANNELS = ("HighZBF", "LowZBF", "Brightfield")
ALL_CHANNELS = FLUORESCENT_CHANNELS + BRIGHTFIELD_CHANNELS

# Substrings (lower case) that mark a channel name outside the lists above as transmitted light, not fluorescence.
TRANSMITTED_LIGHT_MARKERS = ("bright", "phase")


def is_transmitted_light(name: str) -> bool:
    """The rule for which channels are transmitted light (brightfield, phase contrast, DIC) and so never enter the
    fluorescent mean: a name in BRIGHTFIELD_CHANNELS, containing "bright" or "phase", ending with "bf" (HighZBF,
    LowZBF, BF) or equal to "dic", case-insensitive. Every other name (DNA, Actin, GFP, ...) is fluorescent."""
    lower = name.lower()
    return (
        name in BRIGHTFIELD_CHANNELS
        or any(marker in lower for marker in TRANSMITTED_LIGHT_MARKERS)
        or lower.endswith("bf")
        or lower == "dic"
    )


def is_fluorescent(name: str) -> bool:
    return not is_transmitted_light(name)
