"""The student stage: DeiT with its distillation token, trained with DeiT's losses (none, soft or hard).

The distilled student trains on the transfer set: the labeled images, and the unlabeled ones if the data
stage kept them (only the distillation term applies to those). With ``student.teacher_mode: stored`` each
epoch replays one stored view per image from the soft-label store, so the student sees exactly the image the
teacher saw and no teacher runs in the loop; ``online`` runs the frozen teacher on every batch (DeiT's way).
Writes ``models/student.safetensors``, ``metrics/student.json`` and ``plots/student.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from distill.config import ParamsView, Paths
from distill.data import PreparedData, load_prepared
from distill.io import file_sha256
from distill.losses import DistillationLoss
from distill.stages._common import augmenter, build_student, train_and_save
from distill.store import SoftLabelStore, StoredViews
from distill.teachers import load_teacher
from distill.tracking import NO_TRACKING, Tracker
from distill.views import OnlineTeacher, RandomViews

__all__ = ["run"]


def _store_expectations(params: ParamsView, paths: Paths, data: PreparedData, num_images: int) -> dict[str, Any]:
    """What the soft-label store must have been made from: this teacher, this data, this augmentation."""
    meta = data.meta
    return {"teacher_sha256": file_sha256(paths.model("teacher")), "data_fingerprint": meta.fingerprint,
            "image_size": meta.image_size, "num_classes": meta.num_classes, "num_images": num_images,
            "augment": augmenter(params, meta).describe(), "mixup": params.student.train.mixup}


def run(params: ParamsView, paths: Paths, tracker: Tracker = NO_TRACKING, *,
        callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train the distilled student; returns its summary."""
    data = load_prepared(paths.data)
    sp = params.student
    recipe = sp.train.resolve()
    model, cfg, pretrained = build_student(sp.model, data.meta, paths, distilled=sp.dist_token, seed=params.seed,
                                           tracker=tracker)
    criterion = DistillationLoss(mode=sp.distillation, alpha=sp.alpha, tau=sp.tau,
                                 label_smoothing=recipe.label_smoothing, dist_token=sp.dist_token)
    inputs: list[Path] = [paths.data, *pretrained]
    if sp.distillation == "none":
        split = data.train
        views_factory = lambda aug, _acc: RandomViews(aug, mixup=recipe.mixup)  # noqa: E731
    elif sp.teacher_mode == "stored":
        split = data.transfer()  # the teacher labels the unlabeled images through the store
        store = SoftLabelStore.open(paths.soft_labels, expect=_store_expectations(params, paths, data, len(split)))
        views_factory = lambda _aug, _acc: StoredViews(store, seed=params.seed, split=split)  # noqa: E731
        inputs.append(paths.soft_labels)
    else:
        split = data.transfer()
        teacher, _ = load_teacher(paths.model("teacher"), data.meta)
        views_factory = lambda aug, acc: OnlineTeacher(teacher.to(acc.device), aug,  # noqa: E731
                                                       autocast=acc.autocast, mixup=recipe.mixup)
        inputs.append(paths.model("teacher"))
    return train_and_save(model, stage="student", kind="deit", config=cfg, params=params, recipe=recipe, data=data,
                          train_split=split, criterion=criterion, views_factory=views_factory, paths=paths,
                          tracker=tracker, inputs=inputs, callbacks=callbacks,
                          extra={"train_images": len(split), "labeled_images": len(data.train)})
