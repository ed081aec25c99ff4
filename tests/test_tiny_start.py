"""The shipped tiny start (dinocell/assets/tiny-start, trained by bench/train_tiny_start.py from random weights with the
pipeline's own steps) is clearly above the pixel baselines and the positions-only probe under the evaluation's
independent views, on held-out fields it never saw, scored by the real evaluation (dinocell.eval.evaluate).

Why shipped: from scratch, a tiny DINO model needs 8-40 CPU minutes before its CLS tells fields apart under
independent views (bench/measured/multiview_recipe_2026-12-03.md), longer than the whole suite may take; the
short-run learning itself is tests/test_learning.py. The fields here are a fresh synthetic bucket (data seed 2; the
start trained on seed 1's), so nothing of them was seen in training, and the evaluation draws its own views.

Measured when the asset was made (bench/measured/tiny_start_2026-12-03.md; this test's bucket, 96 held-out fields,
chance 0.0104): start 0.092 (MRR 0.208), pixels 0.022 / 0.023 (MRR 0.070), positions-only 0.032 (MRR 0.088).
What the assertions rule out: a start no better than pixels (the evaluation could not tell it from layout), a
published CLS that lost the head-BatchNorm fold (its raw CLS scores 0.045, under the 2x bar) and an evaluation that
leaks layout (the pixel rows would leave chance; with aligned views they retrieve every field).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dinocell
from dinocell import storage
from dinocell.config import load_config, packaged_config
from dinocell.eval.evaluate import run_evaluation
from dinocell.eval.profiling import ProfilingOptions

START = Path(dinocell.__file__).resolve().parent / "assets" / "tiny-start"
PIXELS = ("pixels_8x8", "pixels_16x16")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    from dinocell.jump.step import discover
    from dinocell.synth.bucket import synth_bucket

    root = tmp_path_factory.mktemp("tiny_start")
    source = str(root / "source")
    synth_bucket(source, batches=1, plates_per_batch=4, wells_per_plate=24, sites_per_well=2, size=192, seed=2,
                 with_illum=False, workers=2, site_variation=1.0)
    overrides = ["data.val_fraction=0.5"]
    found = discover(packaged_config("tiny_start"), overrides, manifest_uri=str(root / "manifest.parquet"),
                     images_prefix=storage.join(source, "images"))
    assert found.fields_per_split["val"] == 96
    cfg = load_config(packaged_config("tiny_start"), overrides)
    result = run_evaluation(str(START), found.manifest_uri, cfg, str(root / "eval"), baseline="init", max_fields=96,
                            visuals=False, view_mode="independent", profiling=ProfilingOptions(enabled=False))
    return result.metrics


def _cls(metrics, model_id):
    [row] = [r for r in metrics["table"] if (r["sampling"], r["model_id"], r["embedding"], r["views"])
             == ("independent", model_id, "cls", "fluorescent")]
    return row


def test_the_shipped_start_is_a_published_model_with_the_head_batchnorm_folded():
    config = json.loads((START / json.loads((START / "latest").read_text())["version"] / "config.json").read_text())
    assert config["cls_space"] == "head input BatchNorm folded" and config["untie_cls_and_patch_norms"] is True
    model = dinocell.load_pretrained(str(START))  # hashes verified
    assert model.cls_norm is not None and model.n_blocks == 4


def test_the_trained_start_is_clearly_above_pixels_and_positions_under_independent_views(evaluation):
    chance = _cls(evaluation, "checkpoint")["chance_top1"]
    assert chance == pytest.approx(1 / 96)
    start = _cls(evaluation, "checkpoint")
    pixels = max(_cls(evaluation, p)["top1"] for p in PIXELS)
    positions = _cls(evaluation, "positions_only")["top1"]
    init = _cls(evaluation, "initial_weights")["top1"]
    # layout cannot pass: the pixel baselines and the positions-only probe stay near chance
    assert pixels < 4 * chance and positions < 4 * chance, (pixels, positions)
    # the trained model finds the same field in another channel, crop and orientation: at least twice as often as
    # the best of pixels and positions, and its random initialisation does not
    assert start["top1"] >= 2 * max(pixels, positions), (start["top1"], pixels, positions)
    assert init < 3 * chance
    mrr_ref = max(_cls(evaluation, m)["mrr"] for m in (*PIXELS, "positions_only"))
    assert start["mrr"] >= 1.5 * mrr_ref, (start["mrr"], mrr_ref)
    assert evaluation["checkpoint"]["cls_space"] == "head input BatchNorm folded"
