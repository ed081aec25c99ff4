"""augment.crop_policy (multiview / mean_only / single_only), the mean view over any channel set, and the ablation's
table writer (bench/ablation_multiview.py; the ablation itself is not run here)."""

from __future__ import annotations

import json

import pytest
import torch
from bench_scripts import load_bench

from dinocell.channels import FLUORESCENT_CHANNELS
from dinocell.config import ConfigError, load_config, packaged_config
from dinocell.config.augment import CROP_POLICIES, AugmentConfig
from dinocell.data.multiview import MEAN_SOURCE, MultiViewAugment, channel_roles, is_transmitted_light

torch.set_num_threads(1)

FLUO = list(FLUORESCENT_CHANNELS)
MIXED = ["Mito", "DNA", "HighZBF", "ER", "RNA", "Brightfield", "AGP"]  # permuted, brightfield in the middle
NON_SOURCE_PARAMS = ("box", "hflip", "vflip", "rot90", "jittered", "brightness", "contrast", "blur_sigma", "solarized")


def cfg(policy="multiview", **overrides) -> AugmentConfig:
    """Small crops, every photometric op on (so the policies are compared with everything else running)."""
    values = {"global_size": 16, "local_size": 8, "crop_policy": policy}
    values.update(overrides)
    return AugmentConfig(**values)


def plain(policy="multiview", **overrides) -> AugmentConfig:
    """No jitter / blur / solarize, output on the 0-255 scale: a crop of a constant field reads its source's value."""
    values = {"jitter_prob": 0.0, "blur_prob_global1": 0.0, "blur_prob_global2": 0.0, "blur_prob_local": 0.0,
              "solarize_prob": 0.0, "norm_mean": 0.0, "norm_std": 1.0 / 255.0}
    values.update(overrides)
    return cfg(policy, **values)


def constant_fields(names, batch=8, size=24):
    """Field b, channel c is the constant 20 * (c + 1) + b."""
    values = torch.tensor([[20 * (c + 1) + b for c in range(len(names))] for b in range(batch)], dtype=torch.uint8)
    return values[:, :, None, None].expand(batch, len(names), size, size).contiguous(), values.float()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def many_draws(aug, fields, names, seed, calls):
    """Sources of `calls` batches: (global slot 0, global slot 1, locals), each concatenated over the calls."""
    g, batch = gen(seed), fields.shape[0]
    g0, g1, loc = [], [], []
    for _ in range(calls):
        out = aug(fields, names, g)
        g0.append(out.global_views.source[:batch])
        g1.append(out.global_views.source[batch:])
        loc.append(out.local_views.source)
    return torch.cat(g0), torch.cat(g1), torch.cat(loc)


# ---------------------------------------------------------------------------------------------------------------
# The config switch


def test_crop_policy_config_default_values_and_error():
    assert AugmentConfig().crop_policy == "multiview" and CROP_POLICIES == ("multiview", "mean_only", "single_only")
    for policy in CROP_POLICIES:
        assert load_config(packaged_config("tiny"), [f"augment.crop_policy={policy}"]).augment.crop_policy == policy
    with pytest.raises(ConfigError) as err:
        load_config(packaged_config("tiny"), ["augment.crop_policy=mean"])
    message = str(err.value)
    assert "augment.crop_policy" in message and "'mean'" in message
    assert all(p in message for p in CROP_POLICIES), message
    with pytest.raises(ConfigError, match=r"augment\.crop_policy: must be one of \['multiview', 'mean_only', "):
        AugmentConfig(crop_policy="naive")


# ---------------------------------------------------------------------------------------------------------------
# Per-crop channel choices


def test_mean_only_every_crop_is_the_fluorescent_mean():
    fields, values = constant_fields(MIXED)
    out = MultiViewAugment(plain("mean_only"))(fields, MIXED, gen(1))
    assert torch.all(out.global_views.source == MEAN_SOURCE) and torch.all(out.local_views.source == MEAN_SOURCE)
    fluo_mean = values[:, [MIXED.index(n) for n in FLUO]].mean(dim=1)  # brightfield never in the mean
    for crops, slots in ((out.global_crops, 2), (out.local_crops, 8)):
        expected = fluo_mean.repeat(slots)[:, None, None].expand_as(crops[:, 0])
        torch.testing.assert_close(crops[:, 0], expected, atol=1e-3, rtol=0)
    stats = out.stats()
    assert stats["global/mean_fraction"] == 1.0 and stats["local/mean_fraction"] == 1.0


def test_single_only_every_crop_draws_its_own_channel():
    fields, values = constant_fields(FLUO, batch=64)
    aug = MultiViewAugment(plain("single_only"))
    g0, g1, loc = many_draws(aug, fields, FLUO, seed=2, calls=4)  # 256 + 256 global, 2048 local crops
    everything = torch.cat([g0, g1, loc])
    assert not (everything == MEAN_SOURCE).any()
    shares = torch.bincount(everything, minlength=5).float() / len(everything)
    assert torch.all((shares - 0.2).abs() < 0.025), shares  # uniform over the 5 channels (4.5 sigma)
    # Independent draws per crop: the two global crops of a field agree 1 time in 5 (a shared draw: always).
    assert abs((g0 == g1).float().mean().item() - 0.2) < 0.08
    # ... and each crop shows the channel it records.
    out = aug(fields, FLUO, gen(3))
    field = torch.arange(64).repeat(8)
    torch.testing.assert_close(out.local_crops[:, 0, 0, 0], values[field, out.local_views.source], atol=1e-3, rtol=0)


def test_single_only_honours_brightfield_prob_per_crop():
    fields, _ = constant_fields(MIXED, batch=64)
    bf = torch.tensor([MIXED.index("HighZBF"), MIXED.index("Brightfield")])
    _, g1, loc = many_draws(MultiViewAugment(plain("single_only", brightfield_prob=0.5)), fields, MIXED, 4, calls=3)
    singles = torch.cat([g1, loc])
    assert not (singles == MEAN_SOURCE).any()
    assert abs(torch.isin(singles, bf).float().mean().item() - 0.5) < 0.03


def test_multiview_choices_global_mean_then_channel_locals_mixed():
    fields, _ = constant_fields(FLUO, batch=64)
    g0, g1, loc = many_draws(MultiViewAugment(plain("multiview", mean_prob_local=0.3)), fields, FLUO, 5, calls=4)
    assert torch.all(g0 == MEAN_SOURCE) and not (g1 == MEAN_SOURCE).any()  # exact
    assert abs((loc == MEAN_SOURCE).float().mean().item() - 0.3) < 0.04  # 2048 local crops, 4 sigma


def test_multiview_sources_follow_todays_draw_rule_from_the_raw_stream():
    """Today's rule, recomputed from the generator: the first four draws of the global group are u_mean, u_bf,
    u_channel, u_bf_channel (one per crop); slot 0 is the mean, slot 1 FLUORESCENT_CHANNELS[floor(5 u_channel)]."""
    fields, _ = constant_fields(MIXED, batch=8)
    out = MultiViewAugment(cfg())(fields, MIXED, gen(6))
    g = gen(6)
    n = 2 * 8
    _u_mean, _u_bf, u_channel, _u_bf_channel = (torch.rand(n, generator=g) for _ in range(4))
    fluo_idx = torch.tensor([MIXED.index(c) for c in FLUO])
    expected = fluo_idx[(u_channel * 5).long().clamp(max=4)]
    expected[:8] = MEAN_SOURCE
    assert torch.equal(out.global_views.source, expected)


def test_policies_change_only_the_source_and_share_every_other_draw():
    """Same seed, three policies: every non-source parameter is identical, and a crop whose source is the same
    under two policies is bit-for-bit the same crop (all photometric ops on). So the default path is today's
    multiview path, and the ablation's policies differ in nothing but the channel choice."""
    fields = torch.randint(0, 256, (6, len(MIXED), 40, 40), dtype=torch.uint8, generator=gen(7))
    runs = {p: MultiViewAugment(cfg(p))(fields, MIXED, gen(8)) for p in CROP_POLICIES}
    default = MultiViewAugment(AugmentConfig(global_size=16, local_size=8))(fields, MIXED, gen(8))
    mv, mean_only, single = runs["multiview"], runs["mean_only"], runs["single_only"]
    assert torch.equal(default.global_crops, mv.global_crops) and torch.equal(default.local_crops, mv.local_crops)
    for group in ("global_views", "local_views"):
        for name in NON_SOURCE_PARAMS:
            ref = getattr(getattr(mv, group), name)
            for p in ("mean_only", "single_only"):
                assert torch.equal(getattr(getattr(runs[p], group), name), ref), (p, group, name)
    for crops in ("global_crops", "local_crops"):
        views = "global_views" if crops == "global_crops" else "local_views"
        mv_src = getattr(mv, views).source
        is_mean = mv_src == MEAN_SOURCE
        assert is_mean.any() and (~is_mean).any()
        # where multiview shows the mean, mean_only's crop is the same; where it shows a channel, single_only's is
        assert torch.equal(getattr(mean_only, crops)[is_mean], getattr(mv, crops)[is_mean])
        assert torch.equal(getattr(single, views).source[~is_mean], mv_src[~is_mean])
        assert torch.equal(getattr(single, crops)[~is_mean], getattr(mv, crops)[~is_mean])


# ---------------------------------------------------------------------------------------------------------------
# The mean view over whatever fluorescent channels exist


def test_transmitted_light_rule_and_channel_roles():
    light = ["HighZBF", "LowZBF", "Brightfield", "brightfield", "BrightField2", "Phase", "PhaseContrast", "BF", "DIC"]
    fluorescent = ["DNA", "ER", "RNA", "AGP", "Mito", "Actin", "GFP", "Tubulin", "Hoechst", "Dic1"]
    assert all(is_transmitted_light(n) for n in light), [n for n in light if not is_transmitted_light(n)]
    assert not any(is_transmitted_light(n) for n in fluorescent), [n for n in fluorescent if is_transmitted_light(n)]
    # dinocell's names first in FLUORESCENT_CHANNELS / BRIGHTFIELD_CHANNELS order, then the others in batch order
    assert channel_roles(["Actin", "Mito", "Phase", "ER", "LowZBF"]) == ([3, 1, 0], [4, 2])


@pytest.mark.parametrize("names", [
    ["ER", "RNA", "AGP", "Mito"],  # no DNA
    ["DNA", "ER", "Actin", "RNA", "AGP", "Mito"],  # an extra fluorescent channel
    ["Phase", "ER", "Actin", "Mito"],  # no DNA, an extra channel and a phase-contrast plane
])
def test_mean_view_is_the_mean_of_the_fluorescent_channels_present(names):
    fields, values = constant_fields(names)
    fluo = [i for i, n in enumerate(names) if not is_transmitted_light(n)]
    out = MultiViewAugment(plain())(fields, names, gen(9))
    assert set(out.mean_channels) == {names[i] for i in fluo}
    mean = values[:, fluo].mean(dim=1)
    torch.testing.assert_close(out.global_crops[:8, 0, 0, 0], mean, atol=1e-3, rtol=0)
    # single-channel choices are fluorescent (brightfield_prob is 0) and cover every fluorescent channel
    _, g1, loc = many_draws(MultiViewAugment(plain()), constant_fields(names, batch=64)[0], names, 10, calls=2)
    singles = torch.cat([g1, loc[loc != MEAN_SOURCE]])
    assert set(singles.tolist()) == set(fluo)


def test_phase_channel_is_chosen_only_through_brightfield_prob_and_counted_as_brightfield():
    names = ["Phase", "DNA", "Actin"]
    fields, _ = constant_fields(names, batch=64)
    out = MultiViewAugment(plain(brightfield_prob=1.0))(fields, names, gen(11))
    assert out.brightfield_available
    singles = torch.cat([out.global_views.source[64:], out.local_views.source])
    singles = singles[singles != MEAN_SOURCE]
    assert torch.all(singles == 0)  # every single-channel choice is the phase plane
    stats = out.stats()
    assert stats["global/brightfield_fraction"] == 0.5 and stats["global/mean_fraction"] == 0.5


def test_no_fluorescent_channel_is_a_clear_error_unless_single_only_on_transmitted_light():
    fields, values = constant_fields(["Phase", "HighZBF"])
    for policy in ("multiview", "mean_only"):
        with pytest.raises(ValueError, match=rf"crop_policy='{policy}' shows the mean.*no fluorescent channel"):
            MultiViewAugment(plain(policy))(fields, ["Phase", "HighZBF"], gen(0))
    with pytest.raises(ValueError, match=r"no fluorescent channel.*augment\.brightfield_prob=1\.0 \(it is 0\.3\)"):
        MultiViewAugment(plain("single_only", brightfield_prob=0.3))(fields, ["Phase", "HighZBF"], gen(0))
    out = MultiViewAugment(plain("single_only", brightfield_prob=1.0))(fields, ["Phase", "HighZBF"], gen(0))
    assert out.mean_channels == () and not (out.local_views.source == MEAN_SOURCE).any()
    field = torch.arange(8).repeat(8)
    torch.testing.assert_close(out.local_crops[:, 0, 0, 0], values[field, out.local_views.source], atol=1e-3, rtol=0)
    assert torch.isfinite(out.global_crops).all()


def test_bad_channel_names_are_rejected():
    fields, _ = constant_fields(["DNA", "ER"])
    with pytest.raises(ValueError, match="non-empty strings"):
        MultiViewAugment(plain())(fields, ["DNA", ""], gen(0))
    with pytest.raises(ValueError, match=r"duplicate channel names \['DNA'\]"):
        MultiViewAugment(plain())(fields, ["DNA", "DNA"], gen(0))


# ---------------------------------------------------------------------------------------------------------------
# The ablation's table writer


def test_ablation_metric_extraction_and_table(tmp_path):
    ablation = load_bench("ablation_multiview")
    metrics = {"table": [
        {"model": "checkpoint", "embedding": "cls", "views": "fluorescent", "gap": 0.30, "top1": 0.5, "mrr": 0.6,
         "same_field": 0.9, "different_field": 0.6, "chance_top1": 0.1},
        {"model": "baseline", "embedding": "cls", "views": "fluorescent", "gap": 0.01, "top1": 0.1, "mrr": 0.2,
         "same_field": 0.99, "different_field": 0.98, "chance_top1": 0.1},
        {"model": "pixels 8x8", "model_id": "pixels_8x8", "embedding": "pixels", "views": "fluorescent", "top1": 0.4},
        # newer evaluations: a sampling mode per row (must not collide) and a model id (not part of the key)
        {"sampling": "aligned", "model": "checkpoint", "model_id": "checkpoint", "embedding": "cls",
         "views": "fluorescent", "gap": 0.7, "flag": True},
        {"embedding": "cls", "gap": 9.0},  # no model: ignored and counted
    ], "profiling": {"n_fields": 12, "split": "val", "models": {
        "checkpoint": {"activity": {"mean_map": 0.25, "by_control_type": {"treatment": {"mean_map": 0.3}}}},
        "pixels_8x8": {"activity": {"mean_map": 0.125}, "consistency": {"fraction_retrieved": 0.5}},
    }}}
    found = ablation.extract_metrics(metrics)
    assert found["checkpoint"]["cls/fluorescent/gap"] == 0.30 and found["pixels 8x8"]["pixels/fluorescent/top1"] == 0.4
    assert found["checkpoint"]["aligned/cls/fluorescent/gap"] == 0.7 and "aligned/cls/fluorescent/flag" not in found[
        "checkpoint"]
    checkpoint, pixels = found["checkpoint"], found["pixels 8x8"]  # profiling per model, by model_id
    assert checkpoint["profiling/activity/mean_map"] == 0.25 and checkpoint["profiling/data/n_fields"] == 12.0
    assert checkpoint["profiling/activity/by_control_type/treatment/mean_map"] == 0.3
    assert pixels["profiling/activity/mean_map"] == 0.125 and pixels["profiling/consistency/fraction_retrieved"] == 0.5
    assert set(found) == {"checkpoint", "baseline", "pixels 8x8"}
    columns = ablation.table_columns([{"metrics": checkpoint}, {"metrics": pixels}])
    assert columns == ["aligned/cls/fluorescent/gap", "cls/fluorescent/gap", "cls/fluorescent/top1",
                       "cls/fluorescent/mrr", "profiling/activity/mean_map", "profiling/consistency/fraction_retrieved"]
    both = {"independent/cls/fluorescent/gap": 0.1, "aligned/cls/fluorescent/gap": 0.9, "aligned/cls/x/top1": 0.5}
    assert ablation.table_columns([{"metrics": both}]) == ["independent/cls/fluorescent/gap"]
    runs = [
        {"policy": "multiview", "seed": 0, "metrics": {"cls/fluorescent/gap": 0.30}},
        {"policy": "multiview", "seed": 1, "metrics": {"cls/fluorescent/gap": 0.50}},
        {"policy": "mean_only", "seed": 0, "metrics": {"cls/fluorescent/gap": 0.10}},
    ]
    summary = ablation.write_table(runs, tmp_path, meta={"iters": 5})
    data = json.loads((tmp_path / "ablation.json").read_text())
    rows = {r["policy"]: r for r in data["summary"]}
    assert rows["multiview"]["cls/fluorescent/gap"]["mean"] == pytest.approx(0.40)
    assert rows["multiview"]["cls/fluorescent/gap"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert rows["multiview"]["cls/fluorescent/gap"]["n"] == 2 and rows["mean_only"]["cls/fluorescent/gap"]["n"] == 1
    assert data["meta"] == {"iters": 5} and len(data["runs"]) == 3 and summary == data["summary"]
    table = (tmp_path / "ablation.md").read_text()
    assert "| multiview | 0.4000 ± 0.1414 (2) |" in table and "| mean_only | 0.1000 (1) |" in table
