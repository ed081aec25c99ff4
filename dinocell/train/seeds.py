"""Every random stream of a training rank, each seeded from (run seed, rank, stream): reproducible, and distinct
across ranks and streams.

Streams: GLOBAL (torch / numpy / python global RNGs: drop path, RoPE rescale), AUGMENT (the multi-view augmentation's
generator, on the training device), MASKS (the iBOT masks), LOADER (the DataLoader's base seed, drawn from its own
generator so that it never consumes the global RNG). The checkpoint holds the states of the stateful ones (GLOBAL,
AUGMENT), so a resumed run continues them exactly (dinocell.train.loop). The masks hold no state: the masks of
iteration i come from a generator seeded by (run seed, rank, i) alone (`mask_rng`), built in the DataLoader worker
that makes the batch (dinocell.train.batches), so they are the same after any resume and for any num_workers.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["AUGMENT", "GLOBAL", "LOADER", "MASKS", "mask_rng", "seed_rank_streams", "stream_seed"]

GLOBAL, AUGMENT, MASKS, LOADER = 0, 1, 2, 3


def stream_seed(seed: int, rank: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, rank, stream)."""
    return (seed * 1_000_003 + rank * 7919 + stream * 104_729) % (2**63 - 1)


def seed_rank_streams(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """Seed the global RNGs of this rank; returns its augmentation generator (on `device`)."""
    torch.manual_seed(stream_seed(seed, rank, GLOBAL))
    np.random.seed(stream_seed(seed, rank, GLOBAL) % 2**32)
    random.seed(stream_seed(seed, rank, GLOBAL))
    return torch.Generator(device=device).manual_seed(stream_seed(seed, rank, AUGMENT))


def mask_rng(seed: int, rank: int, iteration: int) -> np.random.Generator:
    """The generator of the iBOT masks that `rank` uses at `iteration` (0-based: the iteration's number before it
    runs), a function of (run seed, rank, iteration) alone."""
    if iteration < 0:
        raise ValueError(f"mask_rng: iteration must be >= 0, got {iteration}")
    return np.random.default_rng([stream_seed(seed, rank, MASKS), int(iteration)])
