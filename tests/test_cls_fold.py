"""The untied CLS norm and the head-BatchNorm fold (dinocell.model.cls_fold): exact on the CLS, patch tokens untouched,
read by the evaluation's checkpoint reader and kept by a published model."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch

import dinocell
from dinocell import storage
from dinocell.config import load_config, packaged_config
from dinocell.eval.checkpoint_reader import load_backbone
from dinocell.model import vit_tiny
from dinocell.model.cls_fold import fold_head_input_norm, head_input_norm_from_state
from dinocell.publish.publish import publish_checkpoint
from dinocell.train.ssl_model import SSLMetaArch

torch.set_num_threads(1)


def _trained_bn(width: int, seed: int = 0) -> torch.nn.BatchNorm1d:
    """An eval-mode BatchNorm with statistics and affine as training leaves them (nothing at its identity init)."""
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm1d(width)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(width, generator=g))
        bn.running_var.copy_(torch.rand(width, generator=g) * 3 + 0.05)
        bn.weight.copy_(torch.rand(width, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(width, generator=g))
    return bn.eval()


def _backbone(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = vit_tiny(in_chans=1, embed_dim=64, depth=2, num_heads=2, **kw).eval()
    with torch.no_grad():  # a final norm away from its (1, 0) init, so a fold that ignored it would show
        model.norm.weight.uniform_(0.5, 2.0)
        model.norm.bias.normal_()
    return model


@torch.no_grad()
def test_fold_turns_the_cls_into_the_batchnormed_cls_and_leaves_patch_tokens_alone():
    tied = _backbone()
    bn = _trained_bn(64)
    x = torch.randn(4, 1, 32, 32)
    before = tied.forward_features(x)
    folded = fold_head_input_norm(copy.deepcopy(tied), bn)
    after = folded.forward_features(x)
    torch.testing.assert_close(after["x_norm_clstoken"], bn(before["x_norm_clstoken"]), atol=2e-6, rtol=1e-6)
    registers = before["x_storage_tokens"]  # DINOv3's cls_norm covers the registers too
    torch.testing.assert_close(after["x_storage_tokens"], bn(registers.reshape(-1, 64)).reshape(registers.shape),
                               atol=2e-6, rtol=1e-6)
    assert torch.equal(after["x_norm_patchtokens"], before["x_norm_patchtokens"])
    assert torch.equal(folded(x), after["x_norm_clstoken"])  # the plain forward is the folded CLS
    # a second fold composes with the first: the CLS equals both BatchNorms applied in turn
    bn2 = _trained_bn(64, seed=1)
    twice = fold_head_input_norm(copy.deepcopy(folded), bn2)
    torch.testing.assert_close(twice(x), bn2(bn(before["x_norm_clstoken"])), atol=1e-5, rtol=1e-5)


def test_fold_rejects_a_batchnorm_of_another_width():
    with pytest.raises(ValueError, match="width 32 for a backbone of width 64"):
        fold_head_input_norm(_backbone(), torch.nn.BatchNorm1d(32))


@torch.no_grad()
def test_untied_norms_add_only_the_cls_norm_keys_and_equal_the_tied_model_with_a_copied_norm():
    tied = _backbone()
    untied = _backbone(untie_cls_and_patch_norms=True)
    assert set(untied.state_dict()) - set(tied.state_dict()) == {"cls_norm.weight", "cls_norm.bias"}
    assert set(tied.state_dict()) <= set(untied.state_dict())
    state = dict(tied.state_dict(), **{"cls_norm." + k: v for k, v in tied.norm.state_dict().items()})
    untied.load_state_dict(state)
    x = torch.randn(2, 1, 32, 32)
    a, b = tied.forward_features(x), untied.forward_features(x)
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
        assert torch.equal(a[key], b[key]), key


def _head_bn_checkpoint(head_bn: bool = True, *overrides: str) -> tuple[dict, SSLMetaArch]:
    """A training checkpoint (the trainer's layout) of a tiny model whose teacher head BatchNorm has trained stats."""
    cfg = load_config(packaged_config("tiny"),
                      [f"model.head_bn={str(head_bn).lower()}", "model.head_nlayers=0", *overrides])
    torch.manual_seed(0)
    meta = SSLMetaArch(cfg.model, cfg.loss, precision="fp32")
    if head_bn:
        trained = _trained_bn(cfg.model.embed_dim)
        meta.teacher.dino_head.input_norm.load_state_dict(trained.state_dict())
    ckpt = {"teacher": meta.teacher.state_dict(), "student": meta.student.state_dict(), "config": cfg.to_dict(),
            "iteration": 7}
    return ckpt, meta


@torch.no_grad()
def test_checkpoint_reader_folds_the_teachers_head_batchnorm_unless_asked_not_to():
    ckpt, meta = _head_bn_checkpoint()
    x = torch.randn(3, 1, 48, 48)
    teacher = meta.teacher.backbone.eval()
    raw_cls = teacher(x)
    want = meta.teacher.dino_head.input_norm.eval()(raw_cls)

    model, info = load_backbone(ckpt)
    assert info.cls_space == "head input BatchNorm folded" and "BatchNorm folded" in info.load_summary
    torch.testing.assert_close(model(x), want, atol=2e-6, rtol=1e-6)
    assert torch.equal(model.forward_features(x)["x_norm_patchtokens"],
                       teacher.forward_features(x)["x_norm_patchtokens"])
    # and what the teacher's DINO head computes from it: the prototypes score exactly this CLS
    torch.testing.assert_close(meta.teacher.dino_head.forward_prototypes(torch.nn.functional.normalize(model(x))),
                               meta.teacher.dino_head(raw_cls), atol=1e-5, rtol=1e-5)

    raw, raw_info = load_backbone(ckpt, fold_head_norm=False)
    assert raw_info.cls_space == "backbone" and raw.cls_norm is None
    assert torch.equal(raw(x), raw_cls)

    plain, _ = _head_bn_checkpoint(head_bn=False)
    model, info = load_backbone(plain)
    assert info.cls_space == "backbone" and model.cls_norm is None


@torch.no_grad()
def test_an_untied_run_without_head_batchnorm_reads_and_publishes_as_untied(tmp_path):
    # e.g. a run continued from the shipped start with model.head_bn=false: cls_norm exists, nothing is folded
    ckpt, meta = _head_bn_checkpoint(False, "model.untie_cls_and_patch_norms=true")
    with torch.no_grad():
        meta.teacher.backbone.cls_norm.bias.normal_()  # away from norm, so a tied rebuild would show
    ckpt["teacher"] = meta.teacher.state_dict()
    model, info = load_backbone(ckpt)
    assert info.cls_space == "untied cls_norm" and info.untie_cls_and_patch_norms and model.cls_norm is not None
    x = torch.randn(2, 1, 48, 48)
    assert torch.equal(model(x), meta.teacher.backbone.eval()(x))

    uri = str(tmp_path / "run" / "ckpt-00000007.pt")
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    storage.write_bytes(uri, buf.getvalue())
    result = publish_checkpoint(uri, str(tmp_path / "models"), "cellvit", "1")
    config = json.loads((tmp_path / "models" / "cellvit" / "1" / "config.json").read_text())
    assert config["untie_cls_and_patch_norms"] is True and config["cls_space"] == "untied cls_norm"
    assert torch.equal(dinocell.load_pretrained(result.uri)(x), model(x))


def test_head_input_norm_from_state_names_what_is_missing():
    ckpt, _ = _head_bn_checkpoint()
    section = {k: v for k, v in ckpt["teacher"].items() if not k.endswith("running_var")}
    with pytest.raises(ValueError, match=r"lacks \['dino_head.input_norm.running_var'\]"):
        head_input_norm_from_state(section, "ckpt.pt")
    assert head_input_norm_from_state({"backbone.cls_token": torch.zeros(1)}) is None


@torch.no_grad()
def test_a_published_head_bn_model_keeps_the_fold(tmp_path):
    ckpt, meta = _head_bn_checkpoint()
    uri = str(tmp_path / "run" / "ckpt-00000007.pt")
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    storage.write_bytes(uri, buf.getvalue())
    result = publish_checkpoint(uri, str(tmp_path / "models"), "cellvit", "1")
    config = json.loads((tmp_path / "models" / "cellvit" / "1" / "config.json").read_text())
    assert config["untie_cls_and_patch_norms"] is True and config["cls_space"] == "head input BatchNorm folded"

    x = torch.randn(2, 1, 48, 48)
    want, _ = load_backbone(uri)
    published = dinocell.load_pretrained(result.uri)
    assert torch.equal(published(x), want(x))  # bit-exact: the folded weights are what was published
    _, info = load_backbone(result.uri)
    assert info.cls_space == "head input BatchNorm folded"
    # the weights file holds DINOv3's untied-norm keys (official code loads it with untie_cls_and_patch_norms=True)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "models" / "cellvit" / "1" / "model.safetensors")))
    assert {"cls_norm.weight", "cls_norm.bias", "norm.weight", "norm.bias"} <= keys


@torch.no_grad()
def test_an_untied_model_loads_a_tied_checkpoint_exactly_and_a_tied_one_refuses_an_untied_file():
    from dinocell.model.pretrained import load_dinov3_checkpoint

    tied = _backbone()
    untied = _backbone(seed=1, untie_cls_and_patch_norms=True)
    report = load_dinov3_checkpoint(untied, tied.state_dict(), strict=True, checkpoint_norm=None)
    assert not report.missing_keys
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(untied(x), tied(x))  # cls_norm started as a copy of the shared norm

    folded = fold_head_input_norm(copy.deepcopy(tied), _trained_bn(64))
    with pytest.raises(ValueError, match="unexpected cls_norm.weight(.|\n)*model.untie_cls_and_patch_norms: true"):
        load_dinov3_checkpoint(_backbone(), folded.state_dict(), strict=True, checkpoint_norm=None)
    target = _backbone(seed=2, untie_cls_and_patch_norms=True)
    load_dinov3_checkpoint(target, folded.state_dict(), strict=True, checkpoint_norm=None)
    assert torch.equal(target(x), folded(x))


def test_the_config_switch_builds_untied_student_and_teacher():
    cfg = load_config(packaged_config("tiny"), ["model.untie_cls_and_patch_norms=true"])
    meta = SSLMetaArch(cfg.model, cfg.loss, precision="fp32")
    assert meta.student.backbone.cls_norm is not None and meta.teacher.backbone.cls_norm is not None
    assert load_config(packaged_config("tiny")).model.untie_cls_and_patch_norms is False
