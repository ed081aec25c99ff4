"""`dinocell publish` / `dinocell.load_pretrained`: exact round trips (local and S3), immutability, tamper detection,
the official DINOv3 key layout of the published weights."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import pytest
import torch

import dinocell
from dinocell import storage
from dinocell.cli import main as cli_main
from dinocell.config import config_from_dict
from dinocell.eval.checkpoint_reader import load_backbone
from dinocell.model.pretrained import load_dinov3_checkpoint
from dinocell.model.published import PublishedModelError, load_pretrained
from dinocell.model.vit import build_vit, vit_small, vit_tiny
from dinocell.publish.publish import PublishError
from dinocell.publish.publish import publish_checkpoint as publish

torch.set_num_threads(1)


def _cfg(arch="vit_tiny", **model):
    return config_from_dict({
        "data": {"channels": ["DNA", "ER", "RNA", "AGP", "Mito"], "batches": ["2020_11_04_CPJUMP1"]},
        "model": {"arch": arch, "patch_size": 8, "in_chans": 1, "layerscale": 0.1, **model},
        "augment": {"global_size": 224, "local_size": 96, "norm_mean": 0.5, "norm_std": 0.25},
        "train": {"seed": 1},
    })


def _teacher(cfg, seed):
    torch.manual_seed(seed)
    return build_vit(cfg.model.arch, **cfg.model.backbone_kwargs(student=False)).eval()


def _write_checkpoint(uri, cfg, teacher, iteration=100):
    """The trainer's layout: the teacher ModuleDict's state dict (backbone.* + heads), the config, the iteration."""
    state = {f"backbone.{k}": v for k, v in teacher.state_dict().items()}
    state["dino_head.mlp.0.weight"] = torch.randn(16, teacher.embed_dim)
    state["ibot_head.mlp.0.weight"] = torch.randn(16, teacher.embed_dim)
    ckpt = {"teacher": state, "student": dict(state), "config": cfg.to_dict(), "iteration": iteration}
    import io

    buf = io.BytesIO()
    torch.save(ckpt, buf)
    storage.write_bytes(uri, buf.getvalue())
    return uri


@pytest.fixture(params=["local", "s3"])
def dest(request, tmp_path):
    if request.param == "local":
        return SimpleNamespace(ckpt=str(tmp_path / "run" / "ckpt-00000100.pt"), models=str(tmp_path / "models"))
    bucket = request.getfixturevalue("s3_bucket")
    return SimpleNamespace(ckpt=f"s3://{bucket}/run/ckpt-00000100.pt", models=f"s3://{bucket}/models")


def test_round_trip_is_bit_exact(dest):
    cfg = _cfg()
    teacher = _teacher(cfg, seed=3)
    _write_checkpoint(dest.ckpt, cfg, teacher)
    result = publish(dest.ckpt, dest.models, "cellvit", "1.0.0")
    version_uri = storage.join(dest.models, "cellvit", "1.0.0")
    assert result.uri == version_uri and not result.noop

    # the manifest lists every other file with its real sha256 and size
    manifest = json.loads(storage.read_bytes(storage.join(version_uri, "manifest.json")))
    assert sorted(manifest["files"]) == ["README.md", "config.json", "model.safetensors"]
    for name, entry in manifest["files"].items():
        data = storage.read_bytes(storage.join(version_uri, name))
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    latest = json.loads(storage.read_bytes(storage.join(dest.models, "cellvit", "latest")))
    manifest_bytes = storage.read_bytes(storage.join(version_uri, "manifest.json"))
    assert latest == {"version": "1.0.0", "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}

    config = json.loads(storage.read_bytes(storage.join(version_uri, "config.json")))
    assert (config["architecture"], config["patch_size"], config["in_chans"], config["embed_dim"], config["depth"],
            config["num_heads"], config["n_storage_tokens"]) == ("vit_tiny", 8, 1, 192, 4, 3, 4)
    assert config["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert config["normalisation"] == {"mean": 0.5, "std": 0.25, "scale": 255}
    assert config["crop_sizes"] == {"global": 224, "local": 96}
    assert config["provenance"]["iteration"] == 100 and config["provenance"]["checkpoint"] == dest.ckpt

    x = torch.randn(3, 1, 48, 48)
    with torch.no_grad():
        want = teacher.forward_features(x)
        for uri in (version_uri, storage.join(dest.models, "cellvit")):  # the version, or the model via latest
            model = dinocell.load_pretrained(uri)
            assert not model.training and model.published["version"] == "1.0.0"
            got = model.forward_features(x)
            assert torch.equal(got["x_norm_clstoken"], want["x_norm_clstoken"])
            assert torch.equal(got["x_norm_patchtokens"], want["x_norm_patchtokens"])
        # the evaluation's loader takes a published model too, with its published normalisation
        model, info = load_backbone(storage.join(dest.models, "cellvit"))
        assert (info.kind, info.iteration, info.norm_mean, info.norm_std) == ("published", 100, 0.5, 0.25)
        assert torch.equal(model(x), want["x_norm_clstoken"])


def test_published_version_is_immutable(tmp_path):
    cfg = _cfg()
    ckpt = _write_checkpoint(str(tmp_path / "a.pt"), cfg, _teacher(cfg, seed=1))
    other = _write_checkpoint(str(tmp_path / "b.pt"), cfg, _teacher(cfg, seed=2))
    models = str(tmp_path / "models")
    first = publish(ckpt, models, "m", "v1")
    weights = tmp_path / "models" / "m" / "v1" / "model.safetensors"
    before = weights.stat().st_mtime_ns

    again = publish(ckpt, models, "m", "v1")  # identical content: a successful no-op
    assert again.noop and again.files == first.files and weights.stat().st_mtime_ns == before

    with pytest.raises(PublishError, match=r"already published with different content.*model\.safetensors"):
        publish(other, models, "m", "v1")
    assert weights.stat().st_mtime_ns == before  # nothing was touched

    publish(other, models, "m", "v2")
    assert json.loads((tmp_path / "models" / "m" / "latest").read_text())["version"] == "v2"
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_pretrained(str(tmp_path / "models" / "m"))(x), _teacher(cfg, seed=2)(x))
        assert torch.equal(load_pretrained(str(tmp_path / "models" / "m" / "v1"))(x), _teacher(cfg, seed=1)(x))


def test_interrupted_publish_is_replaced(tmp_path):
    """Files without a manifest are not a published version: the next publish of that version completes it."""
    cfg = _cfg()
    ckpt = _write_checkpoint(str(tmp_path / "a.pt"), cfg, _teacher(cfg, seed=1))
    partial = tmp_path / "models" / "m" / "v1"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half a file")
    publish(ckpt, str(tmp_path / "models"), "m", "v1")
    load_pretrained(str(tmp_path / "models" / "m" / "v1"))


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json", "README.md"])
def test_tampered_file_is_named(tmp_path, victim):
    cfg = _cfg()
    ckpt = _write_checkpoint(str(tmp_path / "a.pt"), cfg, _teacher(cfg, seed=1))
    publish(ckpt, str(tmp_path / "models"), "m", "v1")
    path = tmp_path / "models" / "m" / "v1" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(PublishedModelError, match=rf"{victim}: sha256 .* altered"):
        load_pretrained(str(tmp_path / "models" / "m" / "v1"))
    path.unlink()
    with pytest.raises(PublishedModelError, match=rf"{victim} listed in .*manifest.json"):
        load_pretrained(str(tmp_path / "models" / "m"))


def test_tampered_manifest_is_caught_through_latest(tmp_path):
    cfg = _cfg()
    ckpt = _write_checkpoint(str(tmp_path / "a.pt"), cfg, _teacher(cfg, seed=1))
    publish(ckpt, str(tmp_path / "models"), "m", "v1")
    manifest = tmp_path / "models" / "m" / "v1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"name": "m"', '"name": "x"'))
    with pytest.raises(PublishedModelError, match="manifest.json.*latest pointer"):
        load_pretrained(str(tmp_path / "models" / "m"))
    with pytest.raises(PublishedModelError, match="no published model"):
        load_pretrained(str(tmp_path / "models" / "nothing"))


def test_safetensors_has_the_official_layout(tmp_path):
    """ViT-S patch 8 / 1 channel: the 188 official keys, shapes as official except the patch kernel."""
    from safetensors.torch import load_file

    cfg = _cfg(arch="vit_small")
    teacher = _teacher(cfg, seed=4)
    ckpt = _write_checkpoint(str(tmp_path / "s.pt"), cfg, teacher)
    publish(ckpt, str(tmp_path / "models"), "vits8", "v1")
    weights = str(tmp_path / "models" / "vits8" / "v1" / "model.safetensors")
    published = load_file(weights)
    official = vit_small(patch_size=16, in_chans=3).state_dict()
    assert set(published) == set(official) and len(published) == 188
    differing = {k for k in official if published[k].shape != official[k].shape}
    assert differing == {"patch_embed.proj.weight"}
    assert published["patch_embed.proj.weight"].shape == (384, 1, 8, 8)
    # the project's checkpoint loader reads the published file directly, with the same weights
    model = vit_small(patch_size=8, in_chans=1).eval()
    report = load_dinov3_checkpoint(model, weights)
    assert report.adapted == [] and report.source_format == "plain"
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), teacher(x))


def test_official_plain_checkpoint_and_metrics_and_cli(tmp_path, capsys):
    """A released-style state dict publishes as is (patch 16, 3 channels); metrics are copied verbatim and tabled."""
    torch.manual_seed(0)
    official = vit_tiny(patch_size=16, in_chans=3).eval()
    torch.save(official.state_dict(), tmp_path / "dinov3.pth")
    metrics = {"table": [{"model": "checkpoint", "embedding": "cls", "views": "fluorescent", "same_field": 0.91234,
                          "different_field": 0.2, "gap": 0.71234, "top1": 0.5, "mrr": 0.6, "chance_top1": 0.01}],
               "data": {"n_fields": 100, "split": "val", "n_plates": 3, "channels": ["DNA"], "size": 224}}
    metrics_bytes = json.dumps(metrics).encode()
    (tmp_path / "metrics.json").write_bytes(metrics_bytes)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(_cfg().to_yaml())
    assert cli_main(["publish", "--config", str(cfg_file), "--checkpoint", str(tmp_path / "dinov3.pth"),
                     "--dest", str(tmp_path / "models"), "--name", "plain", "--version", "v1",
                     "--metrics", str(tmp_path / "metrics.json")]) == 0
    assert "published plain v1" in capsys.readouterr().out
    version = tmp_path / "models" / "plain" / "v1"
    assert (version / "metrics.json").read_bytes() == metrics_bytes
    config = json.loads((version / "config.json").read_text())
    assert (config["patch_size"], config["in_chans"], config["architecture"]) == (16, 3, "inferred")
    assert config["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]  # from the CLI config: the file has none
    card = (version / "README.md").read_text()
    assert "| checkpoint | cls | fluorescent | 0.9123 | 0.2000 | 0.7123 | 0.5000 | 0.6000 | 0.0100 |" in card
    for must in ("CC0", "DINOv3 License", "must check", "patch 16 / 3", "Limitations"):
        assert must in card
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_pretrained(str(version))(x), official(x))


def test_bad_names_are_refused(tmp_path):
    for name, version in (("a/b", "v1"), ("m", "latest"), ("m", "../v1"), ("", "v1")):
        with pytest.raises(PublishError, match="must be letters, digits"):
            publish(str(tmp_path / "x.pt"), str(tmp_path), name, version)


def _trainer_state(cfg, teacher, iteration):
    state = {f"backbone.{k}": v for k, v in teacher.state_dict().items()}
    return {"teacher": state, "student": dict(state), "config": cfg.to_dict(), "iteration": iteration}


def test_a_run_directory_publishes_the_checkpoint_it_names_and_says_which_newer_ones_were_unusable(tmp_path):
    """The newest checkpoint of the run is corrupt: the older one is published, and the release says so exactly
    (it used to name the corrupt newest one as its source while publishing the older)."""
    from dinocell.train.checkpoint import CheckpointManager

    cfg = _cfg()
    run = tmp_path / "run" / "checkpoints"
    mgr = CheckpointManager(run, keep_last=0)
    older, newest = _teacher(cfg, 1), _teacher(cfg, 2)
    mgr.save(100, _trainer_state(cfg, older, 100))
    mgr.save(200, _trainer_state(cfg, newest, 200))
    raw = bytearray((run / "ckpt-00000200.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the sha256 tells
    (run / "ckpt-00000200.pt").write_bytes(bytes(raw))

    result = publish(str(run), str(tmp_path / "models"), "cellvit", "1.0")
    exact = str(run / "ckpt-00000100.pt")
    assert result.source == exact
    assert [p["checkpoint"] for p in result.passed_over] == [str(run / "ckpt-00000200.pt")]
    assert "sha256" in result.passed_over[0]["reason"]
    version = tmp_path / "models" / "cellvit" / "1.0"
    prov = json.loads((version / "config.json").read_text())["provenance"]
    assert (prov["checkpoint"], prov["iteration"]) == (exact, 100) and prov["passed_over"] == result.passed_over
    card = (version / "README.md").read_text()
    assert f"`{exact}` (teacher, iteration 100)" in card
    assert "newer checkpoints not used" in card and "ckpt-00000200.pt" in card
    assert "passed over newer" in result.summary() and "ckpt-00000200.pt" in result.summary()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():  # and the weights are the older checkpoint's
        assert torch.equal(load_pretrained(str(version))(x), older(x))
    # an intact run publishes its newest, and says nothing was passed over
    mgr.save(300, _trainer_state(cfg, newest, 300))
    clean = publish(str(run), str(tmp_path / "models"), "cellvit", "2.0")
    assert clean.source == str(run / "ckpt-00000300.pt") and clean.passed_over == []
