import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinocell.model.vit import vit_tiny
from dinocell.monitor.consistency import (
    default_normalisation,
    different_field_matrix,
    embed_views,
    field_views,
    retrieval,
    same_field_matrix,
    summary,
)

torch.set_num_threads(2)
FLUO = ["DNA", "ER", "RNA", "AGP", "Mito"]
VIEWS = ["mean"] + FLUO


def _embs(per_view: dict[str, torch.Tensor]) -> dict:
    return {v: {"cls": e, "patch_mean": -e} for v, e in per_view.items()}


# ----------------------------------------------------------------------------------------------- views


def test_field_views_hand_computed():
    values = {"DNA": 10, "ER": 20, "RNA": 30, "AGP": 40, "Mito": 50, "HighZBF": 255}
    fields = torch.stack([torch.full((16, 16), v, dtype=torch.uint8) for v in values.values()])[None].repeat(2, 1, 1, 1)
    views = field_views(fields, list(values), size=8, mean=0.5, std=0.25)
    assert list(views) == ["mean", *values]  # "mean" first, then the channels in the given order
    for name, v in values.items():
        assert views[name].shape == (2, 1, 8, 8)
        torch.testing.assert_close(views[name], torch.full((2, 1, 8, 8), (v / 255 - 0.5) / 0.25))
    # the mean is over the fluorescent channels only: (10 + 20 + 30 + 40 + 50) / 5 = 30, brightfield excluded
    torch.testing.assert_close(views["mean"], torch.full((2, 1, 8, 8), (30 / 255 - 0.5) / 0.25))


def test_field_views_resize_is_antialiased():
    # stripes 0,255,255,0 (period 4) shrunk 4x: point sampling hits the bright pair (255 everywhere, aliasing);
    # the antialiased filter averages each period to 127.5 (the border columns see a renormalised, partial filter)
    x = torch.arange(64)
    row = (((x % 4) == 1) | ((x % 4) == 2)).to(torch.uint8) * 255
    field = row.expand(64, 64)[None, None].contiguous()
    out = field_views(field, ["DNA"], size=16, mean=0.0, std=1.0)["DNA"][0, 0] * 255
    torch.testing.assert_close(out[:, 1:-1], torch.full((16, 14), 127.5), atol=1e-3, rtol=0)
    assert (out[:, [0, -1]] - 127.5).abs().max() < 10
    plain = F.interpolate(field.float(), size=(16, 16), mode="bilinear", antialias=False)
    assert (plain == 255).all()  # what a non-antialiased resize would have produced


def test_field_views_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        field_views(torch.zeros(1, 2, 8, 8), ["DNA", "ER"], 4, 0.5, 0.25)
    with pytest.raises(ValueError, match="1 channel names"):
        field_views(torch.zeros(1, 2, 8, 8, dtype=torch.uint8), ["DNA"], 4, 0.5, 0.25)
    with pytest.raises(ValueError, match="duplicate"):
        field_views(torch.zeros(1, 2, 8, 8, dtype=torch.uint8), ["DNA", "DNA"], 4, 0.5, 0.25)


def test_default_normalisation_follows_augment():
    from dinocell.data.multiview import AugmentConfig

    assert default_normalisation() == (AugmentConfig().norm_mean, AugmentConfig().norm_std)


# ----------------------------------------------------------------------------------------------- metrics


def _brute_force(embs, key="cls"):
    """Independent reference: explicit loops over field pairs."""
    names = list(embs)
    u = {v: F.normalize(embs[v][key].double(), dim=1) for v in names}
    b = u[names[0]].shape[0]
    same = np.array([[np.mean([float(u[i][a] @ u[j][a]) for a in range(b)]) for j in names] for i in names])
    diff = np.array(
        [
            [np.mean([float(u[i][a] @ u[j][c]) for a in range(b) for c in range(b) if a != c]) for j in names]
            for i in names
        ]
    )
    return same, diff


def test_identical_views_distinct_fields():
    b, d = 7, 16
    fields = torch.randn(b, d, generator=torch.Generator().manual_seed(1))
    embs = _embs({v: fields.clone() for v in VIEWS})
    same, labels = same_field_matrix(embs)
    assert labels == VIEWS
    np.testing.assert_allclose(same, np.ones((6, 6)), atol=1e-12)
    diff, _ = different_field_matrix(embs)
    ref_same, ref_diff = _brute_force(embs)
    np.testing.assert_allclose(diff, ref_diff, atol=1e-12)
    np.testing.assert_allclose(same, ref_same, atol=1e-12)
    ret = retrieval(embs)
    assert (ret["top1"] == 1.0).all() and (ret["mrr"] == 1.0).all()
    s = summary(embs)
    assert s["same_field"] == pytest.approx(1.0) and s["top1"] == 1.0 and s["mrr"] == 1.0
    channels = ref_diff[1:, 1:]  # the headline: fluorescent channel pairs, the mean view (row/column 0) excluded
    assert s["different_field"] == pytest.approx(channels[~np.eye(5, dtype=bool)].mean())
    assert s["gap"] > 0.5
    assert s["chance_top1"] == pytest.approx(1 / 7) and s["n_fields"] == 7
    json.dumps(s)  # JSON-ready
    # orthogonal fields: different-field similarity exactly 0, gap exactly 1
    s_orth = summary(_embs({v: torch.eye(b, d) for v in VIEWS}))
    assert s_orth["different_field"] == pytest.approx(0.0, abs=1e-12) and s_orth["gap"] == pytest.approx(1.0)


def test_collapsed_embedding_is_caught():
    b = 50
    constant = torch.randn(384, generator=torch.Generator().manual_seed(2)).float()
    embs = _embs({v: constant.expand(b, -1).clone() for v in VIEWS})
    s = summary(embs)
    assert s["same_field"] == pytest.approx(1.0) and s["different_field"] == pytest.approx(1.0)
    assert s["gap"] == pytest.approx(0.0, abs=1e-9)
    # every gallery item ties with the true match: pessimistic ties rank it last, so no hit is counted
    assert s["top1"] == 0.0 and s["top1"] <= s["chance_top1"]
    assert s["mrr"] == pytest.approx(1 / b)
    assert s["chance_mrr"] == pytest.approx(sum(1 / k for k in range(1, b + 1)) / b)


def test_summary_keeps_the_mean_view_apart():
    """Channels that match perfectly and a mean view that matches nothing: the headline is the channel pairs'
    (top-1 1), the mean view's own numbers sit in mean_vs_channel (top-1 averaged over both query directions)."""
    b = 8
    fields = torch.eye(b, 16)
    views = {v: fields.clone() for v in FLUO}
    views = {"mean": torch.roll(fields, 1, dims=0), **views}  # field a's mean view looks like field a-1
    s = summary(_embs(views))
    assert s["summary_views"] == FLUO and s["top1"] == 1.0 and s["gap"] == pytest.approx(1.0)
    m = s["mean_vs_channel"]
    assert m["views"] == ["mean"] and m["against"] == FLUO
    assert m["top1"] == 0.0 and m["same_field"] == pytest.approx(0.0)
    assert s["top1_all_views"] < 1.0  # the old all-views average would have mixed the two
    with pytest.raises(ValueError, match="disjoint"):
        from dinocell.monitor.consistency import view_group

        view_group({}, ["DNA"], ["DNA"], ["DNA"], b)


def test_ties_are_pessimistic_hand_computed():
    e = torch.eye(3)
    embs = _embs({"DNA": e, "ER": torch.stack([e[0], e[0], e[2]])})
    ret = retrieval(embs)
    # query DNA of field 0 (e0): gallery ER = [e0, e0, e2] -> true score 1 tied with field 1 -> rank 2
    # query field 1 (e1): all gallery scores 0, tied -> rank 3; query field 2: rank 1
    assert ret["labels"] == ["DNA", "ER"]
    assert ret["top1"][0, 1] == pytest.approx(1 / 3)
    assert ret["mrr"][0, 1] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)


def test_channel_shuffle_lowers_retrieval():
    b, d = 10, 32
    fields = torch.randn(b, d, generator=torch.Generator().manual_seed(3))
    views = {v: fields.clone() for v in VIEWS}
    views["ER"][[0, 1]] = views["ER"][[1, 0]]  # field 0's ER view belongs to field 1 and vice versa
    embs = _embs(views)
    ret = retrieval(embs)
    i, j = VIEWS.index("DNA"), VIEWS.index("ER")
    assert ret["top1"][i, j] == pytest.approx((b - 2) / b) and ret["top1"][j, i] == pytest.approx((b - 2) / b)
    assert ret["top1"][i, VIEWS.index("RNA")] == 1.0
    same, _ = same_field_matrix(embs)
    assert same[i, j] < 1.0 - 1e-3 and same[i, VIEWS.index("RNA")] == pytest.approx(1.0)
    assert summary(embs)["top1"] < 1.0


def test_metric_input_errors():
    with pytest.raises(KeyError, match="patch_mean"):
        same_field_matrix({"DNA": {"cls": torch.zeros(2, 3)}}, key="patch_mean")
    with pytest.raises(ValueError, match="other views"):
        summary({"DNA": {"cls": torch.ones(3, 4)}, "ER": {"cls": torch.ones(2, 4)}})
    with pytest.raises(ValueError, match="at least 2 fields"):
        retrieval({"DNA": {"cls": torch.ones(1, 4)}})


# ----------------------------------------------------------------------------------------------- real backbone


def test_embed_views_with_real_vit():
    torch.manual_seed(0)
    model = vit_tiny(patch_size=8, in_chans=1)
    model.train()  # embed_views must switch to eval and switch back
    names = FLUO + ["HighZBF"]
    fields = torch.randint(
        0, 256, (3, len(names), 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(4)
    )
    out = embed_views(model, fields, names, size=32, batch_size=2)
    assert model.training
    assert list(out) == ["mean"] + names
    for v in out.values():
        assert v["cls"].shape == (3, 192) and v["patch_mean"].shape == (3, 192)
        assert v["cls"].dtype == torch.float32 and torch.isfinite(v["cls"]).all()
    # chunking does not change the result, and it is the plain eval-mode forward of the normalised view
    whole = embed_views(model, fields, names, size=32, batch_size=64)
    for view in out:
        torch.testing.assert_close(out[view]["cls"], whole[view]["cls"], atol=1e-5, rtol=1e-5)
    mean, std = default_normalisation()
    model.eval()
    with torch.no_grad():
        ref = model.forward_features(field_views(fields, names, 32, mean, std)["DNA"])
    torch.testing.assert_close(whole["DNA"]["cls"], ref["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole["DNA"]["patch_mean"], ref["x_norm_patchtokens"].mean(1), atol=1e-5, rtol=1e-5)
    s = summary(out)
    assert s["summary_views"] == FLUO and "same_field_all_views" in s  # channel pairs: the mean view apart
    assert s["mean_vs_channel"]["views"] == ["mean"] and s["mean_vs_channel"]["against"] == FLUO
    assert all(math.isfinite(s[k]) for k in ("same_field", "different_field", "gap", "top1", "mrr"))


def test_embed_views_three_channel_backbone():
    torch.manual_seed(0)
    model = vit_tiny(patch_size=8, in_chans=3, depth=1)
    fields = torch.randint(0, 256, (2, 2, 16, 16), dtype=torch.uint8)
    out = embed_views(model, fields, ["DNA", "ER"], size=16)
    assert list(out) == ["mean", "DNA", "ER"] and out["DNA"]["cls"].shape == (2, 192)
