"""Where a training step's views come from: the crop (and mixup) parameters of each sample, and the teacher's
logits for exactly the input the model will see.

Three sources, one protocol (:class:`ViewSource`), so the engine's loop never branches on distillation:

* :class:`RandomViews`: fresh random crops per step, no teacher (the teacher's own training, the baseline).
* :class:`OnlineTeacher`: DeiT's way, the frozen teacher runs on the student's own augmented batch every step.
* :class:`StoredViews`: FKD's way (Shen & Xing 2022), the views and logits replayed from the soft-label store
  (:mod:`distill.soft_labels`), so no teacher runs in the loop.

Every draw is a function of ``(seed, epoch, step, process)`` (:class:`StepContext`) or, for stored views, of
``(seed, epoch, image)``: a resumed or multi-process run sees the same views as an uninterrupted one.

Layering: the engine imports this module; this module imports the store, the augmentation and the teachers;
none of those imports the engine or this module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from distill.augment import Mix, in_batch_mix
from distill.data import Split
from distill.soft_labels import SoftLabelStore, as_index, stored_mix
from distill.teachers import freeze

__all__ = ["OnlineTeacher", "RandomViews", "StepContext", "StoredViews", "ViewSource", "Views", "render"]


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


_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based 64-bit mix (Steele et al. 2014): stateless per-sample randomness, vectorised."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class StoredViews:
    """Replays the soft-label store: no teacher in the loop.

    Each epoch, image ``i`` replays view ``(a_i * (epoch mod K) + b_i) mod K``, where ``b_i`` is uniform in
    ``[0, K)`` and ``a_i`` is a unit modulo K, both drawn statelessly from ``(seed, epoch // K, i)``. So in any
    epoch each image's view is uniform over its K views, and every block of K consecutive epochs
    (``0..K-1``, ``K..2K-1``, ...) shows each image every one of its K views exactly once, in a fresh order
    per block. Stateless: resume and multi-process training see the same views.

    A store made with mixup also gives each view's partner: its image and label (from ``split``, by position),
    its crop and the mixing weight, so the student renders exactly the mixed image the teacher saw.

    Args:
        store: an opened :class:`~distill.soft_labels.SoftLabelStore`.
        seed: the run's seed.
        split: the training :class:`~distill.data.Split` the store was made from (needed for mixed views).

    Raises:
        ValueError: a store with mixed views and no ``split``.
    """

    def __init__(self, store: SoftLabelStore, *, seed: int = 0, split: Split | None = None) -> None:
        if store.meta.mixup > 0 and split is None:
            raise ValueError("this soft-label store has mixed views: StoredViews needs the training split "
                             "for the partners")
        self.store = store
        self.seed = int(seed)
        self.split = split
        k = store.views
        self._units = np.array([a for a in range(1, k + 1) if math.gcd(a, k) == 1], dtype=np.uint64)

    def view_ids(self, indices: Any, epoch: int) -> np.ndarray:
        """The view each image in ``indices`` replays in ``epoch`` (int64 ``(B,)``)."""
        k = self.store.views
        cycle, pos = divmod(int(epoch), k)
        base = int(_splitmix64(np.array([(self.seed * 0x2545F4914F6CDD1D + cycle) & _MASK64], dtype=np.uint64))[0])
        h = _splitmix64(as_index(indices).astype(np.uint64) ^ np.uint64(base))
        b = h % np.uint64(k)
        a = self._units[(h >> np.uint64(32)) % np.uint64(len(self._units))]
        return ((a * np.uint64(pos) + b) % np.uint64(k)).astype(np.int64)

    def __call__(self, batch: dict[str, Tensor], ctx: StepContext) -> Views:
        """The batch's views: ``params (B, 5)``, ``teacher_logits (B, C)`` float32 and, for a mixed store, the
        :class:`~distill.augment.Mix`; on the batch's device."""
        device = batch["image"].device
        idx = as_index(batch["index"])
        views = self.view_ids(idx, ctx.epoch)
        params = self.store.params(idx, views)
        logits = self.store.logits(idx, views)
        mix = None
        if self.store.meta.mixup > 0:
            partner, rows = self.store.mix(idx, views)
            mix = stored_mix(self.split, partner, rows, device)
        return Views(params.to(device, non_blocking=True), logits.to(device, non_blocking=True), mix)
