"""`dinocell evaluate`: channel-consistency metrics on real (small) fields, the report files, the checkpoint layouts.

Fields are built here: each field is smoothed noise seen through every channel with the channel's own noise (and an
inverted, dimmer copy as brightfield), written as 16-bit TIFFs and listed in a real Parquet manifest, so a working
backbone can match a field's channels while a manifest whose channels were joined to the wrong fields cannot.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from dinocell import storage
from dinocell.config import config_from_dict
from dinocell.eval.checkpoint_reader import load_backbone, load_init_backbone
from dinocell.eval.evaluate import run_evaluation as evaluate
from dinocell.eval.evaluate import select_fields
from dinocell.jump.manifest import FieldRecord, Manifest, make_field_id
from dinocell.model.vit import build_vit, vit_tiny
from dinocell.synth.bucket import encode_tiff
from dinocell.train.checkpoint import CheckpointManager

torch.set_num_threads(1)  # 2 shared cores: multi-threaded LAPACK (PCA) is pathologically slow under load

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito", "Brightfield"]
VAL_PLATES = [("B1", "P1"), ("B1", "P2"), ("B2", "P3"), ("B2", "P4")]
PER_PLATE = 6
N_VAL = len(VAL_PLATES) * PER_PLATE
SIZE = 64


def _field_images(rng: np.random.Generator) -> dict[str, np.ndarray]:
    base = cv2.GaussianBlur(rng.random((SIZE, SIZE)).astype(np.float32), (0, 0), 3)
    base = (base - base.min()) / (base.max() - base.min())
    out = {ch: base + 0.08 * rng.random((SIZE, SIZE)) for ch in CHANNELS[:5]}
    out["Brightfield"] = 1 - 0.6 * base + 0.08 * rng.random((SIZE, SIZE))
    return {c: (v / v.max() * 60000).astype(np.uint16) for c, v in out.items()}


def _write_fields(root) -> list[FieldRecord]:
    rng = np.random.default_rng(0)
    records = []
    for batch, plate, split in [(b, p, "val") for b, p in VAL_PLATES] + [("B1", "P0", "train")]:
        for k in range(PER_PLATE):
            well = f"A{k + 1:02d}"
            images = _field_images(rng)
            uris = {}
            for ch in CHANNELS:
                uris[ch] = f"{root}/{batch}/{plate}/{well}_{ch}.tiff"
                storage.write_bytes(uris[ch], encode_tiff(images[ch]))
            records.append(FieldRecord(make_field_id(batch, plate, well, 1), batch, plate, well, 1, split, uris))
    return records


def _shuffled(records: list[FieldRecord]) -> list[FieldRecord]:
    """The channels of the val fields joined to the wrong fields: a different permutation per channel."""
    val = [i for i, r in enumerate(records) if r.split == "val"]
    out = [FieldRecord(r.field_id, r.batch, r.plate, r.well, r.site, r.split, dict(r.uris)) for r in records]
    for j, ch in enumerate(CHANNELS):
        perm = np.random.default_rng(j + 1).permutation(val)
        for i, src in zip(val, perm):
            out[i].uris[ch] = records[src].uris[ch]
    return out


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_fields")
    records = _write_fields(str(root / "images"))
    Manifest.from_records(records, CHANNELS).write(str(root / "manifest.parquet"))
    Manifest.from_records(_shuffled(records), CHANNELS).write(str(root / "shuffled.parquet"))
    # the same fields with one val field's DNA image gone (it must be skipped, counted and named)
    broken = [FieldRecord(r.field_id, r.batch, r.plate, r.well, r.site, r.split, dict(r.uris)) for r in records]
    broken[0].uris["DNA"] = str(root / "images" / "gone.tiff")
    Manifest.from_records(broken, CHANNELS).write(str(root / "broken.parquet"))
    return SimpleNamespace(root=root, records=records, manifest=str(root / "manifest.parquet"),
                           shuffled=str(root / "shuffled.parquet"), broken=str(root / "broken.parquet"),
                           missing_field=broken[0].field_id)


def _cfg(**model):
    return config_from_dict({
        "data": {"channels": CHANNELS},
        "preprocess": {"clahe": False, "downsample": 1},
        "model": {"arch": "vit_tiny", "layerscale": 1.0, **model},
        "augment": {"global_size": SIZE, "local_size": 32},
        "train": {"seed": 3},
    })


def _training_checkpoint(cfg, backbone, iteration=10) -> dict:
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    teacher["dino_head.last_layer.weight"] = torch.randn(8, 4)  # heads ride along and must be ignored
    return {"teacher": teacher, "config": cfg.to_dict(), "iteration": iteration}


def _trained_like(cfg, seed=0):
    """A backbone of the config's architecture with weights that differ from the run's initial ones."""
    torch.manual_seed(seed)
    return build_vit(cfg.model.arch, **cfg.model.backbone_kwargs(student=False)).eval()


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    cfg = _cfg()
    path = tmp_path_factory.mktemp("ckpt") / "ckpt-00000010.pt"
    torch.save(_training_checkpoint(cfg, _trained_like(cfg)), path)
    return SimpleNamespace(path=str(path), cfg=cfg)


def _row(result, model="checkpoint", embedding="patch_mean", views="fluorescent", sampling="independent") -> dict:
    [row] = [r for r in result.metrics["table"]
             if (r["sampling"], r["model_id"], r["embedding"], r["views"]) == (sampling, model, embedding, views)]
    return row


# ----------------------------------------------------------------------------------------------- metrics


def test_collapsed_model_scores_high_similarity_but_chance_retrieval(fields, tmp_path):
    cfg = _cfg()
    backbone = _trained_like(cfg)
    with torch.no_grad():  # the final norm maps every token to one constant vector: a collapsed model
        backbone.norm.weight.zero_()
        backbone.norm.bias.copy_(torch.linspace(-1, 1, backbone.embed_dim))
    torch.save(_training_checkpoint(cfg, backbone), tmp_path / "collapsed.pt")
    result = evaluate(str(tmp_path / "collapsed.pt"), fields.manifest, cfg, str(tmp_path / "out"), baseline="none",
                      visuals=False, pixel_baselines=False)
    for embedding, views, sampling in itertools.product(("cls", "patch_mean"), ("fluorescent", "mean-channel",
                                                        "brightfield-fluorescent"), ("independent", "aligned")):
        row = _row(result, embedding=embedding, views=views, sampling=sampling)
        assert row["same_field"] == pytest.approx(1.0, abs=1e-6)  # the seed's single number looks perfect...
        assert row["different_field"] == pytest.approx(1.0, abs=1e-6)  # ...but so does every other field
        assert abs(row["gap"]) < 1e-6
        assert row["top1"] == 0.0 <= row["chance_top1"]  # all ties, counted against the model
        assert row["mrr"] == pytest.approx(1.0 / N_VAL)
    assert result.metrics["data"]["n_fields"] == N_VAL
    assert _row(result)["chance_top1"] == pytest.approx(1.0 / N_VAL)


def test_channel_shuffled_manifest_is_caught(fields, good_checkpoint, tmp_path):
    # aligned views: a random-weights ViT matches a field's channels by layout, which is what this test needs
    common = {"baseline": "none", "visuals": False, "view_mode": "aligned", "pixel_baselines": False}
    aligned = evaluate(good_checkpoint.path, fields.manifest, good_checkpoint.cfg, str(tmp_path / "a"), **common)
    shuffled = evaluate(good_checkpoint.path, fields.shuffled, good_checkpoint.cfg, str(tmp_path / "s"), **common)
    chance = 1.0 / N_VAL
    for embedding in ("cls", "patch_mean"):
        good = _row(aligned, embedding=embedding, sampling="aligned")
        bad = _row(shuffled, embedding=embedding, sampling="aligned")
        assert good["top1"] > 0.5 > 10 * chance  # channels of one field find each other
        assert bad["top1"] < 3 * chance  # channels joined to the wrong fields: retrieval drops to chance
        assert good["mrr"] > 2 * bad["mrr"]
        assert good["gap"] > 0.1 and bad["gap"] < good["gap"] / 3
    # the matrices behind the numbers: diagonal 1 (same view, same field), views in order, mean first
    cls = aligned.metrics["results"]["aligned"]["checkpoint"]["cls"]
    assert cls["labels"] == ["mean", *CHANNELS]
    assert np.allclose(np.diag(cls["same_field"]), 1.0)


def test_select_fields_is_deterministic_and_capped():
    ids = [f"b/p{i % 3}/A{i:02d}/1" for i in range(50)]
    first = select_fields(ids, 10)
    assert first == select_fields(list(ids), 10) and len(first) == 10 and len(set(first)) == 10
    assert sorted(select_fields(ids, 0)) == list(range(50))  # 0 = all
    assert select_fields(ids, 20)[:10] == first  # a larger cap extends the same order


def test_fields_of_different_sizes_keep_their_order():
    """Fields are embedded in groups of equal size; the result must come back in evaluation order."""
    from dinocell.eval.evaluate import EvalFields, view_specs
    from dinocell.eval.models import EvalModel, embed_fields
    from dinocell.monitor.consistency import embed_views

    torch.manual_seed(0)
    model = vit_tiny(patch_size=8, in_chans=1, layerscale_init=1.0).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (2, s, s), dtype=np.uint8) for s in (40, 56, 40, 56, 48)]
    fields = EvalFields(images=images, channels=["DNA", "ER"], field_ids=[str(i) for i in range(5)],
                        plates=["p"] * 5, batches=["b"] * 5, n_available=5, n_selected=5)
    _, info = load_backbone({k: v for k, v in model.state_dict().items()})
    entry = EvalModel("checkpoint", "checkpoint", model, info.norm_mean, info.norm_std, "test", info)
    embs = embed_fields(entry, fields, 32, "cpu", 2, "aligned")
    specs = view_specs(fields, seed=1)
    independent = embed_fields(entry, fields, 32, "cpu", 2, "independent", specs)
    for i, img in enumerate(images):
        one = embed_views(model, torch.from_numpy(img)[None], ["DNA", "ER"], size=32, mean=info.norm_mean,
                          std=info.norm_std)
        for view in ("mean", "DNA", "ER"):
            torch.testing.assert_close(embs[view]["cls"][i], one[view]["cls"][0], atol=1e-5, rtol=1e-5)
            with torch.no_grad():  # the independent view of field i, rebuilt from its own spec
                plane = (torch.from_numpy(img).float() / 255 - info.norm_mean) / info.norm_std
                plane = plane.mean(0) if view == "mean" else plane[["DNA", "ER"].index(view)]
                ref = model.forward_features(specs[i][view].render(plane, 32)[None, None])["x_norm_clstoken"]
            torch.testing.assert_close(independent[view]["cls"][i], ref[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- report


def _printed_cells(text: str) -> list[list[str]]:
    """The printed table's lines (from its header to its end), cells split at runs of 2+ spaces."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("sampling  "))
    out = []
    for ln in lines[start + 1:]:
        if not ln.strip():
            continue
        if not ln.startswith(("independent views", "aligned views")):
            break
        out.append(re.split(r"\s{2,}", ln.strip()))
    return out


def test_display_path_shortens_only_absolute_temporary_paths(tmp_path, monkeypatch):
    from dinocell.eval.report import _display_path

    monkeypatch.chdir(tmp_path)  # a run working under /tmp (a CI clone, kfp.local)
    assert _display_path(str(tmp_path / "ckpt.pt")) == "ckpt.pt (a temporary local file)"
    # labels and relative paths are not resolved against the working directory
    assert _display_path("pretrained weights s3://b/tiny/model.safetensors") == \
        "pretrained weights s3://b/tiny/model.safetensors"
    assert _display_path("random init (torch.manual_seed(0))") == "random init (torch.manual_seed(0))"
    assert _display_path("s3://b/runs/ckpt.pt") == "s3://b/runs/ckpt.pt"
    assert _display_path("/srv/models/ckpt.pt") == "/srv/models/ckpt.pt"


def test_report_files_and_printed_table(fields, good_checkpoint, s3_bucket, capsys, tmp_path_factory):
    from dinocell.cli import main as cli_main

    out = f"s3://{s3_bucket}/eval/report"
    cfg_file = tmp_path_factory.mktemp("cfg") / "cfg.yaml"
    cfg_file.write_text(good_checkpoint.cfg.to_yaml())
    assert cli_main(["evaluate", "--config", str(cfg_file), "--checkpoint", good_checkpoint.path, "--manifest",
                     fields.broken, "--out", out, "--baseline", "init", "--channels", "DNA,RNA,Mito,Brightfield"]) == 0
    printed = capsys.readouterr().out

    names = {o.uri[len(out) + 1:] for o in storage.list_objects(out + "/")}
    assert {"report.html", "metrics.json", "scalars.json", "summary.md"} <= names
    pngs = sorted(n for n in names if n.endswith(".png"))
    for sampling in ("independent", "aligned"):
        for key in ("cls", "patch_mean"):
            assert f"figures/matrices_{sampling}_{key}.png" in pngs  # every model side by side
            for model in ("checkpoint", "initial_weights"):
                assert f"figures/pca_{sampling}_{model}_{key}.png" in pngs
    for model in ("checkpoint", "initial_weights"):
        for fig in ("attention", "pca_rgb"):
            assert f"figures/{fig}_{model}_views_field0.png" in pngs and f"figures/{fig}_{model}_mean_view.png" in pngs
    assert not [n for n in pngs if "pixels" in n.split("/")[1].split("_matrices")[0] and "attention" in n]
    for name in pngs:
        assert storage.read_bytes(f"{out}/{name}")[:8] == b"\x89PNG\r\n\x1a\n"

    # one self-contained page: every PNG embedded, nothing fetched from elsewhere
    page = storage.read_text(f"{out}/report.html")
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(embedded) == len(pngs)
    assert all(base64.b64decode(e)[:4] == b"\x89PNG" for e in embedded)
    assert not re.search(r"""(src|href)=['"]?(https?:|//|figures/)""", page)
    assert fields.missing_field in page  # the skipped field is named
    # no temporary paths in the page, except where a skipped field's reason names the file that failed
    assert str(fields.root) not in re.sub(r"<li>[^<]*gone\.tiff[^<]*</li>", "", page)
    for label in ("pixels 8x8", "pixels 16x16", "initial weights", "positions only", "Aligned views (layout-solvable)",
                  "not evidence of learning"):
        assert label in page

    metrics = json.loads(storage.read_bytes(f"{out}/metrics.json"))
    data = metrics["data"]
    assert data["channels"] == ["DNA", "RNA", "Mito", "Brightfield"]
    assert data["views"] == ["mean", "DNA", "RNA", "Mito", "Brightfield"]
    assert data["n_selected"] == N_VAL and data["n_fields"] == N_VAL - 1 and data["n_skipped"] == 1
    assert data["skipped"][0]["field_id"] == fields.missing_field and "gone.tiff" in data["skipped"][0]["reason"]
    assert data["n_plates"] == 4 and data["batches"] == ["B1", "B2"]
    assert metrics["checkpoint"]["iteration"] == 10 and metrics["baseline"]["kind"] == "init"
    assert len(metrics["view_sampling"]["records"]) == N_VAL - 1

    # the printed table is the JSON's table, to 4 decimals, row for row, with the deltas on the checkpoint rows
    models = ("checkpoint", "initial_weights", "pixels_8x8", "pixels_16x16", "positions_only")
    assert [(r["sampling"], r["embedding"], r["views"], r["model_id"]) for r in metrics["table"]] == [
        (s, e, v, m) for s in ("independent", "aligned") for e in ("cls", "patch_mean")
        for v in ("fluorescent", "mean-channel", "brightfield-fluorescent") for m in models
    ]
    printed_rows = _printed_cells(printed)
    assert len(printed_rows) == len(metrics["table"])
    deltas = {(c["sampling"], c["embedding"], c["views"], c["metric"]): c for c in metrics["comparison"]}
    for cells, want in zip(printed_rows, metrics["table"]):
        assert cells[1:4] == [want["embedding"], want["views"], want["model"]]
        numbers = [float(c) for c in cells[4:10]]
        for got, key in zip(numbers, ("same_field", "different_field", "gap", "top1", "mrr", "chance_top1")):
            assert got == pytest.approx(want[key], abs=5.1e-5), (cells, key)
        if want["model_id"] == "checkpoint":  # delta gap, top-1, MRR vs the best pixel baseline
            for got, metric in zip(cells[10:13], ("gap", "top1", "mrr")):
                c = deltas[(want["sampling"], want["embedding"], want["views"], metric)]
                best = max(c["values"]["pixels_8x8"], c["values"]["pixels_16x16"])
                assert float(got) == pytest.approx(want[metric] - best, abs=5.1e-5)
    # the table rows are the summaries of metrics.json, and scalars.json flattens them
    summary = metrics["results"]["independent"]["checkpoint"]["cls"]["summary"]
    assert metrics["table"][0]["same_field"] == summary["same_field"] and metrics["table"][0]["gap"] == summary["gap"]
    assert summary["summary_views"] == ["DNA", "RNA", "Mito"]  # the headline excludes the mean view
    scalars = json.loads(storage.read_bytes(f"{out}/scalars.json"))
    assert all(isinstance(v, float) for v in scalars.values())
    for row in metrics["table"]:
        for key in ("same_field", "different_field", "gap", "top1", "mrr", "chance_top1"):
            assert scalars[f"{row['sampling']}.{row['model_id']}.{row['embedding']}.{row['views']}.{key}"] == row[key]
    assert scalars["delta_vs_init.independent.cls.fluorescent.gap"] == pytest.approx(
        _row_of(metrics, "checkpoint")["gap"] - _row_of(metrics, "initial_weights")["gap"])
    assert scalars["delta_vs_pixels.aligned.cls.fluorescent.top1"] == pytest.approx(
        _row_of(metrics, "checkpoint", sampling="aligned")["top1"]
        - max(_row_of(metrics, m, sampling="aligned")["top1"] for m in ("pixels_8x8", "pixels_16x16")))
    assert scalars["layout_solvable.aligned.cls.fluorescent"] == 1.0  # pixels find these fields by layout
    assert scalars["data.n_skipped"] == 1.0
    md = storage.read_text(f"{out}/summary.md")
    assert f"{metrics['table'][0]['same_field']:.4f}" in md and fields.missing_field in md
    assert "pixels 16x16" in md and "not evidence of learning" in md


def _row_of(metrics, model, embedding="cls", views="fluorescent", sampling="independent"):
    return next(r for r in metrics["table"]
                if (r["sampling"], r["model_id"], r["embedding"], r["views"]) == (sampling, model, embedding, views))


# ----------------------------------------------------------------------------------------------- checkpoints


def test_official_layout_checkpoint(fields, tmp_path):
    """A released-style plain state dict (patch 16, 3 channels): evaluated at patch 16 on grey by folding."""
    torch.manual_seed(1)
    official = vit_tiny(patch_size=16, in_chans=3, layerscale_init=1.0).eval()
    torch.save(official.state_dict(), tmp_path / "dinov3_plain.pth")

    model, info = load_backbone(str(tmp_path / "dinov3_plain.pth"))
    assert (info.kind, info.patch_size, info.in_chans, info.stored_in_chans) == ("plain", 16, 1, 3)
    assert (info.embed_dim, info.depth, info.num_heads, info.n_storage_tokens) == (192, 4, 3, 4)
    # folding is exact: the grey image normalised as dinocell normalises a channel, through the folded model, equals
    # the grey image repeated on 3 channels and normalised with ImageNet's per-channel statistics (DINOv3's)
    from dinocell.model.patch_adapt import IMAGENET_MEAN, IMAGENET_STD

    pixels = torch.rand(2, 1, 64, 64)
    grey = (pixels - info.norm_mean) / info.norm_std
    rgb = (pixels.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(model(grey), official(rgb), atol=2e-5, rtol=1e-5)

    result = evaluate(str(tmp_path / "dinov3_plain.pth"), fields.manifest, _cfg(), str(tmp_path / "out"),
                      baseline="init", max_fields=10, visuals=False)
    ck = result.metrics["checkpoint"]
    assert ck["kind"] == "plain" and ck["patch_size"] == 16 and "folded 3 input channels" in ck["load_summary"]
    assert result.metrics["data"]["size"] == 224  # no config: the DINOv3 global crop size
    assert result.metrics["baseline"]["source"].startswith("random init")
    # a working (if random) feature extractor matches a field's aligned channels (by layout)
    assert _row(result, sampling="aligned")["top1"] > 0.5


def test_init_baseline_is_the_runs_starting_point(tmp_path):
    cfg = _cfg()
    ckpt = _training_checkpoint(cfg, _trained_like(cfg, seed=5))
    model, info = load_backbone(ckpt)
    rng_before = torch.get_rng_state()
    init, init_info = load_init_backbone(info)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched
    torch.manual_seed(cfg.train.seed)  # what the trainer does before building its backbones
    expected = build_vit("vit_tiny", **cfg.model.backbone_kwargs(student=True)).state_dict()
    assert init_info.kind == "init" and f"manual_seed({cfg.train.seed})" in init_info.source
    assert all(torch.equal(init.state_dict()[k], v) for k, v in expected.items())
    assert not torch.equal(model.state_dict()["blocks.0.mlp.fc1.weight"], expected["blocks.0.mlp.fc1.weight"])

    # with model.pretrained set, the baseline is that file, adapted like the trainer does (patch 16 -> 8, 3 -> 1)
    torch.manual_seed(2)
    torch.save(vit_tiny(patch_size=16, in_chans=3).state_dict(), tmp_path / "start.pth")
    cfg_pre = _cfg(pretrained=str(tmp_path / "start.pth"))
    _, info_pre = load_backbone(_training_checkpoint(cfg_pre, _trained_like(cfg_pre)))
    init_pre, init_pre_info = load_init_backbone(info_pre)
    reference = build_vit("vit_tiny", **cfg_pre.model.backbone_kwargs(student=False))
    from dinocell.model.pretrained import load_dinov3_checkpoint

    load_dinov3_checkpoint(reference, str(tmp_path / "start.pth"))
    assert all(torch.equal(init_pre.state_dict()[k], v) for k, v in reference.state_dict().items())
    assert init_pre_info.source == f"pretrained weights {tmp_path / 'start.pth'}"


def test_trainer_layout_and_init(tmp_path):
    """The trainer's own objects: its teacher state dict loads as the teacher backbone, and the "init" baseline
    equals the teacher SSLMetaArch builds right after torch.manual_seed(train.seed), as Trainer does."""
    from dinocell.train.ssl_model import SSLMetaArch

    cfg = config_from_dict({**_cfg().to_dict(), "model": {**_cfg().to_dict()["model"], "n_prototypes": 16,
                                                          "head_hidden_dim": 32, "head_bottleneck_dim": 16}})
    torch.manual_seed(cfg.train.seed)
    meta = SSLMetaArch(cfg.model, cfg.loss, precision="fp32")
    initial = {k: v.clone() for k, v in meta.teacher.backbone.state_dict().items()}
    with torch.no_grad():  # "training": the teacher moves away from its initial weights
        for p in meta.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = {"iteration": 7, "student": meta.student.state_dict(), "teacher": meta.teacher.state_dict(),
            "config": cfg.to_dict()}
    model, info = load_backbone(ckpt)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in meta.teacher.backbone.state_dict().items())
    init, _ = load_init_backbone(info)
    assert all(torch.equal(init.state_dict()[k], v) for k, v in initial.items())


def test_checkpoint_layouts_agree(tmp_path):
    """Flat teacher (ModuleDict state dict), nested teacher, and a run's checkpoint directory give one model."""
    cfg = _cfg()
    backbone = _trained_like(cfg, seed=7)
    flat = _training_checkpoint(cfg, backbone, iteration=20)
    nested = {**flat, "teacher": {"backbone": backbone.state_dict(), "dino_head": {"w": torch.zeros(2)}}}
    manager = CheckpointManager(str(tmp_path / "run" / "checkpoints"))
    manager.save(10, _training_checkpoint(cfg, _trained_like(cfg, seed=8), iteration=10))
    manager.save(20, flat)
    x = torch.randn(2, 1, 32, 32)
    outputs = []
    for source in (flat, nested, str(tmp_path / "run" / "checkpoints"), manager.uri_for(20)):
        model, info = load_backbone(source)
        assert info.iteration == 20 and info.kind == "training" and not model.training
        with torch.no_grad():
            outputs.append(model(x))
    with torch.no_grad():
        assert all(torch.equal(o, backbone(x)) for o in outputs)
    # a checkpoint that no longer matches its integrity record is refused, naming it
    path = manager.uri_for(20)
    data = bytearray(storage.read_bytes(path))
    data[-100] ^= 0xFF
    storage.write_bytes(path, bytes(data))
    with pytest.raises(Exception, match="ckpt-00000020.pt.*corrupt"):
        load_backbone(path)
    with pytest.raises(ValueError, match="no 'student' section"):
        load_backbone(flat, which="student")


def test_demo_data(tmp_path, good_checkpoint):
    """The synthetic JUMP-layout demo bucket, discovered into a manifest, evaluates with brightfield views."""
    from dinocell.channels import ALL_CHANNELS
    from dinocell.jump.discover import discover_fields
    from dinocell.synth.bucket import synth_bucket

    synth_bucket(str(tmp_path / "src"), batches=1, plates_per_batch=2, wells_per_plate=3, sites_per_well=2,
                 size=64, seed=0, workers=2)
    cfg = config_from_dict({**good_checkpoint.cfg.to_dict(),
                            "data": {"images_prefix": str(tmp_path / "src" / "images") + "/",
                                     "channels": list(ALL_CHANNELS), "val_fraction": 0.5}})
    discover_fields(cfg.data).manifest.write(str(tmp_path / "manifest.parquet"))
    result = evaluate(good_checkpoint.path, str(tmp_path / "manifest.parquet"), cfg, str(tmp_path / "out"),
                      baseline="none", visuals=False)
    assert result.metrics["data"]["n_fields"] == 6 and result.metrics["data"]["n_skipped"] == 0
    assert result.metrics["data"]["views"] == ["mean", *ALL_CHANNELS]
    for sampling in ("independent", "aligned"):
        bf = result.metrics["results"][sampling]["checkpoint"]["cls"]["brightfield"]
        assert bf["views"] == ["HighZBF", "LowZBF", "Brightfield"] and -1 <= bf["same_field"] <= 1
        assert bf["against"] == ["DNA", "ER", "RNA", "AGP", "Mito"]  # fluorescent channels, not the mean view
    assert {r["views"] for r in result.metrics["table"]} == {"fluorescent", "mean-channel", "brightfield-fluorescent"}
    assert (tmp_path / "out" / "metrics.json").exists()


def test_bad_inputs_are_named(fields, good_checkpoint, tmp_path):
    cfg = good_checkpoint.cfg
    with pytest.raises(ValueError, match=r"channels \['GFP'\] are not in the manifest"):
        evaluate(good_checkpoint.path, fields.manifest, cfg, str(tmp_path), channels=["DNA", "GFP"], visuals=False)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        evaluate(good_checkpoint.path, fields.manifest, cfg, str(tmp_path), size=60, visuals=False)
    only_train = [r for r in fields.records if r.split == "train"]
    Manifest.from_records(only_train, CHANNELS).write(str(tmp_path / "train_only.parquet"))
    with pytest.raises(ValueError, match="has no 'val' fields"):
        evaluate(good_checkpoint.path, str(tmp_path / "train_only.parquet"), cfg, str(tmp_path), visuals=False)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        evaluate(str(tmp_path / "nope.pt"), fields.manifest, cfg, str(tmp_path), visuals=False)
