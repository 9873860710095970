"""DeiT's training losses (Touvron et al. 2021, "Training data-efficient image transformers &
distillation through attention", section 5 and ``facebookresearch/deit/losses.py``).

``total = (1 - alpha) * base + alpha * distill`` where

* ``base = CE(cls_logits, y)`` with label smoothing on the *true* labels only;
* hard distillation: ``distill = CE(dist_logits, argmax(teacher_logits))`` (no smoothing: the
  teacher's decision is the target, as in DeiT);
* soft distillation (Hinton et al. 2015): ``distill = KL(p_teacher^tau || p_student^tau) * tau**2``.

KL reduction, stated once because it changes the loss scale: **we use ``batchmean``** (sum over
classes and batch, divided by the batch size), which is the mathematically correct KL per sample
and what timm and most codebases use. DeiT's ``losses.py`` uses ``reduction='sum'`` divided by
``outputs_kd.numel()`` (batch x classes), i.e. DeiT's soft loss equals ours divided by the number
of classes. An ``alpha``/``tau`` tuned with DeiT's code therefore does not carry over unchanged:
for the same balance, scale DeiT's soft term by ``num_classes`` or lower ``alpha`` accordingly.
``tests/test_losses.py`` pins the value against a hand computation.

With ``mode='none'`` a model that returns ``(cls_logits, dist_logits)`` trains both heads on the
true labels (the average of the two cross entropies); a single-head model just gets the base CE.

A class-token-only student (``dist_token=False``, DeiT Table 3's "class token" rows) has one head, which takes
both terms: ``(1 - alpha) * CE(cls, y) + alpha * distill(cls, teacher)``. With hard distillation on unlabeled
images that is training on the teacher's pseudo-labels: the control that isolates what the distillation token
adds.

Averaging, stated because it changes what ``alpha`` means on a batch that mixes labeled and unlabeled images
(the unlabeled transfer set): the label term is averaged over the batch's *labeled* images only, the
distillation term over *all* of them. A labeled image therefore weighs ``(1 - alpha) / n_labeled`` in the label
term and ``alpha / B`` in the distillation term: with ``alpha = 0.9``, 8 labeled images in a batch of 64 give
each labeled image an effective ``0.9/64 / (0.1/8 + 0.9/64) = 0.53`` on the teacher, while an unlabeled image
learns from the teacher alone. ``alpha`` is the balance of the two *averages*, not of each image's two targets.
``tests/test_losses.py`` pins it.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DistillationLoss", "DistillMode", "soft_distillation_kl"]

DistillMode = Literal["none", "soft", "hard"]
ModelOutput = Union[Tensor, tuple[Tensor, Tensor]]


def soft_distillation_kl(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """Hinton's soft-target loss: ``KL(softmax(t/tau) || softmax(s/tau)) * tau**2``, batchmean.

    Args:
        student_logits: ``(B, C)`` logits of the distillation head.
        teacher_logits: ``(B, C)`` teacher logits for the same views.
        tau: temperature (> 0).

    Returns:
        Scalar loss, summed over classes and averaged over the batch.
    """
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (tau * tau)


class DistillationLoss(nn.Module):
    """Base classification loss plus optional hard or soft distillation through the dist head.

    Args:
        mode: ``'none'``, ``'soft'`` or ``'hard'``.
        alpha: weight of the distillation term; ``(1 - alpha)`` weighs the base CE.
        tau: temperature for soft distillation (ignored otherwise).
        label_smoothing: applied to the true-label CE only.
        dist_token: False for a class-token-only student, whose one head takes both terms.
    """

    def __init__(self, *, mode: DistillMode = "none", alpha: float = 0.5, tau: float = 1.0,
                 label_smoothing: float = 0.1, dist_token: bool = True) -> None:
        super().__init__()
        if mode not in ("none", "soft", "hard"):
            raise ValueError(f"distillation mode must be 'none', 'soft' or 'hard', got {mode!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.mode = mode
        self.alpha = alpha
        self.tau = tau
        self.label_smoothing = label_smoothing
        self.dist_token = dist_token

    @property
    def needs_teacher(self) -> bool:
        return self.mode != "none"

    def _label_ce(self, logits: Tensor, labels: Tensor, mix: Optional[tuple[Tensor, Tensor]]) -> Tensor:
        """Label-smoothed CE on the true labels; with mixup ``(partner_labels, lam)``, each sample's CE is
        ``lam * CE(y) + (1 - lam) * CE(y_partner)`` (the mixed target), averaged over the batch.

        Unlabeled images (label ``< 0``, the unlabeled transfer set) contribute no label term: the sum of the
        known terms is divided by their total weight (the batch size when every label is known).
        """
        smoothing = self.label_smoothing
        if mix is None and bool((labels >= 0).all()):
            return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
        terms = [(labels, torch.ones_like(labels, dtype=torch.float32))]
        if mix is not None:
            lam = mix[1].to(device=logits.device, dtype=torch.float32)
            terms = [(labels, lam), (mix[0].to(labels.device), 1.0 - lam)]
        total = weight = logits.new_zeros((), dtype=torch.float32)
        for target, w in terms:  # an unlabeled image (label < 0) adds no label term, and no weight
            w = w * (target >= 0)
            ce = F.cross_entropy(logits.float(), target.clamp(min=0), label_smoothing=smoothing, reduction="none")
            total, weight = total + (w * ce).sum(), weight + w.sum()
        return total / weight.clamp(min=1e-12)

    def forward(self, outputs: ModelOutput, labels: Tensor, teacher_logits: Optional[Tensor] = None,
                mix: Optional[tuple[Tensor, Tensor]] = None) -> dict[str, Tensor]:
        """Compute the loss.

        Args:
            outputs: a tensor ``(B, C)`` or a tuple ``(cls_logits, dist_logits)``.
            labels: ``(B,)`` true class indices.
            teacher_logits: ``(B, C)`` teacher outputs for the same augmented (and mixed) views (required
                unless ``mode == 'none'``).
            mix: for mixup views, ``(partner_labels (B,), lam (B,))``: the label terms use the mixed target.
                The distillation term needs nothing more: the teacher saw the same mixed image.

        Returns:
            ``{"loss", "base", "distill"}`` scalars (``distill`` is 0 with mode ``none``).
        """
        if self.mode == "none":
            if isinstance(outputs, tuple):
                base = sum(self._label_ce(o, labels, mix) for o in outputs) / len(outputs)
            else:
                base = self._label_ce(outputs, labels, mix)
            return {"loss": base, "base": base.detach(), "distill": torch.zeros((), device=base.device)}

        if isinstance(outputs, tuple) != self.dist_token or (isinstance(outputs, tuple) and len(outputs) != 2):
            got = "a single tensor" if not isinstance(outputs, tuple) else f"{len(outputs)} outputs"
            raise TypeError(
                f"distillation mode {self.mode!r} with dist_token={self.dist_token} needs a model that returns "
                + ("(cls_logits, dist_logits) in training mode (a DeiT with distilled=True, in train())"
                   if self.dist_token else "one tensor of logits (a class-token-only DeiT)")
                + f"; got {got}. Use distillation 'none' for a model without a distillation token, or set "
                "student.dist_token to match the model.")
        if teacher_logits is None:
            raise ValueError(f"distillation mode {self.mode!r} needs teacher logits for every batch")
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        if teacher_logits.shape != dist_logits.shape:
            raise ValueError(
                f"teacher logits have shape {tuple(teacher_logits.shape)} but the student's distillation "
                f"head gives {tuple(dist_logits.shape)}: teacher and student must agree on the number of classes"
            )
        base = self._label_ce(cls_logits, labels, mix)
        if self.mode == "soft":
            distill = soft_distillation_kl(dist_logits, teacher_logits, self.tau)
        else:
            distill = F.cross_entropy(dist_logits.float(), teacher_logits.argmax(dim=-1))
        loss = (1.0 - self.alpha) * base + self.alpha * distill
        return {"loss": loss, "base": base.detach(), "distill": distill.detach()}
