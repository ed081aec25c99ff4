#!/usr/bin/env python3
"""Throughput of the batched multi-view augmentation (dinocell.data.multiview), with the naive per-crop path as anchor.

  python bench/bench_augment.py [--batch 8] [--field 540] [--iters 10] [--device cpu|cuda] [--threads N]
                                [--resample auto|taps|matmul] [--no-anchor]

Measures MultiViewAugment (default config: 2 x 224 + 8 x 96 crops per field, flips, rotations, jitter, blur,
solarize, normalisation) on B random uint8 fields of 5 channels, and, on the same fields and machine, the crop step
of shared/bench/naive_data_bench.py (uint8 channel mean, one random square crop per view, cv2.resize INTER_CUBIC,
nothing else: less work than ours, and not antialiased). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from dinocell.channels import FLUORESCENT_CHANNELS
from dinocell.data.multiview import AugmentConfig, MultiViewAugment


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_augment(fields: torch.Tensor, iters: int, warmup: int, resample: str) -> float:
    """Seconds per batch."""
    aug = MultiViewAugment(AugmentConfig(resample=resample))
    names = list(FLUORESCENT_CHANNELS)
    generator = torch.Generator(device=fields.device).manual_seed(0)
    for _ in range(warmup):
        aug(fields, names, generator)
    sync(fields.device)
    start = time.perf_counter()
    for _ in range(iters):
        out = aug(fields, names, generator)
    sync(fields.device)
    assert out.global_crops.shape[0] + out.local_crops.shape[0] == 10 * fields.shape[0]
    return (time.perf_counter() - start) / iters


def bench_naive_crops(fields: np.ndarray, iters: int) -> float:
    """Seconds per batch for the naive anchor's crop step (per field, per crop, on the CPU)."""
    import cv2

    rng = np.random.default_rng(0)
    size = fields.shape[-1]

    def one_batch():
        for chans in fields:
            avg = np.mean(chans, axis=0).astype(np.uint8)
            for i, out in enumerate([224, 224] + [96] * 8):
                src = avg if i == 0 else chans[rng.integers(len(chans))]
                lo, hi = (0.32, 1.0) if out == 224 else (0.05, 0.32)
                s = int(size * np.sqrt(rng.uniform(lo, hi)))
                y, x = rng.integers(0, size - s + 1, 2)
                cv2.resize(src[y : y + s, x : x + s], (out, out), interpolation=cv2.INTER_CUBIC)

    one_batch()
    start = time.perf_counter()
    for _ in range(iters):
        one_batch()
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--field", type=int, default=540, help="field side in pixels")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resample", default="auto", choices=["auto", "taps", "matmul"], help="AugmentConfig.resample")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for torch and cv2")
    ap.add_argument("--no-anchor", action="store_true", help="skip the naive cv2 crop anchor")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    gen = torch.Generator().manual_seed(1)
    fields_cpu = torch.randint(0, 256, (a.batch, 5, a.field, a.field), dtype=torch.uint8, generator=gen)
    fields = fields_cpu.to(device)

    crops_per_batch = 10 * a.batch
    sec = bench_augment(fields, a.iters, a.warmup, a.resample)
    result = {
        "bench": "augment",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpus": os.cpu_count(),
        "threads": a.threads,
        "torch": torch.__version__,
        "resample": a.resample,
        "batch": a.batch,
        "field": a.field,
        "crops_per_field": 10,
        "ms_per_batch": round(sec * 1e3, 2),
        "crops_per_s": round(crops_per_batch / sec, 1),
        "fields_per_s": round(a.batch / sec, 1),
    }
    if not a.no_anchor:
        import cv2

        cv2.setNumThreads(a.threads)
        naive = bench_naive_crops(fields_cpu.numpy(), max(1, a.iters // 2))
        result["naive_cv2_crops_per_s"] = round(crops_per_batch / naive, 1)
        result["speedup_vs_naive_crops"] = round(naive / sec, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
