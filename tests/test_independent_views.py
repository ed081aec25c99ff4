"""Independent views make the channel-consistency evaluation impossible to pass on layout.

Fields are the synthetic cell model's (dinocell.synth.cells: the same cells seen through every channel), 40 of them
at 128 px, scaled to uint8 per channel. With aligned whole-field views the pooled pixel vector and the positions-only
probe find a field from any channel (the leak); with independent crops, flips and turns per view they drop to chance.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dinocell.data.preprocess import scale_to_uint8
from dinocell.eval.evaluate import EvalFields, view_specs
from dinocell.eval.models import embed_fields, reference_models
from dinocell.eval.pixel_baseline import PixelBackbone
from dinocell.eval.scoring import analyse_embeddings
from dinocell.eval.view_sampling import ViewSpec, field_orientations, normalised_planes, sample_view_spec
from dinocell.synth.cells import Phenotype, render_field

torch.set_num_threads(1)

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito", "Brightfield"]
N_FIELDS = 40
SIZE = 128
VIEW = 64
NORM = (0.449, 0.226)


@pytest.fixture(scope="module")
def cell_fields() -> EvalFields:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(N_FIELDS):
        channels, _ = render_field(Phenotype(), SIZE, rng)
        images.append(np.stack([scale_to_uint8(channels[c], 1, 99.9, subsample=1) for c in CHANNELS]))
    ids = [f"B/P{i % 4}/A{i:02d}/1" for i in range(N_FIELDS)]
    return EvalFields(images=images, channels=CHANNELS, field_ids=ids, plates=[i.split("/")[1] for i in ids],
                      batches=["B"] * N_FIELDS, n_available=N_FIELDS, n_selected=N_FIELDS)


@pytest.fixture(scope="module")
def scored(cell_fields):
    """{sampling: {model id: analysis}} for the pixel baselines and the positions-only probe."""
    specs = view_specs(cell_fields, seed=0)
    out = {}
    for sampling in ("independent", "aligned"):
        out[sampling] = {m.id: analyse_embeddings(embed_fields(m, cell_fields, VIEW, "cpu", 64, sampling, specs))
                         for m in reference_models(NORM, "cpu")}
    return SimpleNamespace(results=out, specs=specs)


def test_pixel_baseline_is_solved_by_layout_only_when_views_are_aligned(scored):
    chance = 1 / N_FIELDS
    for model in ("pixels_8x8", "pixels_16x16"):
        aligned = scored.results["aligned"][model]["cls"]["summary"]
        independent = scored.results["independent"][model]["cls"]["summary"]
        assert aligned["summary_views"] == ["DNA", "ER", "RNA", "AGP", "Mito"]  # channel pairs, no mean view
        assert aligned["top1"] > 0.9, aligned  # the leak: pooled pixels find the field from any channel
        # measured 1.95x / 1.7x chance (dealt orientations; 3.7x on the demo when orientations were drawn per view)
        assert independent["top1"] < 2.5 * chance, independent
        assert independent["mrr"] < 3 * independent["chance_mrr"], independent
        assert aligned["gap"] > independent["gap"] + 0.2
        # the mean view holds a fifth of each channel's pixels: aligned, it is the easiest match of all
        mean_vs = scored.results["aligned"][model]["cls"]["mean_vs_channel"]
        assert mean_vs["top1"] >= aligned["top1"] - 0.05 and mean_vs["views"] == ["mean"]


def test_positions_only_probe_is_near_chance_under_independent_views(scored):
    chance = 1 / N_FIELDS
    aligned = scored.results["aligned"]["positions_only"]["cls"]["summary"]
    independent = scored.results["independent"]["positions_only"]["cls"]["summary"]
    assert aligned["top1"] > 0.5, aligned  # positions alone identify aligned fields
    assert independent["top1"] < 3 * chance, independent
    # brightfield against fluorescent channels: the same
    bf = scored.results["independent"]["positions_only"]["cls"]["brightfield"]
    assert bf["views"] == ["Brightfield"] and bf["top1"] < 3 * chance


def test_view_records_reproduce_the_views(cell_fields, scored):
    """A view rebuilt from its JSON record (box, flip, turn) alone is the view the model embedded."""
    model = PixelBackbone(16)
    embs = embed_fields(SimpleNamespace(module=model, norm_mean=NORM[0], norm_std=NORM[1]), cell_fields, VIEW,
                        "cpu", 7, "independent", scored.specs)
    for i in (0, 13, N_FIELDS - 1):
        planes = normalised_planes(torch.from_numpy(cell_fields.images[i])[None], CHANNELS, *NORM)
        for view in ("mean", "DNA", "Brightfield"):
            record = scored.specs[i][view].to_dict()
            spec = ViewSpec.from_dict(record)
            dealt = field_orientations(0, cell_fields.field_ids[i], list(scored.specs[i]))[view]
            assert spec == sample_view_spec(0, cell_fields.field_ids[i], view, (SIZE, SIZE), orientation=dealt)
            x = spec.render(planes[view][0, 0], VIEW)
            want = model.forward_features(x[None, None])["x_norm_clstoken"][0]
            torch.testing.assert_close(embs[view]["cls"][i], want, atol=1e-5, rtol=1e-5)
    # the crop really is that box, flipped then turned: an axis-aligned whole-pixel box and a plain resize
    img = torch.arange(SIZE * SIZE, dtype=torch.float32).reshape(SIZE, SIZE)
    spec = ViewSpec(x0=16, y0=32, w=64, h=64, hflip=True, rot90=1, field_hw=(SIZE, SIZE))
    want = torch.rot90(img[32:96, 16:80].flip(-1), 1, dims=(-2, -1))
    torch.testing.assert_close(spec.render(img, 64), want)


def test_seed_changes_the_views_and_views_differ_per_channel(cell_fields):
    a, b = view_specs(cell_fields, seed=0), view_specs(cell_fields, seed=1)
    assert a == view_specs(cell_fields, seed=0)  # deterministic
    assert all(a[i]["DNA"] != b[i]["DNA"] for i in range(N_FIELDS))
    boxes = {(s.x0, s.y0, s.w) for s in a[0].values()}
    assert len(boxes) == len(a[0])  # every view of a field has its own crop
    areas = np.array([s.w * s.h / SIZE**2 for sp in a for s in sp.values()])
    assert 0.32 - 1e-6 <= areas.min() and areas.max() <= 1 + 1e-6 and areas.std() > 0.1
    turns = [s.rot90 for sp in a for s in sp.values()]
    flips = [s.hflip for sp in a for s in sp.values()]
    assert set(turns) == {0, 1, 2, 3} and 0.3 < np.mean(flips) < 0.7
    for sp in a:  # no two fluorescent views (nor the mean view) of a field share an orientation
        fluo = [(s.hflip, s.rot90) for v, s in sp.items() if v in ("mean", "DNA", "ER", "RNA", "AGP", "Mito")]
        assert len(set(fluo)) == len(fluo) == 6
    with pytest.raises(ValueError, match="view mode must be"):
        from dinocell.eval.view_sampling import parse_view_modes

        parse_view_modes("random")
