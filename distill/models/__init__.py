"""Student models: DeiT (Touvron et al. 2021) with a distillation token."""

from distill.models.deit import (
    PRESETS,
    Attention,
    Block,
    DeiT,
    DeiTConfig,
    DropPath,
    Mlp,
    PatchEmbed,
    adapt_state_dict,
    build_deit,
    count_parameters,
    drop_path,
    resample_pos_embed,
)

__all__ = [
    "PRESETS",
    "Attention",
    "Block",
    "DeiT",
    "DeiTConfig",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "adapt_state_dict",
    "build_deit",
    "count_parameters",
    "drop_path",
    "resample_pos_embed",
]
