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
:func:`load_pretrained_deit` starts a student from such weights saved at another image size, patch size,
channel count or class count, or with another number of prefix tokens (see :func:`adapt_state_dict`).

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
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.weights import diff_state, load_weights_file, strip_wrapper_prefixes, weights_file_config

__all__ = [
    "PRESETS",
    "Attention",
    "Block",
    "DeiT",
    "DeiTConfig",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "adapt_input_channels",
    "adapt_state_dict",
    "build_deit",
    "count_parameters",
    "drop_path",
    "load_pretrained_deit",
    "resample_patch_embed",
    "resample_pos_embed",
    "trunc_normal_init_",
]

INIT_STD = 0.02
LN_EPS = 1e-6  # timm's and DeiT's LayerNorm eps (PyTorch's default 1e-5 would not reproduce them)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeiTConfig:
    """Architecture of a DeiT student. Saved inside checkpoints so that a checkpoint rebuilds its model.

    Attributes:
        img_size: Side of the (square) input image in pixels; must be a multiple of ``patch_size``.
        patch_size: Side of a square patch; the patch grid is ``img_size // patch_size`` per side.
        in_chans: Input image channels.
        num_classes: Output classes of both heads.
        embed_dim: Token width D; must be divisible by ``num_heads``.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
        qkv_bias: Whether the fused qkv projection has a bias (DeiT: yes).
        drop_rate: Dropout after the position embedding, the attention projection and in the MLP.
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic-depth rate of the last block (rises linearly from 0 at the first).
        distilled: Add the distillation token and ``head_dist`` (DeiT-distilled); False gives a plain ViT.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    distilled: bool = True

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            # bool is a subclass of int: reject it explicitly so that `depth=True` is not accepted as 1.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DeiTConfig.{name} must be a positive integer, got {value!r}")
        for name in ("qkv_bias", "distilled"):
            if not isinstance(getattr(self, name), bool):  # ValueError like every config check: callers catch one
                raise ValueError(f"DeiTConfig.{name} must be a bool, got {getattr(self, name)!r}")  # noqa: TRY004
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"DeiTConfig.{name} must be a rate in [0, 1), got {value!r}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise ValueError(f"DeiTConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if self.img_size % self.patch_size != 0:
            raise ValueError(
                f"image size {self.img_size} is not divisible by patch size {self.patch_size}; "
                "choose an image size that is a multiple of the patch size"
            )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; "
                "each head needs an equal share of the embedding (head_dim = embed_dim / num_heads)"
            )

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(rows, cols)``."""
        side = self.img_size // self.patch_size
        return (side, side)

    @property
    def num_patches(self) -> int:
        """Number of patch tokens N."""
        rows, cols = self.grid_size
        return rows * cols

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: 2 (cls, dist) when distilled, else 1 (cls)."""
        return 2 if self.distilled else 1

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON/YAML-serialisable) for checkpoints and tracking."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeiTConfig:
        """Rebuild a config from :meth:`to_dict` output; missing keys take their defaults.

        Args:
            data: Field names to values.

        Returns:
            The validated config.

        Raises:
            ValueError: If ``data`` holds keys that are not config fields, or a value is invalid.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DeiTConfig key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**dict(data))


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
# Resampling pretrained weights (another image size, patch size or channel count)
# --------------------------------------------------------------------------------------------------


def resample_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    *,
    old_grid: tuple[int, int] | None = None,
    antialias: bool | None = None,
) -> Tensor:
    """Resize the patch part of a position embedding to another patch grid.

    The prefix tokens (cls, dist) have no spatial position and are kept unchanged; the patch embeddings are
    treated as a ``D``-channel image and resized with bicubic interpolation (``align_corners=False``), as in
    DeiT's fine-tuning at 384 px and timm's ``resample_abs_pos_embed``.

    Args:
        pos_embed: ``(1, P + H*W, D)`` with ``P = num_prefix_tokens``.
        new_grid: Target grid ``(rows, cols)``.
        num_prefix_tokens: Number of leading non-patch tokens (2 for DeiT-distilled, 1 for ViT).
        old_grid: Source grid; inferred as square when None.
        antialias: Low-pass filter before resizing; None means "only when shrinking" (where aliasing occurs).
            Upsampling then equals DeiT's ``main.py`` (plain bicubic, a=-0.75); timm's ``resample_abs_pos_embed``
            always passes ``antialias=True``, which for upsampling switches to PIL's bicubic (a=-0.5): pass
            ``antialias=True`` to reproduce timm exactly.

    Returns:
        ``(1, P + rows*cols, D)`` in ``pos_embed``'s dtype.

    Raises:
        ValueError: If the shapes are inconsistent or the old grid cannot be inferred.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, D), got {tuple(pos_embed.shape)}")
    num_old = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(max(num_old, 0))
        if num_old <= 0 or side * side != num_old:
            raise ValueError(
                f"cannot infer a square patch grid from {num_old} patch positions "
                f"({pos_embed.shape[1]} tokens minus {num_prefix_tokens} prefix tokens); pass old_grid"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_old:
        raise ValueError(f"old_grid {old_grid} does not match the {num_old} patch positions in pos_embed")
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return pos_embed

    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, H, W), row-major
    if antialias is None:
        antialias = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    # float32 for the interpolation: bicubic is not implemented for half precision on every device.
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False, antialias=antialias)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)  # (1, P + rows*cols, D)


def resample_patch_embed(weight: Tensor, new_size: tuple[int, int]) -> Tensor:
    """Resize the patch-embedding kernel to another patch size (FlexiViT, Beyer et al. 2023).

    Plain interpolation of the kernel would change what it computes. FlexiViT's "PI-resize" instead picks the
    kernel ``w'`` that best keeps every patch token when the image is resized with the patch:
    ``<resize(x), w'> ~ <x, w>``. With ``R`` the matrix of the bicubic (antialiased) resize, that is
    ``w' = pinv(R^T) w``; exact when upsampling the patch, least-squares when shrinking it. The same
    computation as timm's ``resample_patch_embed`` (bicubic, ``antialias=True``), without importing timm.

    Args:
        weight: Conv kernel ``(D, C, p, p)``.
        new_size: Target patch ``(height, width)``.

    Returns:
        ``(D, C, *new_size)`` in ``weight``'s dtype.
    """
    old_size = tuple(weight.shape[-2:])
    new_size = (int(new_size[0]), int(new_size[1]))
    if old_size == new_size:
        return weight
    n_old = old_size[0] * old_size[1]
    basis = torch.eye(n_old, dtype=torch.float32, device=weight.device).reshape(n_old, 1, *old_size)
    resized = F.interpolate(basis, size=new_size, mode="bicubic", antialias=True, align_corners=False)
    resize = resized.reshape(n_old, -1)  # (old pixels, new pixels) = R^T: row i is basis pixel i, resized
    pinv = torch.linalg.pinv(resize)  # (new pixels, old pixels)
    d, c = weight.shape[:2]
    out = weight.reshape(d, c, n_old).float() @ pinv.T  # (D, C, new pixels)
    return out.reshape(d, c, *new_size).to(weight.dtype)


def adapt_input_channels(weight: Tensor, in_chans: int) -> Tensor:
    """Fit the patch-embedding kernel ``(D, C, p, p)`` to ``in_chans`` input channels.

    RGB to 1 channel sums the kernel over the colours: on a gray image fed as three equal channels the
    RGB model computes exactly ``sum_c w_c * x``, so the summed kernel sees a gray image as the pretrained
    model saw its gray version (timm's ``adapt_input_conv`` does the same). 1 channel to C repeats the kernel
    divided by C: a gray image repeated C times then gives the same output.

    Raises:
        ValueError: Any other pair of channel counts.
    """
    c = weight.shape[1]
    if c == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)  # (D, 1, p, p)
    if c == 1:
        return weight.expand(-1, in_chans, -1, -1) / in_chans  # (D, C, p, p)
    raise ValueError(f"patch_embed.proj.weight: the checkpoint takes {c} input channels, the model {in_chans}; "
                     "only 3 -> 1 (summed) and 1 -> C (repeated) can be converted")


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


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _depth(state: Mapping[str, Tensor]) -> int | None:
    ids = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return max(ids) + 1 if ids else None


def adapt_state_dict(state_dict: Mapping[str, Tensor], model: DeiT) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Fit DeiT or ViT weights (ours, timm's, facebookresearch/deit's) to ``model``.

    What is adapted, and how:

    * patch grid (image size): ``pos_embed`` resampled by :func:`resample_pos_embed` (bicubic; the prefix tokens'
      slots are kept exactly);
    * patch size: the kernel resampled by :func:`resample_patch_embed` (FlexiViT PI-resize), the grid as above;
    * input channels 3 -> 1 or 1 -> C: :func:`adapt_input_channels`;
    * one prefix token (a plain ViT/DeiT) into a distilled model: ``dist_token`` and its position slot are copies of
      the class token's, and ``head_dist`` a copy of ``head`` (when the class count is kept). The two tokens then stay
      equal through every block, so from the first step the distillation head predicts what the pretrained class
      head predicts, and the two heads' different targets (labels vs teacher) make them diverge as they train; DeiT
      reports the trained tokens end up close anyway (cosine 0.93 at the output). The start is not exactly the
      checkpoint's function: every query sees the class token's key twice, which raises its attention weight ``a``
      to ``2a / (1 + a)``. A fresh random token (DeiT's init) would perturb every block's attention by an arbitrary
      amount instead, and its head would start from nothing;
    * a distilled checkpoint into a class-token-only model: ``dist_token``, its position slot and ``head_dist``
      are dropped;
    * another class count, or no head in the file (a feature-only checkpoint): ``head``/``head_dist`` are new. They
      keep the values ``model`` was built with (DeiT's init: truncated normal std 0.02, bias 0, drawn from the
      build seed), so call this on a freshly built model;
    * ``pre_logits.*`` (the representation layer of old ViT checkpoints, unused by DeiT) is dropped, as timm does.

    Other differences cannot be adapted and are errors naming the key and both shapes: ``embed_dim``, ``depth``,
    ``mlp_ratio``, ``qkv_bias``. ``num_heads`` leaves no trace in the weights (``qkv`` is ``(3D, D)`` for any head
    count), so it is checked only by :func:`load_pretrained_deit` against our own checkpoints' saved config.

    Args:
        state_dict: Weights with timm's key names (wrapper prefixes already removed).
        model: The model the weights are for.

    Returns:
        ``(state, report)``: a new dict that ``model.load_state_dict(state)`` accepts when the architectures agree
        (entries not adapted are shared, not copied), and ``report`` with ``resampled`` (``{key: "old -> new
        shape"}``), ``converted`` (channels), ``copied`` (``{target: source}``), ``dropped`` and ``reinitialised``
        (key lists).

    Raises:
        ValueError: Another embed_dim or depth, an unconvertible channel count, or a ``pos_embed`` without one slot
            per prefix token plus a square patch grid.
    """
    state = dict(state_dict)
    own = model.state_dict()
    report: dict[str, Any] = {"resampled": {}, "converted": {}, "copied": {}, "dropped": [], "reinitialised": []}
    for key in ("cls_token", "pos_embed", "norm.weight"):
        if key in state and state[key].shape[-1] != model.embed_dim:
            raise ValueError(f"{key}: the checkpoint has shape {_shape(state[key])}, the model {_shape(own[key])}: "
                             f"the checkpoint's embed_dim is {state[key].shape[-1]}, the model's {model.embed_dim}; "
                             "build the student with the checkpoint's embed_dim (and its depth and num_heads)")
    depth = _depth(state)
    if depth is not None and depth != model.config.depth:
        raise ValueError(f"blocks: the checkpoint has {depth} blocks (blocks.0 ... blocks.{depth - 1}), the model "
                         f"{model.config.depth}; build the student with depth={depth}")

    key = "patch_embed.proj.weight"
    if key in state:
        weight = state[key]
        if weight.shape[2:] != own[key].shape[2:]:
            weight = resample_patch_embed(weight, own[key].shape[2:])
            report["resampled"][key] = f"{_shape(state[key])} -> {_shape(weight)}"
        if weight.shape[1] != own[key].shape[1]:
            converted = adapt_input_channels(weight, own[key].shape[1])
            report["converted"][key] = f"{weight.shape[1]} -> {converted.shape[1]} input channels"
            weight = converted
        state[key] = weight

    src_prefix = 2 if "dist_token" in state else 1
    if "pos_embed" in state:
        pos = state["pos_embed"]
        try:
            resampled = resample_pos_embed(pos, model.grid_size, src_prefix)  # (1, P + rows*cols, D)
        except ValueError as err:
            raise ValueError(f"pos_embed {_shape(pos)}: {err} (only layouts with one position slot per prefix "
                             "token, as DeiT and timm's default ViT, can be loaded)") from None
        if resampled is not pos:
            report["resampled"]["pos_embed"] = f"{_shape(pos)} -> {_shape(resampled)}"
        if src_prefix == 1 and model.distilled:
            resampled = torch.cat([resampled[:, :1], resampled[:, :1], resampled[:, 1:]], dim=1)  # cls slot twice
            report["copied"]["pos_embed[:, 1]"] = "pos_embed[:, 0]"
        elif src_prefix == 2 and not model.distilled:
            resampled = torch.cat([resampled[:, :1], resampled[:, 2:]], dim=1)  # without the dist slot
            report["dropped"].append("pos_embed[:, 1]")
        state["pos_embed"] = resampled
    if model.distilled and src_prefix == 1 and "cls_token" in state:
        state["dist_token"] = state["cls_token"].clone()
        report["copied"]["dist_token"] = "cls_token"

    heads = [k for k in own if k.startswith(("head.", "head_dist."))]
    if "head.weight" not in state or state["head.weight"].shape[0] != model.num_classes:
        state.update({k: own[k] for k in heads})  # the model's own initialisation
        report["reinitialised"] = heads
    elif model.distilled and "head_dist.weight" not in state:
        state.update({k.replace("head.", "head_dist.", 1): state[k] for k in ("head.weight", "head.bias")})
        report["copied"].update({"head_dist.weight": "head.weight", "head_dist.bias": "head.bias"})
    for k in [k for k in state if k not in own and k.startswith(("dist_token", "head_dist.", "pre_logits."))]:
        del state[k]
        report["dropped"].append(k)
    return state, report


def load_pretrained_deit(model: DeiT, source: str | Path | Mapping[str, Tensor]) -> dict[str, Any]:
    """Start ``model`` (distilled, or the baseline's class-token-only variant) from pretrained DeiT/ViT weights.

    Accepts the official facebookresearch/deit ``.pth`` files (``{"model": state_dict}``), timm's safetensors
    (``VisionTransformerDistilled`` or ``VisionTransformer``, e.g. ``deit_tiny_distilled_patch16_224``,
    ``deit_small_patch16_224``, ``vit_tiny_patch16_224``), and our own student checkpoints; wrappings and prefixes as
    in :mod:`distill.weights`. The weights are fitted by :func:`adapt_state_dict` (image and patch size, channels,
    prefix tokens, class count), then every tensor of the model must be loaded.

    Args:
        model: A freshly built :class:`DeiT` (new heads keep its initialisation).
        source: A weights file (``.safetensors`` or a torch file, read with ``weights_only=True``) or a state dict.

    Returns:
        ``adapt_state_dict``'s report plus ``source`` and ``prefixes_removed``, for logging.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Unreadable file, or weights of another architecture; the message names the file, the key and
            both shapes (or both ``num_heads``).
    """
    where = "state dict" if isinstance(source, Mapping) else str(source)
    own = model.state_dict()
    state, removed = strip_wrapper_prefixes(source if isinstance(source, Mapping) else load_weights_file(source), own)
    try:
        saved = None if isinstance(source, Mapping) else weights_file_config(source)
        if saved and "num_heads" in saved and saved["num_heads"] != model.config.num_heads:
            raise ValueError(f"the checkpoint was saved with num_heads={saved['num_heads']}, the model has "
                             f"{model.config.num_heads}; build the student with num_heads={saved['num_heads']}")
        state, report = adapt_state_dict(state, model)
        diff = diff_state(state, own)
        if not diff.ok:
            raise ValueError(f"{diff.describe()}; the checkpoint is another architecture (mlp_ratio, qkv_bias or "
                             "a model other than DeiT/ViT?)")
    except ValueError as err:
        raise ValueError(f"cannot start the student from {where}: {err}") from None
    model.load_state_dict(state, strict=True)
    return {"source": where, "prefixes_removed": removed, **report}


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (elements) of ``model``.

    Args:
        model: Any module.
        trainable_only: Count only parameters with ``requires_grad``.

    Returns:
        Total parameter count.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

PRESETS: dict[str, DeiTConfig] = {
    # The paper's ImageNet models (Table 1), 224 px, patch 16.
    "deit_tiny": DeiTConfig(embed_dim=192, depth=12, num_heads=3),
    "deit_small": DeiTConfig(embed_dim=384, depth=12, num_heads=6),
    "deit_base": DeiTConfig(embed_dim=768, depth=12, num_heads=12),
    # Small CPU models for 8-32 px images (digits, MNIST, CIFAR); patch 4 keeps 16-64 tokens per image.
    "deit_nano": DeiTConfig(img_size=16, patch_size=4, embed_dim=48, depth=3, num_heads=2),
    "deit_micro": DeiTConfig(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=2),
    "deit_mini": DeiTConfig(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3),
}


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
