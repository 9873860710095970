"""Unit tests of the DeiT student (distill/models/deit.py): shapes, numerics, init, errors, and equality with timm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill.models.deit import (
    PRESETS,
    Attention,
    DeiT,
    DeiTConfig,
    DropPath,
    adapt_state_dict,
    build_deit,
    count_parameters,
    drop_path,
    resample_pos_embed,
)

# Std of N(0, s^2) truncated at +-2s, relative to s: sqrt(1 - 2*2*phi(2) / (2*Phi(2) - 1)).
_PHI2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
TRUNC2_STD_RATIO = math.sqrt(1 - 4 * _PHI2 / math.erf(2 / math.sqrt(2)))


def _small(**overrides) -> DeiT:
    return build_deit("deit_nano", num_classes=5, **overrides)


def _images(model: DeiT, batch: int = 2) -> torch.Tensor:
    cfg = model.config
    return torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)


# --------------------------------------------------------------------------------------------------
# Shapes and token order
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["deit_nano", "deit_micro", "deit_mini"])
@pytest.mark.parametrize("distilled", [True, False])
def test_shapes_and_token_order(preset: str, distilled: bool) -> None:
    torch.manual_seed(0)
    model = build_deit(preset, num_classes=7, distilled=distilled).eval()
    cfg = model.config
    n = (cfg.img_size // cfg.patch_size) ** 2
    prefix = 2 if distilled else 1
    assert model.num_prefix_tokens == prefix
    assert model.pos_embed.shape == (1, n + prefix, cfg.embed_dim)
    assert (model.dist_token is not None) == distilled and (model.head_dist is not None) == distilled

    x = _images(model, batch=3)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, n + prefix, cfg.embed_dim)
    cls_logits, dist_logits = model.forward_heads(x)
    assert cls_logits.shape == (3, 7)
    assert (dist_logits is None) == (not distilled)
    if distilled:
        assert dist_logits.shape == (3, 7)


def test_token_order_cls_then_dist_then_patches() -> None:
    """Hook the first block: its input must be [cls, dist, patches] + pos_embed."""
    torch.manual_seed(0)
    model = _small().eval()
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    x = _images(model)
    with torch.no_grad():
        model(x)
        patches = model.patch_embed(x)
    tokens, pos = seen["x"], model.pos_embed
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + pos[:, :1]).squeeze(1).expand(2, -1))
    torch.testing.assert_close(tokens[:, 1], (model.dist_token + pos[:, 1:2]).squeeze(1).expand(2, -1))
    torch.testing.assert_close(tokens[:, 2:], patches + pos[:, 2:])
    # the heads read token 0 (cls) and token 1 (dist)
    with torch.no_grad():
        feats = model.forward_features(x)
        cls_logits, dist_logits = model.forward_heads(x)
    torch.testing.assert_close(cls_logits, model.head(feats[:, 0]))
    torch.testing.assert_close(dist_logits, model.head_dist(feats[:, 1]))


@pytest.mark.parametrize("batch,tokens,dim,heads", [(2, 18, 48, 2), (3, 5, 96, 3), (1, 7, 64, 4)])
def test_qkv_reshape_permute(batch: int, tokens: int, dim: int, heads: int) -> None:
    torch.manual_seed(0)
    attn = Attention(dim=dim, num_heads=heads)
    x = torch.randn(batch, tokens, dim)
    qkv = attn.project_qkv(x)
    head_dim = dim // heads
    assert qkv.shape == (3, batch, heads, tokens, head_dim)
    # numerics of the permute: q/k/v of head h are columns [which*D + h*hd, which*D + (h+1)*hd) of the Linear
    flat = attn.qkv(x)
    for which in range(3):
        for h in range(heads):
            start = which * dim + h * head_dim
            torch.testing.assert_close(qkv[which, :, h], flat[..., start : start + head_dim])


def test_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=48, num_heads=3).eval()
    x = torch.randn(2, 10, 48)
    q, k, v = attn.project_qkv(x).unbind(0)
    weights = ((q @ k.transpose(-2, -1)) / math.sqrt(16)).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 10, 48))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Train / eval outputs
# --------------------------------------------------------------------------------------------------


def test_train_returns_tuple_eval_returns_average() -> None:
    torch.manual_seed(0)
    model = _small(drop_path_rate=0.0)
    x = _images(model)
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == out[1].shape == (2, 5)

    model.eval()
    with torch.no_grad():
        averaged = model(x)
        cls_logits, dist_logits = model.forward_heads(x)
    assert isinstance(averaged, torch.Tensor)
    torch.testing.assert_close(averaged, (cls_logits + dist_logits) / 2)
    # forward_heads gives both heads in train mode as well; with no randomness they equal the train outputs
    torch.testing.assert_close(out[0].detach(), cls_logits)
    torch.testing.assert_close(out[1].detach(), dist_logits)


@pytest.mark.parametrize("training", [True, False])
def test_non_distilled_returns_tensor(training: bool) -> None:
    torch.manual_seed(0)
    model = _small(distilled=False).train(training)
    out = model(_images(model))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    assert "dist_token" not in dict(model.named_parameters())
    assert model.forward_heads(_images(model))[1] is None


# --------------------------------------------------------------------------------------------------
# DropPath (stochastic depth)
# --------------------------------------------------------------------------------------------------


def test_drop_path_is_identity_in_eval_or_rate_zero() -> None:
    x = torch.randn(8, 5, 4)
    layer = DropPath(p=0.5).eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(DropPath(p=0.0).train()(x), x)
    assert torch.equal(drop_path(x, 0.5, training=False), x)


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_drop_path_drops_whole_samples_and_rescales(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(256, 6, 4) + 0.5  # strictly positive: a zero can only come from the mask
    y = DropPath(p=p).train()(x)
    dropped = (y == 0).flatten(1).all(1)
    kept = ~dropped
    # per sample: every element of a sample is dropped or none is
    assert torch.equal((y == 0).flatten(1).any(1), dropped)
    assert 0 < dropped.sum() < len(x)
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert abs(dropped.float().mean().item() - p) < 0.12


def test_drop_path_differs_from_dropout() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 10, 8) + 0.5
    y = nn.Dropout(0.5).train()(x)
    # element-wise dropout leaves samples partly zeroed; DropPath never does
    partially = (y == 0).flatten(1).any(1) & ~(y == 0).flatten(1).all(1)
    assert partially.any()


def test_drop_path_rates_increase_linearly() -> None:
    model = build_deit("deit_mini", drop_path_rate=0.2)
    rates = [block.drop_path.p for block in model.blocks]
    expected = [0.2 * i / (len(rates) - 1) for i in range(len(rates))]
    assert rates == pytest.approx(expected, abs=1e-7)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)


def test_invalid_drop_path_rate() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropPath(p=1.0)


# --------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------


def test_init_statistics() -> None:
    torch.manual_seed(0)
    model = build_deit("deit_tiny", num_classes=100)  # the real size: enough samples for tight statistics
    expected_std = 0.02 * TRUNC2_STD_RATIO  # ~0.0176: N(0, 0.02^2) truncated at +-0.04
    pos = model.pos_embed.detach()
    assert pos.abs().max() <= 0.04 + 1e-7
    assert pos.std().item() == pytest.approx(expected_std, rel=0.05)
    assert abs(pos.mean().item()) < 0.002
    for token in (model.cls_token, model.dist_token):
        assert token.abs().max() <= 0.04 + 1e-7 and token.std() > 0.01

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 * 12 + 2
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert weights.abs().max() <= 0.04 + 1e-7
    assert weights.std().item() == pytest.approx(expected_std, rel=0.01)
    assert weights.std().item() == pytest.approx(0.02, rel=0.15)
    for m in linears:
        assert torch.count_nonzero(m.bias) == 0
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1
    for m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.count_nonzero(m.bias) == 0
        assert m.eps == 1e-6


def test_no_weight_decay_and_count_parameters() -> None:
    model = _small()
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "dist_token"}
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    model.pos_embed.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - model.pos_embed.numel()


# --------------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------------


def test_image_not_divisible_by_patch() -> None:
    with pytest.raises(ValueError) as err:
        DeiTConfig(img_size=30, patch_size=4)
    assert str(err.value) == (
        "image size 30 is not divisible by patch size 4; choose an image size that is a multiple of the patch size"
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"embed_dim": 100, "num_heads": 3}, "not divisible by num_heads"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"attn_drop_rate": 1.5}, "attn_drop_rate"),
        ({"depth": 0}, "depth must be a positive integer"),
        ({"num_classes": 2.5}, "num_classes must be a positive integer"),
        ({"embed_dim": True}, "embed_dim must be a positive integer"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"distilled": "yes"}, "distilled must be a bool"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeiTConfig(**kwargs)


def test_config_roundtrip_and_unknown_keys() -> None:
    cfg = DeiTConfig(img_size=32, patch_size=4, num_classes=10, distilled=False)
    assert DeiTConfig.from_dict(cfg.to_dict()) == cfg
    assert DeiTConfig.from_dict({"num_classes": 3}) == DeiTConfig(num_classes=3)
    with pytest.raises(ValueError, match="bogus, depht"):
        DeiTConfig.from_dict({**cfg.to_dict(), "depht": 3, "bogus": 1})


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        build_deit("deit_huge")
    for name in PRESETS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="num_clases"):
        build_deit("deit_nano", num_clases=3)


@pytest.mark.parametrize(
    "preset,dim,depth,heads,patch,img",
    [
        ("deit_tiny", 192, 12, 3, 16, 224),
        ("deit_small", 384, 12, 6, 16, 224),
        ("deit_base", 768, 12, 12, 16, 224),
        ("deit_micro", 64, 4, 2, 4, 16),
        ("deit_mini", 96, 6, 3, 4, 32),
        ("deit_nano", 48, 3, 2, 4, 16),
    ],
)
def test_presets(preset: str, dim: int, depth: int, heads: int, patch: int, img: int) -> None:
    cfg = PRESETS[preset]
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.img_size) == (dim, depth, heads, patch, img)


def test_build_overrides() -> None:
    model = build_deit("deit_micro", num_classes=10, in_chans=1, img_size=32, distilled=False)
    assert model.config.num_classes == 10 and model.config.in_chans == 1
    assert model.pos_embed.shape == (1, 64 + 1, 64)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_wrong_input_size_is_a_clear_error() -> None:
    model = _small()
    with pytest.raises(ValueError, match="expected input images of 16x16"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 1, 16, 16))


# --------------------------------------------------------------------------------------------------
# Position-embedding resampling
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [1, 2])
def test_resample_same_grid_is_identity(prefix: int) -> None:
    pos = torch.randn(1, prefix + 16, 8)
    assert torch.equal(resample_pos_embed(pos, (4, 4), prefix), pos)


def test_resample_keeps_prefix_and_interpolates() -> None:
    torch.manual_seed(0)
    pos = torch.randn(1, 2 + 16, 8)
    up = resample_pos_embed(pos, (8, 8), num_prefix_tokens=2)
    assert up.shape == (1, 2 + 64, 8)
    assert torch.equal(up[:, :2], pos[:, :2])
    # a constant grid stays constant under bicubic resizing (checks the (H, W, D) <-> (D, H, W) layout)
    const = torch.cat([pos[:, :2], torch.full((1, 16, 8), 0.3)], dim=1)
    torch.testing.assert_close(resample_pos_embed(const, (8, 8), 2)[:, 2:], torch.full((1, 64, 8), 0.3))
    # a grid varying only along rows keeps varying only along rows (no row/column mix-up)
    rows = torch.arange(4.0).repeat_interleave(4).reshape(1, 16, 1).expand(1, 16, 8)
    out = resample_pos_embed(torch.cat([pos[:, :2], rows], dim=1), (8, 6), 2)[:, 2:].reshape(8, 6, 8)
    torch.testing.assert_close(out, out[:, :1].expand(8, 6, 8))
    assert (out[1:, 0, 0] >= out[:-1, 0, 0] - 1e-6).all()
    down = resample_pos_embed(up, (4, 4), 2)
    assert down.shape == pos.shape and torch.isfinite(down).all()
    with pytest.raises(ValueError, match="square"):
        resample_pos_embed(torch.randn(1, 2 + 15, 8), (4, 4), 2)


@pytest.mark.parametrize("distilled", [True, False])
def test_load_16px_checkpoint_into_32px_model(distilled: bool) -> None:
    torch.manual_seed(0)
    small = build_deit("deit_micro", num_classes=10, distilled=distilled)  # 16 px: 4x4 grid
    big = build_deit("deit_micro", num_classes=10, distilled=distilled, img_size=32)  # 8x8 grid
    state = small.state_dict()
    with pytest.raises(RuntimeError, match="pos_embed"):
        big.load_state_dict(state)
    big.load_state_dict_resampled(state)
    prefix = big.num_prefix_tokens
    assert big.pos_embed.shape == (1, 64 + prefix, 64)
    torch.testing.assert_close(big.pos_embed[:, :prefix], small.pos_embed[:, :prefix])
    torch.testing.assert_close(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    out = big.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # same grid: adapt_state_dict leaves pos_embed untouched
    assert adapt_state_dict(state, small)["pos_embed"] is state["pos_embed"]


def test_adapt_state_dict_rejects_other_width() -> None:
    model = build_deit("deit_micro")
    state = build_deit("deit_nano").state_dict()
    with pytest.raises(ValueError, match="embed_dim"):
        adapt_state_dict(state, model)


# --------------------------------------------------------------------------------------------------
# Equivalence with timm (the reference implementation)
# --------------------------------------------------------------------------------------------------


def _timm_pair(timm_name: str, preset: str, distilled: bool, drop_path_rate: float):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model(timm_name, pretrained=False, drop_path_rate=drop_path_rate)
    ours = build_deit(preset, distilled=distilled, drop_path_rate=drop_path_rate)
    # the exact parameter names: strict loading fails on any missing or extra key
    assert set(ours.state_dict()) == set(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.1])
def test_matches_timm_distilled(drop_path_rate: float) -> None:
    reference, ours = _timm_pair("deit_tiny_distilled_patch16_224", "deit_tiny", True, drop_path_rate)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        reference.eval(), ours.eval()
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=0)
        eval_cls, _ = ours.forward_heads(x)
        # train mode: timm returns (cls, dist) only with distilled training on. With stochastic depth on,
        # seeding both sides identically must give identical masks (same RNG draws, same order).
        reference.train(), ours.train()
        reference.set_distilled_training(True)
        torch.manual_seed(123)
        ref_cls, ref_dist = reference(x)
        torch.manual_seed(123)
        cls_logits, dist_logits = ours(x)
    torch.testing.assert_close(cls_logits, ref_cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(dist_logits, ref_dist, atol=1e-5, rtol=0)
    if drop_path_rate > 0:  # the masks really were drawn (else the seeded comparison proves nothing)
        assert not torch.allclose(cls_logits, eval_cls, atol=1e-3)


def test_matches_timm_plain_vit() -> None:
    reference, ours = _timm_pair("deit_tiny_patch16_224", "deit_tiny", False, 0.0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for training in (False, True):
            reference.train(training), ours.train(training)
            torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=0)


def test_resample_matches_timm_when_downsampling() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    pos = torch.randn(1, 2 + 64, 16)
    ours = resample_pos_embed(pos, (4, 4), num_prefix_tokens=2)
    reference = timm_layers.resample_abs_pos_embed(pos, new_size=(4, 4), old_size=(8, 8), num_prefix_tokens=2)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
