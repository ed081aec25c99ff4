"""The DINOv3 ViT backbone: official layout, token handling, RoPE, masks, drop path, attention maps, heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinocell.config import ConfigError, load_config, packaged_config
from dinocell.model import (
    DINOHead,
    RopePositionEmbedding,
    build_vit,
    rope_apply,
    rope_rotate_half,
    vit_small,
    vit_tiny,
)
from dinocell.train.optim import no_weight_decay
from dinocell.train.ssl_model import build_head

torch.set_num_threads(2)


def _official_vits16_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of dinov3_vits16_pretrain_lvd1689m-08c60483.pth as listed in REFERENCE.md section 2."""
    d, hidden = 384, 1536
    shapes = {
        "cls_token": (1, 1, d),
        "storage_tokens": (1, 4, d),
        "mask_token": (1, d),
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
        "rope_embed.periods": (16,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(12):
        p = f"blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (d,),
                p + "norm1.bias": (d,),
                p + "attn.qkv.weight": (3 * d, d),
                p + "attn.qkv.bias": (3 * d,),
                p + "attn.qkv.bias_mask": (3 * d,),
                p + "attn.proj.weight": (d, d),
                p + "attn.proj.bias": (d,),
                p + "ls1.gamma": (d,),
                p + "norm2.weight": (d,),
                p + "norm2.bias": (d,),
                p + "mlp.fc1.weight": (hidden, d),
                p + "mlp.fc1.bias": (hidden,),
                p + "mlp.fc2.weight": (d, hidden),
                p + "mlp.fc2.bias": (d,),
                p + "ls2.gamma": (d,),
            }
        )
    return shapes


def _tiny(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    model = vit_tiny(**kw)
    with torch.no_grad():  # make every block matter (LayerScale init 1e-5 would make them near-identities)
        for block in model.blocks:
            block.ls1.gamma.uniform_(0.2, 0.5)
            block.ls2.gamma.uniform_(0.2, 0.5)
            block.attn.qkv.bias.normal_(std=0.5)
        model.mask_token.normal_()
    return model


# ----------------------------------------------------------------------------------------------- layout
def test_vits16_state_dict_is_the_official_layout():
    model = vit_small(patch_size=16, in_chans=3)
    state = model.state_dict()
    expected = _official_vits16_shapes()
    assert len(state) == 188 == len(expected)
    assert list(state) == list(state.keys()) and set(state) == set(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(p.numel() for p in model.parameters()) == 21_601_152
    buffers = {name for name, _ in model.named_buffers()}
    assert buffers == {"rope_embed.periods"} | {f"blocks.{i}.attn.qkv.bias_mask" for i in range(12)}
    # bias_mask: 1 for q and v rows, 0 for k rows
    mask = state["blocks.3.attn.qkv.bias_mask"]
    assert torch.equal(mask, torch.cat([torch.ones(384), torch.zeros(384), torch.ones(384)]))
    # periods 100^(i/16), LayerScale 1e-5, LayerNorm eps 1e-5, exact GELU
    assert torch.allclose(state["rope_embed.periods"], 100.0 ** (torch.arange(16) / 16.0), rtol=1e-6)
    assert torch.all(state["blocks.0.ls1.gamma"] == 1e-5)
    assert model.norm.eps == 1e-5 and model.blocks[0].norm1.eps == 1e-5
    assert model.blocks[0].mlp.act.approximate == "none"
    assert (model.embed_dim, model.patch_size, model.n_storage_tokens) == (384, 16, 4)


def test_token_counts_match_the_reference():
    model16, model8 = vit_small(patch_size=16), vit_small(patch_size=8)
    image = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        assert model16.prepare_tokens(image)[0].shape == (1, 201, 384)
        assert model8.prepare_tokens(image)[0].shape == (1, 789, 384)


def test_forward_features_keys_and_shapes():
    model = _tiny(patch_size=8).eval()
    x = torch.randn(2, 3, 64, 48)
    masks = torch.zeros(2, 48, dtype=torch.bool)
    out = model.forward_features(x, masks)
    assert set(out) == {"x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["x_norm_clstoken"].shape == (2, 192)
    assert out["x_storage_tokens"].shape == (2, 4, 192)
    assert out["x_norm_patchtokens"].shape == (2, 48, 192)
    assert out["x_prenorm"].shape == (2, 1 + 4 + 48, 192)
    assert out["masks"] is masks
    # one final norm over all tokens, in the token order [cls, registers, patches]
    normed = model.norm(out["x_prenorm"])
    assert torch.equal(normed[:, 0], out["x_norm_clstoken"])
    assert torch.equal(normed[:, 1:5], out["x_storage_tokens"])
    assert torch.equal(normed[:, 5:], out["x_norm_patchtokens"])
    assert torch.equal(model(x), out["x_norm_clstoken"])


def test_bad_inputs_name_the_problem():
    model = _tiny(patch_size=8)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(2, 1, 64, 64\)"):
        model.forward_features(torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match="60x64 is not a multiple of the patch size 8"):
        model.forward_features(torch.zeros(2, 3, 60, 64))
    with pytest.raises(ValueError, match=r"masks must be bool \[B, HW\] = \[2, 64\]"):
        model.forward_features(torch.zeros(2, 3, 64, 64), torch.zeros(2, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown ViT architecture 'vit_huge'"):
        build_vit("vit_huge")


def test_build_vit_maps_names_and_overrides():
    model = build_vit("vit_tiny", patch_size=16, in_chans=1, drop_path_rate=0.1, n_storage_tokens=2)
    assert (model.embed_dim, model.patch_size, model.in_chans, model.n_storage_tokens) == (192, 16, 1, 2)
    assert len(model.blocks) == 4 and model.blocks[0].drop_path == 0.1
    assert model.patch_embed.proj.weight.shape == (192, 1, 16, 16)


# ----------------------------------------------------------------------------------------------- attention details
def test_k_bias_is_masked_and_has_no_effect():
    model = _tiny(patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.forward_features(x)["x_prenorm"]
        for block in model.blocks:
            block.attn.qkv.bias[192:384] += 10.0 * torch.randn(192)  # k rows
        after_k = model.forward_features(x)["x_prenorm"]
        for block in model.blocks:
            block.attn.qkv.bias[:192] += 0.5  # q rows: these do matter
        after_q = model.forward_features(x)["x_prenorm"]
    assert torch.equal(before, after_k)
    assert not torch.allclose(before, after_q, atol=1e-3)


def test_masks_substitute_mask_token():
    model = _tiny(patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain, _ = model.prepare_tokens(x)
        full, _ = model.prepare_tokens(x, torch.ones(2, 16, dtype=torch.bool))
        masks = torch.zeros(2, 16, dtype=torch.bool)
        masks[0, [1, 5, 6]] = True
        partial, _ = model.prepare_tokens(x, masks)
    assert torch.equal(full[:, 5:], model.mask_token.expand(2, 16, -1))
    assert torch.equal(full[:, :5], plain[:, :5])
    patch_part = partial[:, 5:]
    assert torch.equal(patch_part[masks], model.mask_token.expand(3, -1))
    assert torch.equal(patch_part[~masks], plain[:, 5:][~masks])


def test_eval_mode_is_deterministic_and_ignores_drop_path_and_rescaling():
    model = _tiny(patch_size=8, drop_path_rate=0.5, rope_rescale=2.0).eval()
    reference = _tiny(patch_size=8, drop_path_rate=0.0, rope_rescale=None).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b, c = model(x), model(x), reference(x)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_drop_path_and_rescaling_act_in_training_mode():
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain = _tiny(patch_size=8, drop_path_rate=0.0, rope_rescale=None).train()
        assert torch.equal(plain(x), plain(x))  # no randomness configured: train mode is deterministic too
        dropping = _tiny(patch_size=8, drop_path_rate=0.5, rope_rescale=None).train()
        torch.manual_seed(1)
        d1 = dropping(x)
        d2 = dropping(x)
        assert not torch.allclose(d1, d2, atol=1e-4)
        rescaled = _tiny(patch_size=8, drop_path_rate=0.0, rope_rescale=2.0).train()
        assert not torch.allclose(rescaled(x), rescaled(x), atol=1e-4)


def test_batch_drop_keeps_the_expectation():
    # residual on a subset of max(int(B*(1-p)),1) samples, scaled by B/subset: the batch mean of the update is exact
    from dinocell.model.layers import add_residual_with_batch_drop

    x = torch.zeros(8, 3, 2)
    torch.manual_seed(0)
    out = add_residual_with_batch_drop([x], lambda xs: [torch.ones_like(t) for t in xs], 0.25, training=True)[0]
    counts = (out[:, 0, 0] != 0).sum().item()
    assert counts == 6
    assert torch.allclose(out.sum(0), torch.full((3, 2), 8.0))  # 6 samples x 8/6 each


def test_forward_features_list_matches_separate_calls():
    model = _tiny(patch_size=8).eval()
    big, small = torch.randn(2, 3, 48, 48), torch.randn(3, 3, 24, 24)
    masks = torch.rand(2, 36) < 0.4
    with torch.no_grad():
        together = model.forward_features_list([big, small], [masks, None])
        alone = [model.forward_features(big, masks), model.forward_features(small)]
    for t, a in zip(together, alone):
        for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(t[key], a[key], rtol=1e-5, atol=1e-5)
    assert together[0]["masks"] is masks and together[1]["masks"] is None


def test_activation_checkpointing_gives_the_same_output_and_gradients():
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for flag in (False, True):
        model = _tiny(patch_size=8, rope_rescale=None).train()
        model.activation_checkpointing = flag
        out = model.forward_features(x)
        (out["x_norm_clstoken"].square().sum() + out["x_norm_patchtokens"].mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "mask_token" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_last_self_attention_is_the_explicit_softmax_of_the_last_block():
    model = _tiny(patch_size=8).eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        maps = model.get_last_self_attention(x)
        assert maps.shape == (2, 3, 20)
        # recompute the last block's input and check that the explicit probabilities reproduce SDPA's output
        tokens, grid = model.prepare_tokens(x)
        rope = model._rope(grid)
        for block in model.blocks[:-1]:
            tokens = block(tokens, rope)
        last = model.blocks[-1]
        h = last.norm1(tokens)
        probs = last.attn.attention_probs(h, rope)
        _, _, v = last.attn.heads(last.attn.qkv(h), rope)
        explicit = (probs @ v).transpose(1, 2).reshape(2, tokens.shape[1], -1)
        torch.testing.assert_close(last.attn.proj(explicit), last.attn(h, rope), rtol=1e-5, atol=1e-6)
    assert torch.equal(maps, probs[:, :, 0, 5:])
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, tokens.shape[1]))
    assert torch.all(maps.sum(-1) < 1.0)  # the rest goes to the cls and register tokens


# ----------------------------------------------------------------------------------------------- RoPE
def test_rotate_half_hand_case():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(rope_rotate_half(x), torch.tensor([-3.0, -4.0, 1.0, 2.0]))


def test_rope_apply_rotates_channel_pairs_across_the_halves():
    # pairs (0, 2) and (1, 3) rotate by theta0 and theta1: (a, b) -> (a cos - b sin, a sin + b cos)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    t0, t1 = 0.3, -1.1
    angles = torch.tensor([t0, t1, t0, t1])
    out = rope_apply(x, torch.sin(angles), torch.cos(angles))
    expected = torch.tensor(
        [
            1 * math.cos(t0) - 3 * math.sin(t0),
            2 * math.cos(t1) - 4 * math.sin(t1),
            1 * math.sin(t0) + 3 * math.cos(t0),
            2 * math.sin(t1) + 4 * math.cos(t1),
        ]
    )
    torch.testing.assert_close(out, expected)


def test_rope_matches_a_direct_implementation():
    rope = RopePositionEmbedding(head_dim=64).eval()
    height, width = 2, 3
    sin, cos = rope(height, width)
    assert sin.shape == cos.shape == (6, 64)
    for row in range(height):
        for col in range(width):
            token = row * width + col
            y = 2 * (row + 0.5) / height - 1
            x = 2 * (col + 0.5) / width - 1
            for i in range(16):
                period = 100 ** (i / 16)
                for channel, coord in ((i, y), (16 + i, x), (32 + i, y), (48 + i, x)):
                    angle = 2 * math.pi * coord / period
                    assert sin[token, channel].item() == pytest.approx(math.sin(angle), abs=1e-5)
                    assert cos[token, channel].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rope = RopePositionEmbedding(head_dim=64).eval()
    side = 6
    sin, cos = rope(side, side)
    torch.manual_seed(0)
    q, k = torch.randn(64), torch.randn(64)
    n = side * side
    scores = rope_apply(q.expand(n, -1), sin, cos) @ rope_apply(k.expand(n, -1), sin, cos).T
    idx = torch.arange(n).reshape(side, side)
    # pairs (r, c) -> (r + 1, c + 2); then both ends translated by (+1, +1): same offset, same score
    base = scores[idx[0:4, 0:3].flatten(), idx[1:5, 2:5].flatten()]
    moved = scores[idx[1:5, 1:4].flatten(), idx[2:6, 3:6].flatten()]
    torch.testing.assert_close(base, moved, rtol=1e-4, atol=1e-3)
    # ...while a different offset gives different scores (RoPE is not a no-op)
    other = scores[idx[0:4, 0:3].flatten(), idx[2:6, 2:5].flatten()]
    assert (other - base).abs().max() > 0.5


def test_rope_rescaling_only_in_training_and_log_uniform():
    from dinocell.model.rope import patch_center_coords

    rope = RopePositionEmbedding(head_dim=64, rescale_coords=2.0)
    rope.eval()
    assert rope.sample_scale() is None
    s_eval, c_eval = rope(4, 4)
    s_ref, c_ref = rope.sincos(4, 4, None)
    assert torch.equal(s_eval, s_ref) and torch.equal(c_eval, c_ref)
    rope.train()
    torch.manual_seed(0)
    scales = torch.cat([rope.sample_scale() for _ in range(2000)])
    assert scales.min() >= 0.5 and scales.max() <= 2.0
    logs = scales.log() / math.log(2.0)  # log-uniform on [1/2, 2] <=> uniform on [-1, 1]
    assert abs(logs.mean().item()) < 0.05 and abs((logs.abs() < 0.5).float().mean().item() - 0.5) < 0.05
    s1, _ = rope(4, 4)
    s2, _ = rope(4, 4)
    assert not torch.equal(s1, s2)
    # a scale multiplies both coordinates by the same factor
    coords = patch_center_coords(4, 4) * 0.5
    sin_half, _ = rope.sincos(4, 4, 0.5)
    torch.testing.assert_close(sin_half[:, :16], torch.sin(2 * math.pi * coords[:, :1] / rope.periods))
    torch.testing.assert_close(sin_half[:, 16:32], torch.sin(2 * math.pi * coords[:, 1:] / rope.periods))


# ----------------------------------------------------------------------------------------------- heads
def test_dino_head_structure_and_stages():
    torch.manual_seed(0)
    head = DINOHead(in_dim=64, hidden_dim=128, bottleneck_dim=32, n_prototypes=500, nlayers=3)
    state = head.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "mlp.0.weight": (128, 64),
        "mlp.0.bias": (128,),
        "mlp.2.weight": (128, 128),
        "mlp.2.bias": (128,),
        "mlp.4.weight": (32, 128),
        "mlp.4.bias": (32,),
        "last_layer.weight": (500, 32),
    }
    assert isinstance(head.mlp[1], torch.nn.GELU) and isinstance(head.mlp[3], torch.nn.GELU)
    for name, value in state.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(value) == 0
        else:
            # trunc_normal_(std=0.02) with torch's default bounds [-2, 2], the call DINOv3 makes
            assert value.abs().max() <= 2.0 and 0.018 < value.std() < 0.022
    x = torch.randn(5, 7, 64)
    z = head.forward_bottleneck(x)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5, 7))
    logits = head(x)
    assert logits.shape == (5, 7, 500)
    assert torch.equal(logits, head.forward_prototypes(z))
    torch.testing.assert_close(logits, z @ head.last_layer.weight.T)


def test_dino_head_default_sizes():
    head = DINOHead(384)
    assert head.last_layer.weight.shape == (65536, 256) and head.last_layer.bias is None
    assert [m.weight.shape for m in head.mlp if isinstance(m, torch.nn.Linear)] == [
        (2048, 384),
        (2048, 2048),
        (256, 2048),
    ]
    with pytest.raises(ValueError, match="nlayers >= 0"):
        DINOHead(8, nlayers=-1)


def test_dino_head_without_mlp_scores_the_unit_norm_input():
    torch.manual_seed(0)
    head = DINOHead(in_dim=64, hidden_dim=128, bottleneck_dim=32, n_prototypes=50, nlayers=0)
    assert list(head.state_dict()) == ["last_layer.weight"] and head.bottleneck_dim == 64  # hidden, bottleneck unused
    x = torch.randn(5, 7, 64)
    torch.testing.assert_close(head.forward_bottleneck(x), torch.nn.functional.normalize(x, dim=-1))
    torch.testing.assert_close(head(x), torch.nn.functional.normalize(x, dim=-1) @ head.last_layer.weight.T)


def test_head_nlayers_zero_is_a_valid_config_and_negative_is_refused_by_name():
    cfg = load_config(packaged_config("tiny"), ["model.head_nlayers=0"])
    head = build_head(cfg.model, cfg.model.embed_dim)
    assert head.last_layer.weight.shape == (cfg.model.n_prototypes, cfg.model.embed_dim)
    with pytest.raises(ConfigError, match=r"model\.head_nlayers must be >= 0 \(0 = no MLP\), got -1"):
        load_config(packaged_config("tiny"), ["model.head_nlayers=-1"])


def test_dino_head_input_bn_standardises_every_token_before_the_prototypes():
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, n_prototypes=10, nlayers=0, input_bn=True)
    assert list(head.state_dict()) == ["input_norm.weight", "input_norm.bias", "input_norm.running_mean",
                                       "input_norm.running_var", "input_norm.num_batches_tracked", "last_layer.weight"]
    # far from standard: per-dimension offsets and scales as a LayerNorm affine makes them
    x = torch.randn(3, 5, 16) * torch.linspace(0.1, 4.0, 16) + torch.linspace(-2.0, 2.0, 16)
    head.train()
    z = head.forward_bottleneck(x)  # batch statistics over all 15 tokens (both leading dims)
    flat = x.reshape(-1, 16)
    by_hand = (flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + head.input_norm.eps)
    torch.testing.assert_close(z, F.normalize(by_hand, dim=-1).reshape(3, 5, 16), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.input_norm.running_mean, 0.1 * flat.mean(0))  # momentum 0.1 from zeros
    head.eval()  # eval mode: the running statistics, not the batch's
    rm, rv = head.input_norm.running_mean, head.input_norm.running_var
    torch.testing.assert_close(head(x[0]), F.normalize((x[0] - rm) / torch.sqrt(rv + 1e-5), dim=-1)
                               @ head.last_layer.weight.T, rtol=1e-5, atol=1e-6)
    # off by default: no BatchNorm keys, so the official heads' state dicts still load strictly
    assert not any(k.startswith("input_norm") for k in DINOHead(16, n_prototypes=10, nlayers=0).state_dict())


def test_head_bn_config_builds_the_norm_and_exempts_its_weight_from_weight_decay():
    cfg = load_config(packaged_config("tiny"), ["model.head_bn=true", "model.head_nlayers=0"])
    assert isinstance(build_head(cfg.model, cfg.model.embed_dim).input_norm, torch.nn.BatchNorm1d)
    assert load_config(packaged_config("tiny")).model.head_bn is False
    assert no_weight_decay("dino_head.input_norm.weight") and no_weight_decay("ibot_head.input_norm.bias")
    assert not no_weight_decay("dino_head.last_layer.weight") and not no_weight_decay("dino_head.mlp.0.weight")
