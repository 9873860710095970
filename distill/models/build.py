"""Build an untrained model from a kind and a keyword config: the one map from a checkpoint's ``kind`` to a model.

A checkpoint (:mod:`distill.checkpoint`) stores ``kind`` and ``config``; training stages build their fresh
models through the same function, so what a stage trains and what a checkpoint rebuilds cannot drift apart.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from distill.models.deit import PRESETS, DeiT, DeiTConfig
from distill.teachers import build_teacher

__all__ = ["MODEL_KINDS", "STUDENT_OVERRIDES", "build_model", "student_config"]

MODEL_KINDS = ("deit", "teacher")
#: The ``student.model`` params that replace a preset's field when they are set (null: the preset's).
STUDENT_OVERRIDES = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def build_model(kind: str, config: dict[str, Any], *, seed: int | None = None) -> nn.Module:
    """Build an untrained model of ``kind`` from its keyword ``config``.

    Args:
        kind: ``'deit'`` (a :class:`~distill.models.deit.DeiT` from a ``DeiTConfig`` dict) or ``'teacher'``
            (:func:`distill.teachers.build_teacher`; ``config["arch"]`` names the architecture).
        config: the keyword config, as saved in a checkpoint.
        seed: initialise the weights from this seed, leaving the global RNG as it was. Training stages pass
            their seed: without it the initialisation depends on whatever the global RNG holds, and two
            processes with the same params would train different models.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if seed is None:
        return _build(kind, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(kind, config)


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


def _build(kind: str, config: dict[str, Any]) -> nn.Module:
    if kind == "deit":
        return DeiT(DeiTConfig.from_dict(config))
    if kind == "teacher":
        cfg = dict(config)
        return build_teacher(cfg.pop("arch"), **cfg)
    raise ValueError(f"unknown model kind {kind!r} (expected one of {', '.join(map(repr, MODEL_KINDS))})")
