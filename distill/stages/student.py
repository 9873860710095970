"""The student stage: DeiT with its distillation token, trained with DeiT's losses (none, soft or hard).

The distilled student trains on the transfer set: the labeled images, and the unlabeled ones if the data
stage kept them (only the distillation term applies to those). With ``student.teacher_mode: stored`` each
epoch replays one stored view per image from the soft-label store, so the student sees exactly the image the
teacher saw and no teacher runs in the loop; ``online`` runs the frozen teacher on every batch (DeiT's way).
Writes ``models/student.safetensors``, ``metrics/student.json`` and ``plots/student.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.augment import Augmenter, train_augmenter
from distill.config import ParamsView, Paths
from distill.data import PreparedData, load_prepared
from distill.engine import SupervisedTask
from distill.io import file_sha256
from distill.losses import DistillationLoss
from distill.runtime import log_runtime, make_accelerator
from distill.stages._student_model import build_student
from distill.stages._training import Training
from distill.store import SoftLabelStore, StoredViews
from distill.teachers import load_teacher
from distill.tracking import NO_TRACKING, Tracker
from distill.views import OnlineTeacher, RandomViews, ViewSource

__all__ = ["run"]


def _store_expectations(params: ParamsView, paths: Paths, data: PreparedData, augmenter: Augmenter,
                        num_images: int) -> dict[str, Any]:
    """What the soft-label store must have been made from: this teacher, this data, this augmentation."""
    meta = data.meta
    return {"teacher_sha256": file_sha256(paths.model("teacher")), "data_fingerprint": meta.fingerprint,
            "image_size": meta.image_size, "num_classes": meta.num_classes, "num_images": num_images,
            "augment": augmenter.describe(), "mixup": params.student.train.mixup}


def run(params: ParamsView, paths: Paths, tracker: Tracker = NO_TRACKING) -> dict[str, Any]:
    """Train the distilled student; returns its summary."""
    data = load_prepared(paths.data)
    sp = params.student
    recipe = sp.train.resolve()
    model, cfg, pretrained = build_student(sp.model, data.meta, paths, distilled=sp.dist_token, seed=params.seed,
                                           tracker=tracker)
    criterion = DistillationLoss(mode=sp.distillation, alpha=sp.alpha, tau=sp.tau,
                                 label_smoothing=recipe.label_smoothing, dist_token=sp.dist_token)
    accelerator = make_accelerator(grad_accum=recipe.grad_accum)
    log_runtime(tracker, accelerator)
    augmenter = train_augmenter(params.data.augment, data.meta)
    # The teacher labels the unlabeled images too (through the store, or online): a distilled student's epoch is
    # the transfer set.
    split = data.train if sp.distillation == "none" else data.transfer()
    views, inputs = _view_source(params, paths, data, augmenter, accelerator, split)
    training = Training("student", params, paths, tracker)
    result = training.fit(SupervisedTask(model=model, augmenter=augmenter, criterion=criterion, views=views),
                          recipe=recipe, train=split, data=data, accelerator=accelerator,
                          inputs=[paths.data, *pretrained, *inputs])
    return training.save(result, kind="deit", config=cfg, meta=data.meta, accelerator=accelerator,
                         extra={"train_images": len(split), "labeled_images": len(data.train)})


def _view_source(params: ParamsView, paths: Paths, data: PreparedData, augmenter: Augmenter, accelerator: Any,
                 split: Any) -> tuple[ViewSource, list[Path]]:
    """Where the student's views (and the teacher's logits) come from, and the files that adds to the resume key:
    fresh random views (no distillation), the soft-label store's replay, or the frozen teacher on every batch."""
    sp = params.student
    mixup = sp.train.mixup
    if sp.distillation == "none":
        return RandomViews(augmenter, mixup=mixup), []
    if sp.teacher_mode == "stored":
        store = SoftLabelStore.open(paths.soft_labels,
                                    expect=_store_expectations(params, paths, data, augmenter, len(split)))
        return StoredViews(store, seed=params.seed, split=split), [paths.soft_labels]
    teacher, _ = load_teacher(paths.model("teacher"), data.meta)
    return (OnlineTeacher(teacher.to(accelerator.device), augmenter, autocast=accelerator.autocast, mixup=mixup),
            [paths.model("teacher")])
