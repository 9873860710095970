"""Replayable augmentation: the views a model is trained on, drawn as parameters and rendered from them alone.

The crop (:class:`Augmenter`): a random-resized crop (Szegedy et al. 2015, torchvision's
``RandomResizedCrop`` sampling) with an optional horizontal flip. Its parameters are drawn from an
explicit ``torch.Generator`` and returned as a ``(B, 5)`` tensor ``[top, left, height, width, flip]``
in units of the source side (so a parameter row is independent of the resolution); the view is
produced from those parameters alone by a bilinear ``grid_sample``, which computes each output pixel
independently of the rest of the batch. The same parameters therefore give the bit-identical view on
the same device: the soft-label store records parameters at generation and the student replays them.

Mixup (Zhang et al. 2018, :class:`Mix`): a view may be mixed, pixel by pixel, with a partner's view, weighted by
``lam`` from Beta(alpha, alpha) (:func:`sample_lam`); :func:`in_batch_mix` pairs a batch with itself reversed
(timm's pairing). The soft-label store records each stored view's partner, its crop and ``lam`` the same way.

The training views of ``data.augment`` (:func:`train_augmenter`) are the same for the teacher, the store, the
student and the baseline. The evaluation view (:func:`eval_augmenter`) is the whole image, normalised: what the
evaluate stage, the served model and the ONNX export feed a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.data import DatasetMeta

__all__ = ["AUGMENT_VERSION", "PARAM_DIM", "AugmentSpec", "Augmenter", "Mix", "eval_augmenter", "in_batch_mix",
           "sample_lam", "train_augmenter"]

AUGMENT_VERSION = 1  # bump when the meaning of a parameter row or the resampling changes
PARAM_DIM = 5  # [top, left, height, width, flip]


@dataclass(frozen=True)
class Mix:
    """Mixup partners for a batch of views (Zhang et al. 2018): the model sees
    ``lam * view(image) + (1 - lam) * view(partner)``, pixel by pixel, after cropping and before normalising.

    Attributes:
        images: uint8 ``(B, C, H, W)``, each sample's partner image.
        labels: ``(B,)`` the partners' true classes (the label loss mixes with the same weights).
        params: ``(B, 5)`` the partners' own crop parameters.
        lam: float32 ``(B,)`` the weight of the sample itself, in [0, 1].
    """

    images: Tensor
    labels: Tensor
    params: Tensor
    lam: Tensor


def sample_lam(n: int, alpha: float, generator: torch.Generator) -> Tensor:
    """``n`` mixing weights from Beta(alpha, alpha), reproducible from ``generator`` (float32 ``(n,)``)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return torch.from_numpy(rng.beta(alpha, alpha, size=n)).float()


def in_batch_mix(images: Tensor, labels: Tensor, params: Tensor, alpha: float, generator: torch.Generator) -> Mix:
    """Pair every sample with the batch in reverse order (timm's pairing) with its own Beta(alpha, alpha) weight."""
    return Mix(images=images.flip(0), labels=labels.flip(0), params=params.flip(0),
               lam=sample_lam(images.shape[0], alpha, generator))


@dataclass(frozen=True)
class AugmentSpec:
    """Random-resized crop (area ``scale``, aspect ``ratio``) and optional horizontal flip."""

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: bool = False
    version: int = field(default=AUGMENT_VERSION)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "random_resized_crop", "scale": [float(v) for v in self.scale],
                "ratio": [float(v) for v in self.ratio], "hflip": bool(self.hflip), "version": int(self.version)}


class Augmenter:
    """Samples view parameters and renders views from them; also normalises.

    Args:
        spec: the augmentation.
        out_size: side of the rendered view (the model's input size).
        mean: per-channel mean of pixel values in [0, 1].
        std: per-channel std.
    """

    def __init__(self, *, spec: AugmentSpec, out_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.spec = spec
        self.out_size = int(out_size)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def sample(self, n: int, generator: torch.Generator, attempts: int = 10) -> Tensor:
        """Draw ``n`` parameter rows ``[top, left, height, width, flip]`` (fractions of the source side).

        torchvision's ``RandomResizedCrop`` rule, vectorised: up to ``attempts`` draws of (area, log-aspect) per
        image; the first that fits is used, else the whole image.
        """
        lo, hi = self.spec.scale
        log_r = torch.log(torch.tensor(self.spec.ratio, dtype=torch.float64))
        area = lo + (hi - lo) * torch.rand(n, attempts, generator=generator, dtype=torch.float64)
        aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(n, attempts, generator=generator,
                                                                         dtype=torch.float64))
        w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
        ok = (w <= 1.0) & (h <= 1.0)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        rows = torch.arange(n)
        w = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.ones(n, dtype=torch.float64))
        h = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.ones(n, dtype=torch.float64))
        pos = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        top, left = pos[:, 0] * (1.0 - h), pos[:, 1] * (1.0 - w)
        coin = torch.rand(n, generator=generator, dtype=torch.float64)
        flip = (coin < 0.5).double() if self.spec.hflip else torch.zeros(n, dtype=torch.float64)
        return torch.stack([top, left, h, w, flip], dim=1).float()  # (n, 5)

    @staticmethod
    def eval_params(n: int) -> Tensor:
        """The identity view (whole image, no flip) for ``n`` images."""
        return torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).expand(n, PARAM_DIM).clone()

    def render(self, images: Tensor, params: Tensor) -> Tensor:
        """Render views as float images in [0, 1], ``(B, C, out, out)``, without normalisation.

        Args:
            images: uint8 ``(B, C, H, W)`` (square).
            params: ``(B, 5)`` rows from :meth:`sample` / :meth:`eval_params`.
        """
        if params.ndim != 2 or params.shape != (images.shape[0], PARAM_DIM):
            raise ValueError(f"expected view parameters of shape ({images.shape[0]}, {PARAM_DIM}), "
                             f"got {tuple(params.shape)}")
        x = images.float().div_(255.0)
        p = params.to(device=x.device, dtype=torch.float32)
        # Identity rows are copied, not resampled: grid_sample at pixel centres is exact only up to ~3e-6, and a
        # row must render the same whether its batch is all-identity or mixed.
        same_size = x.shape[-1] == self.out_size
        rows_identity = (p == self.eval_params(1).to(p.device)).all(1) if same_size else None
        if rows_identity is not None and bool(rows_identity.all()):
            return x
        top, left, h, w, flip = p.unbind(1)
        # Map output coords in [-1, 1] to source coords (align_corners=False: [-1, 1] spans pixel edges).
        sx = w * (1.0 - 2.0 * flip)
        theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
        theta[:, 0, 0] = sx
        theta[:, 0, 2] = 2.0 * left + w - 1.0
        theta[:, 1, 1] = h
        theta[:, 1, 2] = 2.0 * top + h - 1.0
        grid = F.affine_grid(theta, [x.shape[0], x.shape[1], self.out_size, self.out_size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if rows_identity is not None and bool(rows_identity.any()):
            out[rows_identity] = x[rows_identity]
        return out

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, images: Tensor, params: Tensor, mix: Mix | None = None) -> Tensor:
        """Render and normalise: the model's input for the views ``params`` of ``images``, mixed with ``mix``."""
        x = self.render(images, params)
        if mix is not None:
            lam = mix.lam.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
            x = lam * x + (1.0 - lam) * self.render(mix.images.to(x.device), mix.params)
        return self.normalize(x)

    def describe(self) -> dict[str, Any]:
        """Everything that determines a rendered view (stored with soft labels, checked on replay)."""
        return {**self.spec.to_dict(), "out_size": self.out_size,
                "mean": [round(v, 6) for v in self.mean.flatten().tolist()],
                "std": [round(v, 6) for v in self.std.flatten().tolist()], "resample": "grid_sample-bilinear-border"}


def eval_augmenter(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Augmenter:
    """The evaluation view at ``image_size``: the whole image (:meth:`Augmenter.eval_params`), normalised with
    ``mean``/``std``. What the evaluate stage, the served model and the ONNX export feed a model."""
    return Augmenter(spec=AugmentSpec(), out_size=image_size, mean=mean, std=std)


def train_augmenter(augment: Any, meta: DatasetMeta) -> Augmenter:
    """The replayable training augmentation of the ``data.augment`` params (``scale``, ``ratio``, ``hflip``: the
    validated group or a stage's view of it) at the prepared data's image size and normalisation."""
    spec = AugmentSpec(scale=tuple(augment.scale), ratio=tuple(augment.ratio), hflip=augment.hflip)
    return Augmenter(spec=spec, out_size=meta.image_size, mean=meta.mean, std=meta.std)
