"""Where a training step's views come from: the crop (and mixup) parameters of each sample, and the teacher's
logits for exactly the input the model will see.

Three sources, one protocol (:class:`ViewSource`), so the engine's loop never branches on distillation:

* :class:`RandomViews`: fresh random crops per step, no teacher (the teacher's own training, the baseline).
* :class:`OnlineTeacher`: DeiT's way, the frozen teacher runs on the student's own augmented batch every step.
* :class:`distill.store.StoredViews`: FKD's way (Shen & Xing 2022), the views and logits replayed from the
  soft-label store, so no teacher runs in the loop. The store owns its replay: it lives beside the store.

Every draw is a function of ``(seed, epoch, step, process)`` (:class:`StepContext`) or, for stored views, of
``(seed, epoch, image)``: a resumed or multi-process run sees the same views as an uninterrupted one.

Layering: the engine and the store import this module (the protocol); this module imports the augmentation only,
so neither a store edit nor a teacher edit reruns a stage that only draws fresh views.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from distill.augment import Mix, in_batch_mix

__all__ = ["OnlineTeacher", "RandomViews", "StepContext", "ViewSource", "Views", "freeze", "render"]


@dataclass(frozen=True)
class StepContext:
    """Where a training step is: used to derive its random draws statelessly."""

    seed: int
    epoch: int
    step: int
    process_index: int = 0

    def generator(self, stream: int = 0) -> torch.Generator:
        """A CPU generator that depends only on (seed, epoch, step, process, stream)."""
        g = torch.Generator()
        g.manual_seed(hash((self.seed, self.epoch, self.step, self.process_index, stream)) & 0x7FFF_FFFF_FFFF)
        return g


class Views(NamedTuple):
    """What a view source gives for a batch: each sample's crop, the teacher's logits for the exact input
    the model will see (None without a teacher), and the mixup partners (None without mixup)."""

    params: Tensor
    teacher_logits: Tensor | None = None
    mix: Mix | None = None


class ViewSource(Protocol):
    """Anything that turns a batch and its step into :class:`Views`."""

    def __call__(self, batch: dict[str, Tensor], ctx: StepContext) -> Views:
        """Return the batch's views: crop params ``(B, 5)``, teacher logits ``(B, C)`` or None, mix or None."""


def render(augmenter: Any, images: Tensor, params: Tensor, mix: Mix | None) -> Tensor:
    """The model's input: ``images`` cropped (and mixed) as ``params`` / ``mix`` say, normalised.

    An augmenter without mixup support is called as ``augmenter(images, params)``.
    """
    params = params.to(images.device)
    return augmenter(images, params) if mix is None else augmenter(images, params, mix)


def _random_views(augmenter: Any, batch: dict[str, Tensor], ctx: StepContext,
                  mixup: float) -> tuple[Tensor, Mix | None]:
    images = batch["image"]
    params = augmenter.sample(images.shape[0], ctx.generator())
    mix = in_batch_mix(images, batch["label"], params, mixup, ctx.generator(1)) if mixup > 0 else None
    return params, mix


class RandomViews:
    """Fresh random augmentation parameters per step; no teacher.

    Args:
        augmenter: the :class:`distill.augment.Augmenter`.
        mixup: Beta(mixup, mixup) mixup of every sample with the batch in reverse order; 0 turns it off.
    """

    def __init__(self, augmenter: Any, *, mixup: float = 0.0) -> None:
        self.augmenter = augmenter
        self.mixup = float(mixup)

    def __call__(self, batch: dict[str, Tensor], ctx: StepContext) -> Views:
        params, mix = _random_views(self.augmenter, batch, ctx, self.mixup)
        return Views(params, None, mix)


class OnlineTeacher:
    """DeiT's way: the frozen teacher runs on the student's own augmented (and mixed) batch at every step.

    The teacher is not a submodule of anything ``accelerate.prepare`` wraps: DDP never syncs it and
    ``student.train()`` cannot flip its BatchNorm layers back to training mode.

    Args:
        teacher: the trained teacher; frozen here (``eval()``, no gradients).
        augmenter: the :class:`distill.augment.Augmenter`.
        autocast: a context factory (e.g. ``accelerator.autocast``) for the teacher's forward pass.
        mixup: as :class:`RandomViews`; the teacher labels the mixed image.
    """

    def __init__(self, teacher: nn.Module, augmenter: Any, *, autocast: Callable[[], Any] | None = None,
                 mixup: float = 0.0) -> None:
        self.teacher = freeze(teacher)
        self.augmenter = augmenter
        self.autocast = autocast or contextlib.nullcontext
        self.mixup = float(mixup)

    def __call__(self, batch: dict[str, Tensor], ctx: StepContext) -> Views:
        images = batch["image"]
        params, mix = _random_views(self.augmenter, batch, ctx, self.mixup)
        device = next(self.teacher.parameters()).device
        if device != images.device:
            self.teacher.to(images.device)
        with torch.no_grad(), self.autocast():
            logits = self.teacher(render(self.augmenter, images, params, mix)).float()
        return Views(params, logits, mix)


def freeze(model: nn.Module) -> nn.Module:
    """Put a teacher in inference mode for good: ``eval()`` and ``requires_grad_(False)``. A teacher that labels
    views (:class:`OnlineTeacher`, the soft-label store's generation) is frozen so, and is never part of what
    ``accelerate.prepare`` wraps: DDP never syncs it and ``student.train()`` never flips its BatchNorm layers."""
    model.eval()
    model.requires_grad_(False)
    return model
