"""The DeiT student's architecture: :class:`DeiTConfig`, the named presets, and the config ``student.model`` asks for.

A typed config per model (nanoGPT's ``GPTConfig``): saved inside every student checkpoint, so a checkpoint rebuilds
its model alone (:func:`distill.models.deit.load_deit`). It lives apart from the network (:mod:`distill.models.deit`)
so that the pre-flight check of ``student.model`` (``check_params``) does not depend on the network's code: a DeiT
edit reruns the stages that train or run a DeiT, nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PRESETS", "STUDENT_OVERRIDES", "DeiTConfig", "student_config"]

#: The ``student.model`` params that replace a preset's field when they are set (null: the preset's).
STUDENT_OVERRIDES = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


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


def student_config(model: Any, *, image_size: int, channels: int, num_classes: int, distilled: bool) -> dict[str, Any]:
    """The DeiT config of ``student.model`` (a preset, with the overrides it sets) for images of this kind.

    Args:
        model: the ``student.model`` params (the validated group, or a stage's view of it: only its fields are read).
        image_size / channels / num_classes: the data's.
        distilled: with the distillation token and head.

    Raises:
        ValueError: an unknown preset (naming the valid ones and the closest), or a config DeiT cannot have (an
            image size the patch size does not divide, a width the heads do not divide), named with
            ``student.model`` and ``data.image_size``.
    """
    if model.preset not in PRESETS:
        close = difflib.get_close_matches(model.preset, PRESETS, n=1)
        raise ValueError(f"student.model.preset {model.preset!r} is unknown; choose one of {', '.join(PRESETS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    overrides = {k: getattr(model, k) for k in STUDENT_OVERRIDES if getattr(model, k) is not None}
    cfg = {**PRESETS[model.preset].to_dict(), **overrides, "drop_path_rate": model.drop_path_rate,
           "drop_rate": model.drop_rate, "img_size": image_size, "in_chans": channels, "num_classes": num_classes,
           "distilled": distilled}
    try:
        return DeiTConfig.from_dict(cfg).to_dict()
    except ValueError as err:
        raise ValueError(f"student.model: {err} (data.image_size={image_size})") from None
