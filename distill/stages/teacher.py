"""The teacher stage: train the CNN teacher, fine-tune a pretrained one, or take one exactly as it is.

DeiT (Touvron et al. 2021, Table 2) found a convnet teacher gives a better transformer student than a
transformer of the same accuracy, through the inductive bias it passes on. ``teacher.arch`` is the built-in
``resnet_small``, a torchvision model name or ``timm/<name>``; ``teacher.pretrained_path`` a local weights
file. With ``teacher.train.epochs: 0`` the weights are used exactly as they are (every tensor must fit) and
the stage only checks them on the validation split; otherwise the teacher trains, labels only, with the one
engine. A teacher trained elsewhere may expect its own normalisation and input size (``teacher.mean``,
``teacher.std``, ``teacher.input_size``): the checkpoint then holds an input adapter that turns the
pipeline's images into what the teacher was trained on.

Writes ``models/teacher.safetensors``, ``metrics/teacher.json`` and ``plots/teacher.csv``.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from distill.augment import Augmenter, train_augmenter
from distill.config import ParamsView, Paths
from distill.data import ArrayDataset, DatasetMeta, PreparedData, load_prepared
from distill.engine import FitResult
from distill.inference import evaluate
from distill.runtime import log_runtime, make_accelerator
from distill.stages._training import Training, build_seeded, labels_only_task
from distill.teachers import build_teacher, load_teacher_weights
from distill.tracking import NO_TRACKING, Tracker
from distill.weights import pretrained_file

__all__ = ["run", "teacher_config"]


def teacher_config(t: ParamsView, meta: DatasetMeta) -> dict[str, Any]:
    """What rebuilds the teacher: architecture, classes, channels, and its input adapter if it needs one."""
    cfg: dict[str, Any] = {"arch": t.arch, "num_classes": meta.num_classes, "in_chans": meta.channels}
    if t.arch == "resnet_small":
        cfg.update(width=t.width, blocks=t.blocks)
    mean, std, size = t.mean, t.std, t.input_size
    if mean is not None or size is not None:
        cfg["input"] = {"data_mean": list(meta.mean), "data_std": list(meta.std),
                        "mean": list(mean if mean is not None else meta.mean),
                        "std": list(std if std is not None else meta.std), "size": size}
    return cfg


def run(params: ParamsView, paths: Paths, tracker: Tracker = NO_TRACKING) -> dict[str, Any]:
    """Train (or fine-tune, or take as it is) the teacher; returns its summary."""
    data = load_prepared(paths.data)
    t = params.teacher
    cfg = teacher_config(t, data.meta)
    model = build_seeded(lambda: build_teacher(**cfg), params.seed)
    recipe = t.train.resolve()
    inputs = [paths.data]
    if t.pretrained_path:
        weights = pretrained_file(paths, "teacher", t.pretrained_path)
        tracker.log_dict(load_teacher_weights(model, weights, strict=recipe.epochs == 0), "pretrained_load.json")
        inputs.append(weights)
    accelerator = make_accelerator(grad_accum=recipe.grad_accum)
    log_runtime(tracker, accelerator)
    augmenter = train_augmenter(params.data.augment, data.meta)
    training = Training("teacher", params, paths, tracker)
    if recipe.epochs == 0:
        result, extra = _as_it_is(model, data, augmenter, accelerator), {"used_as_is": True}
    else:
        result, extra = training.fit(labels_only_task(model, augmenter, recipe), recipe=recipe, train=data.train,
                                     data=data, accelerator=accelerator, inputs=inputs), None
    return training.save(result, kind="teacher", config=cfg, meta=data.meta, accelerator=accelerator, extra=extra)


def _as_it_is(model: Any, data: PreparedData, augmenter: Augmenter, accelerator: Any) -> FitResult:
    """``teacher.train.epochs: 0``: no training; the teacher measured on the validation split, as one record."""
    model = model.to(accelerator.device)
    loader = accelerator.prepare(DataLoader(ArrayDataset(data.val), batch_size=256, shuffle=False))
    val = evaluate(model, loader, accelerator, augmenter)
    return FitResult(model=model.cpu(), history=[{"epoch": 0, "val_acc": val["acc"], "val_loss": val["loss"]}])
