import importlib.util
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from dinocell.monitor.figures import (
    COSINE_RANGE,
    attention_maps_image,
    matrix_image,
    pca2,
    pca_rgb_image,
    pca_scatter_image,
)
from dinocell.monitor.run_log import RunLogger, resolve_wandb_mode

torch.set_num_threads(1)
HAVE_WANDB = importlib.util.find_spec("wandb") is not None


def _read_png(path) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(Path(path).read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    assert bgr is not None, f"{path} does not decode as an image"
    return bgr[..., ::-1]


def test_local_logs(tmp_path):
    cfg = {"train": {"lr": 5e-5, "crops": (224, 96)}, "out": tmp_path / "x"}
    with RunLogger(tmp_path / "run", cfg) as rl:
        rl.log_scalars(0, {"loss": torch.tensor(2.5), "lr": 1e-4, "n": np.int64(3), "iters": torch.tensor(7)})
        rl.log_scalars(10, {"loss": float("nan"), "grad_norm": float("inf")})
        img = np.zeros((20, 30, 3), np.uint8)
        img[:, :, 0] = 200  # pure red: checks the RGB/BGR order too
        png = rl.log_image(10, "attn/global", img)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["step"] for r in recs] == [0, 10]
    assert recs[0]["loss"] == 2.5 and recs[0]["lr"] == 1e-4 and recs[0]["n"] == 3 and recs[0]["iters"] == 7
    assert isinstance(recs[0]["iters"], int)
    assert recs[1]["loss"] == "nan" and recs[1]["grad_norm"] == "inf"
    assert all(isinstance(r["time"], float) and r["elapsed_s"] >= 0 for r in recs)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == {
        "train": {"lr": 5e-5, "crops": [224, 96]},
        "out": str(tmp_path / "x"),
    }
    assert png == str(tmp_path / "run" / "images" / "attn" / "global" / "00000010.png")
    got = _read_png(png)
    assert got.shape == (20, 30, 3) and np.array_equal(got, img)


def test_resume_appends(tmp_path):
    for step in (1, 2):
        with RunLogger(tmp_path, {}) as rl:
            rl.log_scalars(step, {"x": step})
    assert [json.loads(x)["x"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_bad_inputs_named(tmp_path):
    with RunLogger(tmp_path, {}) as rl:
        with pytest.raises(ValueError, match="'v'.*shape"):
            rl.log_scalars(0, {"v": torch.ones(3)})
        with pytest.raises(TypeError, match="'s'.*str"):
            rl.log_scalars(0, {"s": "text"})
        with pytest.raises(ValueError, match="bad image name"):
            rl.log_image(0, "../escape", np.zeros((4, 4, 3), np.uint8))
        with pytest.raises(ValueError, match="RGB uint8"):
            rl.log_image(0, "x", np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match=r"config\.obj"):
        RunLogger(tmp_path / "b", {"obj": object()})


def test_rank1_writes_nothing(tmp_path):
    rl = RunLogger(tmp_path / "run", {"a": 1}, wandb_mode="offline", rank=1)
    rl.log_scalars(0, {"loss": 1.0})
    assert rl.log_image(0, "x", np.zeros((4, 4, 3), np.uint8)) is None
    assert rl.sync_to(str(tmp_path / "mirror")) == 0
    rl.close()
    assert not (tmp_path / "run").exists() and not (tmp_path / "mirror").exists()
    assert rl.wandb_run is None


def test_sync_uploads_changed_files(tmp_path, s3_bucket):
    with RunLogger(tmp_path / "run", {"a": 1}) as rl:
        rl.log_scalars(0, {"x": 1})
        rl.log_image(0, "img", np.zeros((4, 4, 3), np.uint8))
        uri = f"s3://{s3_bucket}/runs/r1"
        assert rl.sync_to(uri) == 3  # config.yaml, metrics.jsonl, the PNG
        assert rl.sync_to(uri) == 0  # nothing changed
        rl.log_scalars(1, {"x": 2})
        assert rl.sync_to(uri) == 1  # only metrics.jsonl
    from dinocell import storage

    text = storage.read_text(f"{uri}/metrics.jsonl")
    assert [json.loads(x)["x"] for x in text.splitlines()] == [1, 2]
    assert storage.exists(f"{uri}/images/img/00000000.png")


def test_wandb_mode_precedence(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("env") == "offline" and resolve_wandb_mode(None) == "offline"
    assert resolve_wandb_mode("disabled") == "offline"  # the environment wins over the config's mode
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("online") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_wandb_mode("env") == "offline"
    monkeypatch.setenv("WANDB_MODE", "Run ")  # wandb's alias, any case and spacing
    assert resolve_wandb_mode("disabled") == "online"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'"):
        resolve_wandb_mode("offline")
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_wandb_mode("env") == "disabled" and resolve_wandb_mode(None) == "disabled"
    assert resolve_wandb_mode("offline") == "offline"  # unset: the config decides
    with pytest.raises(ValueError, match="wandb_mode"):
        resolve_wandb_mode("sometimes")


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (it is optional: pip install 'dinocell[wandb]')")
def test_wandb_offline_writes_run_dir(tmp_path, monkeypatch):
    wandb_dir = tmp_path / "wandb_root"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rl = RunLogger(tmp_path / "run", {"lr": 1e-3}, wandb_mode="env", run_name="test-run")
    try:
        assert rl.wandb_run is not None, "wandb offline init failed"
        rl.log_scalars(1, {"loss": 0.5})
        rl.log_image(1, "pca", np.full((8, 8, 3), 128, np.uint8))
    finally:
        rl.close()
    run_id = (tmp_path / "run" / "wandb_id.txt").read_text().strip()
    runs = list((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, sorted(p.name for p in (wandb_dir / "wandb").iterdir())
    assert list(runs[0].glob("*.wandb")), "no .wandb data file in the offline run"
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1  # local logs still written


def test_attention_image_shape_and_content():
    b, heads, g, patch = 3, 4, 4, 8
    attn = torch.zeros(b, heads, g * g)
    attn[:, :, 5] = 1.0  # every head looks at patch (1, 1)
    images = torch.randn(b, 1, g * patch, g * patch)
    out = attention_maps_image(attn, (g, g), images, n_heads=2, max_images=2)
    pad, h = 2, g * patch
    assert out.dtype == np.uint8 and out.shape == (pad + 2 * (h + pad), pad + 4 * (h + pad), 3)
    # the mean-attention tile (column 1) is brightest inside patch (1, 1)
    tile = out[pad : pad + h, pad + (h + pad) : pad + (h + pad) + h].astype(float).sum(-1)
    hot = tile[patch : 2 * patch, patch : 2 * patch].mean()
    cold = np.delete(tile.reshape(g, patch, g, patch).mean(axis=(1, 3)).ravel(), 5)
    assert hot > cold.max() + 100
    with pytest.raises(ValueError, match="grid_hw 5x5"):
        attention_maps_image(attn, (5, 5), images)


def test_pca_separates_planted_clusters():
    gen = torch.Generator().manual_seed(0)
    b, g, d, patch = 2, 6, 32, 4
    centres = torch.randn(3, d, generator=gen) * 5
    labels = torch.arange(g * g).reshape(g, g) // 12  # three horizontal bands of 2 rows: clusters 0, 1, 2
    labels = labels.flatten().repeat(b, 1)
    tokens = centres[labels] + 0.1 * torch.randn(b, g * g, d, generator=gen)
    images = torch.rand(b, 1, g * patch, g * patch, generator=gen)
    out = pca_rgb_image(tokens, (g, g), images)
    pad, h = 2, g * patch
    assert out.shape == (pad + b * (h + pad), pad + 2 * (h + pad), 3)
    colours = []
    for i in range(b):
        y = pad + i * (h + pad)
        pca_tile = out[y : y + h, pad + h + pad : pad + h + pad + h].astype(float)
        band = [pca_tile[c * 2 * patch : (c + 1) * 2 * patch].reshape(-1, 3) for c in range(3)]
        # 3 centres span a 2-D plane: components 1-2 (red, green) carry the clusters and are near-constant inside
        # one; component 3 (blue) is the noise, stretched to the full range by the min-max scaling
        assert max(x[:, :2].std(axis=0).max() for x in band) < 10
        colours.append([x.mean(axis=0) for x in band])
    for c in colours:
        dists = [np.linalg.norm(c[a] - c[z]) for a, z in ((0, 1), (0, 2), (1, 2))]
        assert min(dists) > 100, dists
    # jointly fitted: the same cluster gets the same colour in both images
    assert all(np.abs(colours[0][k][:2] - colours[1][k][:2]).max() < 10 for k in range(3))


def test_matrix_image():
    m = np.array([[1.0, 0.2, math.nan], [0.2, 1.0, 0.5], [0.1, 0.5, 1.0]])
    out = matrix_image(m, ["DNA", "ER", "mean"], title="same field")
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and min(out.shape[:2]) > 200
    assert out.std() > 10  # something was drawn
    with pytest.raises(ValueError, match="2 labels"):
        matrix_image(m, ["a", "b"])


def _pixels_near(img: np.ndarray, rgb, tol: int = 2) -> int:
    return int((np.abs(img.astype(int) - np.asarray(rgb, int)).max(axis=-1) <= tol).sum())


def test_matrix_image_fixed_scale_gives_a_value_the_same_colour_in_every_image():
    import matplotlib

    labels = ["DNA", "ER", "mean"]
    low = np.array([[1.0, 0.5, 0.2], [0.5, 1.0, 0.3], [0.2, 0.3, 1.0]])
    high = np.array([[1.0, 0.5, 0.9], [0.5, 1.0, 0.8], [0.9, 0.8, 1.0]])
    lo, hi = COSINE_RANGE
    colour = np.round(np.array(matplotlib.colormaps["coolwarm"]((0.5 - lo) / (hi - lo))[:3]) * 255)
    fixed = [matrix_image(m, labels, "t", vmin=lo, vmax=hi, cmap="coolwarm") for m in (low, high)]
    # the two 0.5 cells (minus their text) in both images: a large area of exactly that colour
    counts = [_pixels_near(img, colour) for img in fixed]
    assert min(counts) > 2000, counts
    # per-image scales (the default) paint 0.5 differently in each: in `high` it is the minimum, not mid-scale
    auto = matrix_image(high, labels, "t", cmap="coolwarm")
    assert _pixels_near(auto, colour) < counts[1] / 10
    # text stays readable on a diverging map: dark text on the light middle, light text on saturated ends
    assert matrix_image(np.zeros((2, 2)), ["a", "b"], vmin=lo, vmax=hi, cmap="coolwarm").std() > 5


def test_pca2_finds_the_planted_directions():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 2, generator=gen))[0]  # two orthonormal directions
    coef = torch.randn(200, 2, generator=gen) * torch.tensor([10.0, 3.0])
    x = coef @ basis.T + 0.01 * torch.randn(200, 16, generator=gen) + 5.0
    pts = pca2(x)
    assert pts.shape == (200, 2)
    # PC 1 recovers the large planted coordinate, PC 2 the small one (up to sign)
    assert abs(np.corrcoef(pts[:, 0], coef[:, 0].numpy())[0, 1]) > 0.999
    assert abs(np.corrcoef(pts[:, 1], coef[:, 1].numpy())[0, 1]) > 0.99  # the sample is not exactly uncorrelated
    assert np.allclose(pca2(x), pts)  # signs fixed: deterministic
    with pytest.raises(ValueError, match="N >= 2"):
        pca2(torch.zeros(1, 4))


def test_pca_scatter_colours_points_by_channel():
    import matplotlib

    gen = torch.Generator().manual_seed(1)
    views = ["DNA", "ER", "RNA"]
    # channel-specific embeddings: each view is its own tight cluster
    embs = {v: {"cls": torch.randn(1, 8, generator=gen) * 10 + 0.01 * torch.randn(6, 8, generator=gen)}
            for v in views}
    one = pca_scatter_image(embs, "cls", title="t")
    two = pca_scatter_image(embs, "cls", {"field": [f"f{i}" for i in range(6)]}, title="t")
    assert one.dtype == np.uint8 and two.shape[0] == one.shape[0] and two.shape[1] > 1.8 * one.shape[1]
    tab10 = matplotlib.colormaps["tab10"]

    def drawn(k: int) -> np.ndarray:  # the points are drawn at alpha 0.8 over white
        return np.round((0.8 * np.array(tab10(k)[:3]) + 0.2) * 255)

    for k in range(len(views)):  # every channel's colour is drawn (points and legend)
        assert _pixels_near(one, drawn(k), tol=3) > 20, views[k]
    assert _pixels_near(one, drawn(3), tol=3) == 0  # no fourth group
    with pytest.raises(ValueError, match="grouping 'field' has 2 labels for 6 fields"):
        pca_scatter_image(embs, "cls", {"field": ["a", "b"]})
    with pytest.raises(ValueError, match="'patch_mean'"):
        pca_scatter_image(embs, "patch_mean")


def test_visualizer_images_and_numbers():
    from dinocell.channels import ALL_CHANNELS
    from dinocell.config import load_config, packaged_config
    from dinocell.model.vit import vit_tiny
    from dinocell.train.visualize import Visualizer

    cfg = load_config(packaged_config("tiny"), ["augment.global_size=32"])
    gen = torch.Generator().manual_seed(0)
    fields = torch.randint(0, 256, (3, len(ALL_CHANNELS), 48, 48), generator=gen, dtype=torch.uint8)
    batch = {"images": fields, "channels": list(ALL_CHANNELS), "field_ids": ["B/P1/A01/1", "B/P1/A01/2", "B/P1/B02/1"]}
    vis = Visualizer.from_config(cfg, batch, torch.device("cpu"))
    assert vis.field_ids == batch["field_ids"]
    backbone = vit_tiny(patch_size=8, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    images, scalars = vis.images(backbone)
    assert set(images) == {"vis/attention", "vis/pca", "vis/pca_scatter", "vis/channel_consistency"}
    assert all(img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 for img in images.values())
    assert set(scalars) == {f"consistency/{k}" for k in ("same_field", "different_field", "gap", "top1", "mrr")}
    assert all(math.isfinite(v) for v in scalars.values())
    with pytest.raises(ValueError, match="2 field ids for 3 fields"):
        Visualizer(cfg, fields, tuple(ALL_CHANNELS), torch.device("cpu"), ["a", "b"])


def test_labelled_grid_keeps_long_row_labels_inside_the_image():
    # the report labels mean-view rows with full field ids; before the margin followed the labels they ran off the left
    from dinocell.eval.report_figures import labelled_grid

    tile, pad = 16, 2
    grid = np.full((pad + 2 * (tile + pad), pad + (tile + pad), 3), 0.5, dtype=np.float32)
    labels = ["2020_11_04_CPJUMP1/BR00114951/D12/2", "2020_11_04_CPJUMP1/BR00114951/O19/2"]
    img = labelled_grid(grid, tile, labels, ["view"], "t", pad=pad)
    edge = img[:, :6].astype(int)
    assert (edge >= 250).all(), "text reaches the image's left edge: a row label is clipped"
    assert (img[:, : img.shape[1] // 2] < 100).any()  # the labels themselves are drawn
