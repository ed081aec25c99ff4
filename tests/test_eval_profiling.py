"""The evaluation's profiling section end to end: a synthetic bucket with planted perturbations, discovered with its
plate maps, evaluated: copairs mAP for every model in metrics.json, scalars.json (KFP Metrics) and report.html."""

from __future__ import annotations

import json

import pytest
import torch

from dinocell.channels import FLUORESCENT_CHANNELS
from dinocell.config import config_from_dict
from dinocell.eval.evaluate import load_eval_fields, run_evaluation
from dinocell.eval.models import reference_models
from dinocell.eval.profiling import ProfilingOptions, run_profiling
from dinocell.model.vit import build_vit

torch.set_num_threads(1)

MODELS = ("checkpoint", "initial_weights", "pixels_8x8", "pixels_16x16", "positions_only", "cellprofiler")


def _cfg(tmp_path):
    return config_from_dict({
        "model": {"arch": "vit_tiny", "embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8,
                  "n_prototypes": 8, "head_hidden_dim": 16, "head_bottleneck_dim": 8},
        "augment": {"global_size": 32, "local_size": 16, "n_local": 2},
        "data": {"channels": list(FLUORESCENT_CHANNELS)},
        "preprocess": {"downsample": 1},
        "train": {"output_dir": str(tmp_path / "runs")},
    })


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, buckets):
    tmp = tmp_path_factory.mktemp("profiling")
    report = buckets.synth(tmp / "src", batches=1, plates_per_batch=2, wells_per_plate=24, sites_per_well=1,
                           size=64, workers=2)
    manifest = buckets.manifest(report, val_fraction=0.5, channels=list(FLUORESCENT_CHANNELS))
    manifest.write(str(tmp / "manifest.parquet"))
    cfg = _cfg(tmp)
    torch.manual_seed(0)
    backbone = build_vit(cfg.model.arch, **cfg.model.backbone_kwargs(student=False))
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    ckpt = tmp / "ckpt-00000010.pt"
    torch.save({"teacher": teacher, "config": cfg.to_dict(), "iteration": 10}, ckpt)
    result = run_evaluation(str(ckpt), str(tmp / "manifest.parquet"), cfg, str(tmp / "out"), visuals=False,
                            max_fields=16, view_mode="independent",
                            profiling=ProfilingOptions(null_size=1000, seed=0))
    return result, tmp / "out", report


def test_every_model_gets_activity_and_consistency(profiled):
    result, _, report = profiled
    sec = result.metrics["profiling"]
    assert "not_scored" not in sec, sec.get("not_scored")
    assert sec["n_fields"] == 24 and sec["n_skipped_fields"] == 0 and len(sec["plates"]) == 1
    assert sec["n_reused_fields"] == 16  # the consistency set's 16 fields are not fetched a second time
    assert set(sec["models"]) == set(MODELS)
    for mid in MODELS:
        act = sec["models"][mid]["activity"]
        assert act["n_negcon_wells"] == 4 and act["n_perturbations"] == 10
        assert 0.0 <= act["mean_map"] <= 1.0 and 0.0 <= act["fraction_retrieved"] <= 1.0
        assert 0.0 < act["expected_null_map"] < 1.0
        assert "mean_map" in act["same_position_included"]
        con = sec["models"][mid]["consistency"]
        assert con["n_targets"] >= 1 and 0.0 <= con["mean_map"] <= 1.0


def test_reused_fields_score_exactly_like_fresh_loads(profiled):
    """Profiling slices the fields the consistency set already loaded; the numbers equal a load from scratch."""
    result, out, _ = profiled
    tmp = out.parent
    cfg = _cfg(tmp)
    fields = load_eval_fields(str(tmp / "manifest.parquet"), cfg, max_fields=16)
    models = {m.id: (m.module, m.norm_mean, m.norm_std) for m in reference_models((0.449, 0.226), "cpu")}
    opts = ProfilingOptions(null_size=1000, seed=0)
    args = (models, str(tmp / "manifest.parquet"), cfg, fields.channels, "val", 32, "cpu", 16, opts)
    fresh = run_profiling(*args)
    reused = run_profiling(*args, loaded=dict(zip(fields.field_ids, fields.images)), loaded_channels=fields.channels)
    assert fresh["n_reused_fields"] == 0 and reused["n_reused_fields"] == 16
    assert reused["models"] == fresh["models"] and reused["n_fields"] == fresh["n_fields"] == 24


def test_profiling_numbers_reach_scalars_summary_and_report(profiled):
    result, out, _ = profiled
    scalars = json.loads((out / "scalars.json").read_text())
    for mid in MODELS:
        assert f"profiling.{mid}.activity_map" in scalars
        assert f"profiling.{mid}.activity_fraction_retrieved" in scalars
        assert f"profiling.{mid}.consistency_map" in scalars
    ck = result.metrics["profiling"]["models"]["checkpoint"]["activity"]["mean_map"]
    best_pixels = max(result.metrics["profiling"]["models"][m]["activity"]["mean_map"]
                      for m in ("pixels_8x8", "pixels_16x16"))
    assert scalars["profiling.delta_vs_pixels.activity_map"] == pytest.approx(ck - best_pixels)
    assert "profiling.delta_vs_init.activity_map" in scalars
    cp = result.metrics["profiling"]["models"]["cellprofiler"]["activity"]["mean_map"]
    assert scalars["profiling.delta_vs_cellprofiler.activity_map"] == pytest.approx(ck - cp)
    measured = result.metrics["profiling"]["cellprofiler"]
    assert measured["n_fields"] + measured["n_without_nuclei"] == 24 and measured["n_measurements"] > 100
    assert result.metrics["models"]["cellprofiler"]["learned"] is False
    html = (out / "report.html").read_text()
    assert "Profiling (copairs mAP)" in html and "pixels 8x8" in html and "best pixel baseline" in html
    assert "CellProfiler (cp_measure)" in html and "CellProfiler (cp_measure)" in result.table
    assert "copairs mAP of well profiles" in result.table
    assert "## Profiling (copairs mAP)" in (out / "summary.md").read_text()
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["profiling"]["models"]["checkpoint"]["activity"]["mean_map"] == pytest.approx(ck)


def test_manifest_without_plate_maps_says_why(tmp_path, buckets):
    report = buckets.synth(tmp_path / "src", batches=1, plates_per_batch=2, wells_per_plate=4, sites_per_well=1,
                           size=64, workers=2)
    manifest = buckets.manifest(report, val_fraction=0.5, channels=list(FLUORESCENT_CHANNELS))
    # the plate maps are gone: every annotation empty
    table = manifest.table
    for col in ("perturbation", "control_type", "target"):
        table = table.set_column(table.column_names.index(col), col, [[""] * len(table)])
    manifest.table = table
    manifest.write(str(tmp_path / "manifest.parquet"))
    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    backbone = build_vit(cfg.model.arch, **cfg.model.backbone_kwargs(student=False))
    ckpt = tmp_path / "ckpt-00000001.pt"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "config": cfg.to_dict(), "iteration": 1}, ckpt)
    result = run_evaluation(str(ckpt), str(tmp_path / "manifest.parquet"), cfg, str(tmp_path / "out"),
                            visuals=False, view_mode="independent", pixel_baselines=False)
    assert "no negative-control wells" in result.metrics["profiling"]["not_scored"]
    assert "Profiling not scored" in (tmp_path / "out" / "report.html").read_text()
