"""Unit tests of the DeiT student (distill/models/deit.py): shapes, numerics, init, errors, and equality with timm."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.checkpoint import save_model
from distill.models.deit import Attention, DeiT, DropPath, build_deit, count_parameters, drop_path
from distill.models.deit_config import PRESETS, DeiTConfig
from distill.models.deit_pretrained import (
    adapt_input_channels,
    adapt_state_dict,
    load_pretrained_deit,
    resample_patch_embed,
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
    report = load_pretrained_deit(big, state)
    assert list(report["resampled"]) == ["pos_embed"]
    prefix = big.num_prefix_tokens
    assert big.pos_embed.shape == (1, 64 + prefix, 64)
    torch.testing.assert_close(big.pos_embed[:, :prefix], small.pos_embed[:, :prefix])
    torch.testing.assert_close(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    out = big.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # same grid: adapt_state_dict leaves pos_embed untouched
    assert adapt_state_dict(state, small)[0]["pos_embed"] is state["pos_embed"]


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


# --------------------------------------------------------------------------------------------------
# Starting from pretrained weights (timm / facebookresearch/deit checkpoints on disk)
# --------------------------------------------------------------------------------------------------

SMALL = {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}


def _timm_small(name: str = "deit_tiny_distilled_patch16_224", num_classes: int = 10, **overrides):
    """A small timm DeiT/ViT whose weights are all moved off their init (timm draws cls_token with std 1e-6)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=0.0,
                              **{**SMALL, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _ours(**overrides) -> DeiT:
    return build_deit("deit_micro", **{**SMALL, "num_classes": 10, "drop_path_rate": 0.0, **overrides})


def _save(state: dict, path, fmt: str):
    """Write weights as timm (safetensors), facebookresearch/deit ({"model": ...}) or a DDP training run would."""
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "deit_pth":
        torch.save({"model": state}, path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 9}, path)
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "deit_pth", "ddp"])
def test_timm_distilled_checkpoint_gives_equal_outputs(tmp_path, fmt: str) -> None:
    reference = _timm_small()
    path = _save(reference.state_dict(), tmp_path / f"deit.{fmt}", fmt)
    ours = _ours()
    report = load_pretrained_deit(ours, path)
    assert report["source"] == str(path) and report["prefixes_removed"] == (["module."] if fmt == "ddp" else [])
    assert not any(report[k] for k in ("resampled", "converted", "copied", "dropped", "reinitialised"))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference(x), atol=1e-5, rtol=0)  # average of both heads
        reference.train().set_distilled_training(True)
        for mine, theirs in zip(ours.train()(x), reference(x)):  # train: (cls, dist)
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_checkpoint_into_other_image_size_resamples_pos_embed(tmp_path) -> None:
    reference = _timm_small()
    path = _save(reference.state_dict(), tmp_path / "deit.safetensors", "safetensors")
    ours = _ours(img_size=32)  # 8x8 grid instead of 4x4
    report = load_pretrained_deit(ours, path)
    assert report["resampled"] == {"pos_embed": "[1, 18, 64] -> [1, 66, 64]"}
    assert ours.pos_embed.shape == (1, 2 + 64, 64)
    assert torch.equal(ours.pos_embed[:, :2], reference.pos_embed[:, :2])  # cls and dist slots kept exactly
    torch.testing.assert_close(ours.pos_embed, resample_pos_embed(reference.pos_embed.detach(), (8, 8), 2))
    for name, value in reference.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(ours.state_dict()[name], value), name
    assert torch.isfinite(ours.eval()(torch.randn(2, 3, 32, 32))).all()


def test_checkpoint_into_other_class_count_gets_new_heads(tmp_path) -> None:
    reference = _timm_small(num_classes=1000)
    path = _save(reference.state_dict(), tmp_path / "deit.pth", "deit_pth")
    ours = _ours(num_classes=5)
    fresh = {k: v.clone() for k, v in ours.state_dict().items() if k.startswith("head")}
    report = load_pretrained_deit(ours, path)
    assert report["reinitialised"] == ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"]
    for name, value in ours.state_dict().items():
        if name.startswith("head"):
            assert torch.equal(value, fresh[name]), name  # DeiT's init, as built
            assert value.shape[0] == 5
        else:
            assert torch.equal(value, reference.state_dict()[name]), name
    assert torch.count_nonzero(ours.head.bias) == 0 and ours.head.weight.abs().max() <= 0.04


def test_plain_vit_checkpoint_into_distilled_model(tmp_path) -> None:
    """One prefix token into the distilled model: dist token, its position slot and head_dist copy the class token's,
    so both heads start predicting what the pretrained class head predicts (see adapt_state_dict for why)."""
    reference = _timm_small("deit_tiny_patch16_224")
    path = _save(reference.state_dict(), tmp_path / "vit.safetensors", "safetensors")
    ours = _ours()
    report = load_pretrained_deit(ours, path)
    assert report["copied"] == {"pos_embed[:, 1]": "pos_embed[:, 0]", "dist_token": "cls_token",
                                "head_dist.weight": "head.weight", "head_dist.bias": "head.bias"}
    assert torch.equal(ours.dist_token, ours.cls_token) and torch.equal(ours.pos_embed[:, 1], ours.pos_embed[:, 0])
    assert torch.equal(ours.pos_embed[:, 2:], reference.pos_embed[:, 1:])
    assert torch.equal(ours.head_dist.weight, reference.head.weight)
    assert ours.dist_token.data_ptr() != ours.cls_token.data_ptr()  # two parameters, free to diverge
    with torch.no_grad():
        cls_logits, dist_logits = ours.train()(torch.randn(3, 3, 16, 16))
    torch.testing.assert_close(cls_logits, dist_logits, atol=1e-6, rtol=0)


def test_distilled_checkpoint_into_cls_only_baseline(tmp_path) -> None:
    reference = _timm_small()
    path = _save(reference.state_dict(), tmp_path / "deit.safetensors", "safetensors")
    baseline = _ours(distilled=False)
    report = load_pretrained_deit(baseline, path)
    assert sorted(report["dropped"]) == ["dist_token", "head_dist.bias", "head_dist.weight", "pos_embed[:, 1]"]
    expected_pos = torch.cat([reference.pos_embed[:, :1], reference.pos_embed[:, 2:]], dim=1)
    assert torch.equal(baseline.pos_embed, expected_pos)
    assert torch.equal(baseline.head.weight, reference.head.weight)
    assert baseline.eval()(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_rgb_checkpoint_into_gray_model_is_exact_on_gray_images(tmp_path) -> None:
    reference = _timm_small()
    ours = _ours(in_chans=1)
    report = load_pretrained_deit(ours, _save(reference.state_dict(), tmp_path / "d.safetensors", "safetensors"))
    assert report["converted"] == {"patch_embed.proj.weight": "3 -> 1 input channels"}
    gray = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(gray), reference(gray.expand(-1, 3, -1, -1)), atol=1e-5, rtol=0)
    one = torch.randn(4, 1, 2, 2)
    torch.testing.assert_close(adapt_input_channels(one, 3).sum(1, keepdim=True), one)  # 1 -> 3: same on gray
    with pytest.raises(ValueError, match="4 input channels"):
        adapt_input_channels(torch.randn(4, 4, 2, 2), 3)


def test_patch_size_change_resamples_the_kernel(tmp_path) -> None:
    reference = _timm_small()  # 16 px, patch 4
    ours = _ours(img_size=32, patch_size=8)  # the same 4x4 grid at twice the resolution
    report = load_pretrained_deit(ours, _save(reference.state_dict(), tmp_path / "d.safetensors", "safetensors"))
    assert report["resampled"] == {"patch_embed.proj.weight": "[64, 3, 4, 4] -> [64, 3, 8, 8]"}
    # FlexiViT's PI-resize: a patch upsampled 4 -> 8 px (bicubic) gives the same token (exact when upsampling)
    x = torch.randn(2, 3, 16, 16)
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 4, 4)  # (B*16, 3, 4, 4)
    patches = F.interpolate(patches, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    up = patches.reshape(2, 4, 4, 3, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 32, 32)  # patches back in place
    with torch.no_grad():
        torch.testing.assert_close(ours.patch_embed(up), reference.patch_embed(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("new_size", [(2, 2), (8, 8), (6, 10)])
def test_resample_patch_embed_matches_timm(new_size) -> None:
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    weight = torch.randn(8, 3, 4, 4)
    expected = timm_layers.resample_patch_embed(weight, list(new_size))
    torch.testing.assert_close(resample_patch_embed(weight, new_size), expected, atol=1e-4, rtol=1e-4)
    assert resample_patch_embed(weight, (4, 4)) is weight


def test_other_embed_dim_is_a_clear_error(tmp_path) -> None:
    path = _save(_timm_small().state_dict(), tmp_path / "d.safetensors", "safetensors")
    with pytest.raises(ValueError) as err:
        load_pretrained_deit(_ours(embed_dim=48), path)
    msg = str(err.value)
    assert str(path) in msg and "cls_token" in msg and "[1, 1, 64]" in msg and "[1, 1, 48]" in msg
    assert "embed_dim is 64, the model's 48" in msg


def test_other_depth_and_missing_qkv_bias_are_clear_errors(tmp_path) -> None:
    path = _save(_timm_small().state_dict(), tmp_path / "d.safetensors", "safetensors")
    with pytest.raises(ValueError, match=r"the checkpoint has 2 blocks .* the model 3; build the student with depth=2"):
        load_pretrained_deit(_ours(depth=3), path)
    no_bias = _save(_timm_small(qkv_bias=False).state_dict(), tmp_path / "nb.safetensors", "safetensors")
    with pytest.raises(ValueError, match=r"missing from the file: blocks.0.attn.qkv.bias, blocks.1.attn.qkv.bias"):
        load_pretrained_deit(_ours(), no_bias)
    wide_mlp = _save(_timm_small(mlp_ratio=2.0).state_dict(), tmp_path / "mlp.safetensors", "safetensors")
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc1.weight: file \[128, 64\] vs model \[256, 64\]"):
        load_pretrained_deit(_ours(), wide_mlp)


def test_num_heads_checked_against_our_own_checkpoint(tmp_path) -> None:
    """num_heads leaves no trace in the weights; our own checkpoints carry it in their config."""
    source = _ours()
    path = tmp_path / "student.safetensors"
    save_model(path, source, kind="deit", config=source.config.to_dict())
    with pytest.raises(ValueError, match=r"saved with num_heads=2, the model has 4"):
        load_pretrained_deit(_ours(num_heads=4), path)
    ours = _ours(img_size=32)
    load_pretrained_deit(ours, path)
    assert torch.equal(ours.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
