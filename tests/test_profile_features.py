"""Profiling features: whole plates are chosen, tiles cover the field's centre, features are tile means per channel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinocell.eval.profile_features import field_features, select_plates, tile_origins
from dinocell.jump.manifest import FieldRecord


def _rec(plate: str, well: str, site: int) -> FieldRecord:
    return FieldRecord(f"B/{plate}/{well}/{site}", "B", plate, well, site, "val", {})


def test_select_plates_takes_whole_plates_up_to_the_cap():
    records = [_rec(p, w, s) for p in ("P1", "P2", "P3") for w in ("A01", "A02") for s in (1, 2)]
    picked, plates = select_plates(records, max_fields=9)
    assert len(plates) == 2 and len(picked) == 8  # a third plate would make 12 > 9
    assert {r.plate for r in picked} == {p.split("/")[1] for p in plates}
    again, _ = select_plates(list(reversed(records)), max_fields=9)
    assert {r.field_id for r in again} == {r.field_id for r in picked}  # order-independent
    one, _ = select_plates(records, max_fields=1)
    assert len(one) == 4  # never less than one whole plate
    assert len(select_plates(records, 0)[0]) == 12
    with pytest.raises(ValueError, match="max_fields"):
        select_plates(records, -1)


def test_tile_origins_centred_grid_and_cap():
    assert tile_origins(100, 100, 48) == [(2, 2), (2, 50), (50, 2), (50, 50)]
    assert tile_origins(40, 100, 48) == []
    capped = tile_origins(480, 480, 48, max_tiles=4)
    assert capped == [(192, 192), (192, 240), (240, 192), (240, 240)]  # the four central tiles


class _MeanPerTile(torch.nn.Module):
    """A 'backbone' whose CLS is the tile's mean intensity: the features can be computed by hand."""

    in_chans = 1

    def forward_features(self, x):
        m = x.mean(dim=(1, 2, 3))[:, None]
        return {"x_norm_clstoken": m, "x_norm_patchtokens": m[:, None, :]}


def test_field_features_average_tiles_and_concatenate_channels():
    img = np.zeros((3, 96, 96), np.uint8)
    img[0, :48, :48] = 255  # channel A: one of four tiles bright
    img[2] = 255  # channel C: all bright
    feats = field_features(_MeanPerTile(), [img], ["A", "B", "C"], ["A", "C"], size=48, mean=0.0, std=1.0)
    assert feats.shape == (1, 2)
    np.testing.assert_allclose(feats[0], [0.25, 1.0], atol=1e-6)
