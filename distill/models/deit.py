"""DeiT student: a Vision Transformer with a distillation token.

Implements the model of Touvron et al. 2021, "Training data-efficient image transformers &
distillation through attention" (ICML 2021, https://arxiv.org/abs/2012.12877), following
``facebookresearch/deit/models.py`` and timm's ``VisionTransformerDistilled``:

* tokens ``[cls, dist, patch_1 ... patch_N]`` plus a learned ``pos_embed`` of shape ``(1, N+2, D)``
  (the two prefix tokens get a position slot each, as in DeiT; ``(1, N+1, D)`` without distillation);
* pre-norm blocks: ``x + drop_path(attn(norm1(x)))``, ``x + drop_path(mlp(norm2(x)))``, LayerNorm eps 1e-6;
* one fused ``qkv`` Linear (bias on), reshaped to ``(3, B, heads, N, head_dim)``, attention by
  ``F.scaled_dot_product_attention`` (the same kernel timm uses, so the two run at the same speed);
* stochastic depth per sample (``DropPath``), rate rising linearly from 0 to ``drop_path_rate``;
* two heads: ``head`` reads the class token, ``head_dist`` the distillation token. Training returns
  ``(cls_logits, dist_logits)``; evaluation returns their average.

Parameter names equal timm's (``VisionTransformerDistilled`` with ``distilled=True``, plain
``VisionTransformer``/``deit_tiny_patch16_224`` with ``distilled=False``), so timm/DeiT checkpoints load
with ``strict=True``. timm itself is not imported here: it is only a test and benchmark dependency.
:func:`distill.models.deit_pretrained.load_pretrained_deit` starts a student from such weights saved at another image
size, patch size, channel count or class count, or with another number of prefix tokens. The architecture is a
:class:`~distill.models.deit_config.DeiTConfig`; :func:`load_deit` rebuilds a student from its checkpoint.

Initialisation (DeiT's ``_init_weights``): ``cls_token``, ``dist_token``, ``pos_embed`` and every Linear
weight are drawn from a normal with std 0.02 truncated at +-2 std (Linear biases 0); LayerNorm weight 1,
bias 0. The patch-embedding Conv2d keeps PyTorch's default init (Kaiming-uniform, a=sqrt(5)), as DeiT
and timm's default mode do. Note: DeiT/timm call ``trunc_normal_(t, std=.02)`` whose bounds default to
the *absolute* values +-2, i.e. +-100 std, so their draw is effectively untruncated (std 0.02); here the
bounds are +-2 std (+-0.04), which gives an empirical std of 0.02 * 0.880 = 0.0176. Also unlike timm's
ViT (which draws ``cls_token`` with std 1e-6) the class token follows DeiT: truncated normal, std 0.02.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.checkpoint import load_checkpoint
from distill.models.deit_config import PRESETS, DeiTConfig

__all__ = ["Attention", "Block", "DeiT", "DropPath", "Mlp", "PatchEmbed", "build_deit", "count_parameters",
           "drop_path", "load_deit", "trunc_normal_init_"]

INIT_STD = 0.02
LN_EPS = 1e-6  # timm's and DeiT's LayerNorm eps (PyTorch's default 1e-5 would not reproduce them)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def drop_path(x: Tensor, p: float = 0.0, training: bool = False) -> Tensor:
    """Stochastic depth: zero a residual branch for whole samples, with probability ``p``.

    Unlike ``nn.Dropout`` (which zeroes single activations), each sample either keeps its entire branch
    output, scaled by ``1 / (1 - p)`` so the expectation is unchanged, or loses all of it, which makes
    the block an identity for that sample (Huang et al. 2016; DeiT uses it with rate 0.1).

    Args:
        x: Branch output, ``(B, ...)``.
        p: Drop probability in ``[0, 1)``.
        training: Drop only in training; evaluation is the identity.

    Returns:
        Tensor shaped like ``x``.
    """
    if p == 0.0 or not training:
        return x
    keep_prob = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # (B, 1, 1): one coin per sample, broadcast over tokens
    mask = x.new_empty(shape).bernoulli_(keep_prob).div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path`; identity in eval mode or with rate 0."""

    def __init__(self, *, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path rate must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class PatchEmbed(nn.Module):
    """Split the image into non-overlapping patches and project each to D with one strided conv."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        # kernel == stride == patch: the conv is exactly a per-patch Linear over the flattened patch.
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels (DeiTConfig.in_chans), got {c}")
        if (h, w) != (self.img_size, self.img_size):
            # pos_embed has one slot per patch of the configured grid, so other sizes cannot be added to it.
            raise ValueError(
                f"expected input images of {self.img_size}x{self.img_size} (DeiTConfig.img_size), got {h}x{w}; "
                f"resize the images, or build the model with img_size={h} and load weights with "
                "load_pretrained_deit (it resamples the position embedding)"
            )
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(
        self, *, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop  # a rate, handed to SDPA: it drops attention weights inside the kernel
        # One Linear for q, k and v: a single matmul is faster than three and matches DeiT's checkpoints.
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_qkv(self, x: Tensor) -> Tensor:
        """Project tokens to per-head queries, keys and values.

        Args:
            x: Tokens, ``(B, N, D)``.

        Returns:
            ``(3, B, heads, N, head_dim)``: index 0/1/2 is q/k/v; heads are contiguous ``head_dim`` slices of D.
        """
        b, n, _ = x.shape
        qkv = self.qkv(x)  # (B, N, 3*D), laid out [q | k | v], each split into heads
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim)  # (B, N, 3, heads, head_dim)
        return qkv.permute(2, 0, 3, 1, 4)  # (3, B, heads, N, head_dim): heads become a batch dim for SDPA

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.project_qkv(x).unbind(0)  # each (B, heads, N, head_dim)
        # SDPA scales by 1/sqrt(head_dim) and picks a fused kernel (flash / memory-efficient / CPU flash).
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, d)  # (B, N, D): heads concatenated back
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, attn_drop={self.attn_drop}"


class Mlp(nn.Module):
    """Position-wise feed-forward: Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, *, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()  # exact (erf) GELU, as DeiT/timm; the tanh approximation would change outputs
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(self.act(self.fc1(x)))  # (B, N, hidden)
        return self.drop2(self.fc2(x))  # (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer block; stochastic depth on both residual branches."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        # Pre-norm (norm inside the branch, identity on the skip path) keeps deep ViTs trainable without warm-up
        # tricks on the residual stream.
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(p=drop_path)  # stateless: the same module serves both branches

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))  # (B, N+2, D)
        x = x + self.drop_path(self.mlp(self.norm2(x)))  # (B, N+2, D)
        return x


def trunc_normal_init_(tensor: Tensor, std: float = INIT_STD) -> Tensor:
    """Fill ``tensor`` in place from N(0, std^2) truncated at +-2 std (DeiT/ViT init).

    Args:
        tensor: Parameter to fill.
        std: Standard deviation of the untruncated normal.

    Returns:
        ``tensor``.
    """
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class DeiT(nn.Module):
    """DeiT: ViT with a class token, an optional distillation token and one head per token.

    Args:
        config: Architecture; kept as ``self.config`` (save ``config.to_dict()`` with the weights).
    """

    def __init__(self, config: DeiTConfig) -> None:
        super().__init__()
        if not isinstance(config, DeiTConfig):
            raise TypeError(f"DeiT expects a DeiTConfig, got {type(config).__name__}")
        self.config = config
        dim = config.embed_dim
        self.num_classes = config.num_classes
        self.embed_dim = dim
        self.distilled = config.distilled
        self.num_prefix_tokens = config.num_prefix_tokens

        self.patch_embed = PatchEmbed(
            img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans, embed_dim=dim
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # The distillation token is a second learned query; it attends like cls but is supervised by the teacher.
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.distilled else None
        # One position slot per prefix token too (DeiT, timm "class token in pos_embed" layout).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, dim))
        self.pos_drop = nn.Dropout(config.drop_rate)

        # Stochastic depth decay rule (DeiT/timm): deeper blocks are dropped more often. torch.linspace (not numpy)
        # so the float rates, hence the 1/keep scaling, are bit-identical to timm's.
        dpr = [r.item() for r in torch.linspace(0, config.drop_path_rate, config.depth)]
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=dim,
                    num_heads=config.num_heads,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    drop=config.drop_rate,
                    attn_drop=config.attn_drop_rate,
                    drop_path=dpr[i],
                )
                for i in range(config.depth)
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.head = nn.Linear(dim, config.num_classes)
        self.head_dist = nn.Linear(dim, config.num_classes) if config.distilled else None
        self.reset_parameters()

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(rows, cols)``."""
        return self.patch_embed.grid_size

    @property
    def num_patches(self) -> int:
        """Number of patch tokens N."""
        return self.patch_embed.num_patches

    def reset_parameters(self) -> None:
        """(Re-)initialise all weights as DeiT does; see the module docstring."""
        trunc_normal_init_(self.pos_embed)
        trunc_normal_init_(self.cls_token)
        if self.dist_token is not None:
            trunc_normal_init_(self.dist_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_init_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # patch_embed.proj (Conv2d) keeps PyTorch's default init, as in DeiT and timm.

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (tokens and positions are not weights to shrink)."""
        return {"pos_embed", "cls_token", "dist_token"}

    def _prefix_tokens(self, batch: int) -> list[Tensor]:
        tokens = [self.cls_token.expand(batch, -1, -1)]  # (B, 1, D)
        if self.dist_token is not None:
            tokens.append(self.dist_token.expand(batch, -1, -1))  # (B, 1, D)
        return tokens

    def forward_features(self, x: Tensor) -> Tensor:
        """Encode images to tokens.

        Args:
            x: Images, ``(B, C, H, W)`` with ``H == W == config.img_size``.

        Returns:
            Tokens after the final norm, ``(B, N+2, D)`` (``(B, N+1, D)`` without distillation), ordered
            ``[cls, dist, patch_1 ... patch_N]``.
        """
        x = self.patch_embed(x)  # (B, N, D)
        x = torch.cat(self._prefix_tokens(x.shape[0]) + [x], dim=1)  # (B, N+2, D): [cls, dist, patches]
        x = self.pos_drop(x + self.pos_embed)  # positions added after the concat: prefix tokens get slots too
        x = self.blocks(x)  # (B, N+2, D)
        return self.norm(x)

    def forward_heads(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Logits of both heads, whatever the mode (evaluation scores each head separately).

        Args:
            x: Images, ``(B, C, H, W)``.

        Returns:
            ``(cls_logits, dist_logits)``, each ``(B, num_classes)``; ``dist_logits`` is None when not distilled.
        """
        return self._heads(self.forward_features(x))

    def _heads(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        cls_logits = self.head(tokens[:, 0])  # (B, classes), from the class token
        if self.head_dist is None:
            return cls_logits, None
        return cls_logits, self.head_dist(tokens[:, 1])  # (B, classes), from the distillation token

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Classify images.

        Args:
            x: Images, ``(B, C, H, W)``.

        Returns:
            Distilled and training: ``(cls_logits, dist_logits)`` (the losses need each head). Distilled and
            eval: ``(cls_logits + dist_logits) / 2``, DeiT's late fusion of the two heads. Not distilled: the
            class-head logits in both modes. All ``(B, num_classes)``.
        """
        cls_logits, dist_logits = self._heads(self.forward_features(x))
        if dist_logits is None:
            return cls_logits
        if self.training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of ``model``.

    Args:
        model: Any module.
        trainable_only: Count only parameters with ``requires_grad``.

    Returns:
        Total parameter count.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_deit(preset: str, **overrides: Any) -> DeiT:
    """Build a DeiT from a named preset, replacing any config fields.

    Args:
        preset: One of ``PRESETS`` (``deit_tiny``, ``deit_small``, ``deit_base``, ``deit_nano``, ``deit_micro``,
            ``deit_mini``).
        **overrides: :class:`DeiTConfig` fields to replace (``num_classes``, ``img_size``, ``distilled``, ...).

    Returns:
        A freshly initialised model.

    Raises:
        ValueError: For an unknown preset, an unknown field or an invalid resulting config.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown DeiT preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(DeiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown DeiTConfig field(s) in overrides: {', '.join(unknown)}; valid: {', '.join(sorted(fields))}"
        )
    return DeiT(dataclasses.replace(PRESETS[preset], **overrides))


def load_deit(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[DeiT, dict[str, Any]]:
    """Rebuild a student (or baseline) from its checkpoint alone: its saved :class:`DeiTConfig`, then its weights.

    Returns:
        ``(model, info)`` as :func:`distill.checkpoint.load_checkpoint` returns them; the model is in eval mode.

    Raises:
        CheckpointError: the file is missing or corrupt, holds another kind of model, or weights that do not fit.
    """
    return load_checkpoint(path, lambda config: DeiT(DeiTConfig.from_dict(config)), kind="deit",
                           map_location=map_location)
