"""Build an untrained model from a kind and a keyword config: the one map from a checkpoint's ``kind`` to a model.

A checkpoint (:mod:`distill.checkpoint`) stores ``kind`` and ``config``; training stages build their fresh
models through the same function, so what a stage trains and what a checkpoint rebuilds cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distill.models.deit import DeiT, DeiTConfig
from distill.teachers import build_teacher

__all__ = ["MODEL_KINDS", "build_model"]

MODEL_KINDS = ("deit", "teacher")


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


def _build(kind: str, config: dict[str, Any]) -> nn.Module:
    if kind == "deit":
        return DeiT(DeiTConfig.from_dict(config))
    if kind == "teacher":
        cfg = dict(config)
        return build_teacher(cfg.pop("arch"), **cfg)
    raise ValueError(f"unknown model kind {kind!r} (expected one of {', '.join(map(repr, MODEL_KINDS))})")
