"""The baseline stage: the same student trained on labels only, what distillation is measured against.

Same DeiT (without the distillation token unless ``baseline.dist_token``), same augmentation, label smoothing,
drop path and batch size as the student, on the labeled images (unlabeled ones have no labels to learn from).
It may have its own learning rate and weight decay (``baseline.lr``, ``baseline.weight_decay``; null: the
student's), tuned with the same search budget as the student's recipe (docs/benchmarks.md).

Budget (``baseline.budget``): ``steps`` gives it exactly the student's optimizer steps and warm-up steps,
whatever the batch size, ``drop_last``, gradient accumulation and process count. The student's epoch is its
transfer set (labeled and unlabeled images); the baseline's epoch draws as many samples from the labeled images
(one fresh permutation after another, :class:`distill.engine.EpochSampler`), so both run the same epochs of the
same number of steps, with the same schedule, and their curves line up epoch by epoch. ``epochs`` gives it the
student's epochs over the labeled images alone (DeiT's protocol). Writes ``models/baseline.safetensors``,
``metrics/baseline.json`` and ``plots/baseline.csv``.
"""

from __future__ import annotations

from typing import Any

from distill.augment import train_augmenter
from distill.config import ParamsView, Paths, TrainParams
from distill.data import PreparedData, load_prepared
from distill.runtime import log_runtime, make_accelerator
from distill.stages._student_model import build_student
from distill.stages._training import Training, labels_only_task
from distill.tracking import NO_TRACKING, Tracker

__all__ = ["run", "student_epoch"]


def student_epoch(params: ParamsView, data: PreparedData) -> int:
    """How many images the student's epoch holds: its transfer set (the unlabeled images too, when it distils)."""
    return len(data.train) + (len(data.unlabeled) if params.student.distillation != "none" else 0)


def _recipe(params: ParamsView) -> TrainParams:
    """The student's recipe with the baseline's own learning rate and weight decay, where it has them."""
    b = params.baseline
    own = {k: v for k, v in (("lr", b.lr), ("weight_decay", b.weight_decay)) if v is not None}
    return params.student.train.resolve().model_copy(update=own)


def run(params: ParamsView, paths: Paths, tracker: Tracker = NO_TRACKING) -> dict[str, Any]:
    """Train the labels-only baseline; returns its summary (with its step counts)."""
    data = load_prepared(paths.data)
    sp = params.student
    recipe = _recipe(params)
    model, cfg, pretrained = build_student(sp.model, data.meta, paths, distilled=params.baseline.dist_token,
                                           seed=params.seed, tracker=tracker)
    per_epoch = student_epoch(params, data) if params.baseline.budget == "steps" else None
    accelerator = make_accelerator(grad_accum=recipe.grad_accum)
    log_runtime(tracker, accelerator)
    task = labels_only_task(model, train_augmenter(params.data.augment, data.meta), recipe)
    training = Training("baseline", params, paths, tracker)
    result = training.fit(task, recipe=recipe, train=data.train, data=data, accelerator=accelerator,
                          inputs=[paths.data, *pretrained], samples_per_epoch=per_epoch)
    return training.save(result, kind="deit", config=cfg, meta=data.meta, accelerator=accelerator,
                         extra={"train_images": len(data.train), "labeled_images": len(data.train),
                                "samples_per_epoch": per_epoch or len(data.train), "budget": params.baseline.budget})
