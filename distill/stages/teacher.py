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

from typing import Any, Sequence

from torch.utils.data import DataLoader

from distill.config import ParamsView, Paths
from distill.data import ArrayDataset, DatasetMeta, load_prepared
from distill.engine import evaluate, make_accelerator
from distill.losses import DistillationLoss
from distill.stages._common import augmenter, build_seeded, checkpoint_extra, log_runtime, save_outputs, train_and_save
from distill.teachers import build_teacher, load_teacher_weights
from distill.tracking import NO_TRACKING, Tracker
from distill.views import RandomViews
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


def run(params: ParamsView, paths: Paths, tracker: Tracker = NO_TRACKING, *,
        callbacks: Sequence[Any] = ()) -> dict[str, Any]:
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
    if recipe.epochs == 0:
        return _as_it_is(model, cfg, params, data, paths, tracker)
    criterion = DistillationLoss(mode="none", label_smoothing=recipe.label_smoothing)
    return train_and_save(model, stage="teacher", kind="teacher", config=cfg, params=params, recipe=recipe, data=data,
                          criterion=criterion, views_factory=lambda aug, _acc: RandomViews(aug, mixup=recipe.mixup),
                          paths=paths, tracker=tracker, inputs=inputs, callbacks=callbacks)


def _as_it_is(model: Any, cfg: dict[str, Any], params: ParamsView, data: Any, paths: Paths,
              tracker: Tracker) -> dict[str, Any]:
    """``teacher.train.epochs: 0``: no training; measure the teacher on the validation split and save it."""
    accelerator = make_accelerator()
    log_runtime(tracker, accelerator)
    model = model.to(accelerator.device)
    loader = accelerator.prepare(DataLoader(ArrayDataset(data.val), batch_size=256, shuffle=False))
    val = evaluate(model, loader, accelerator, augmenter(params, data.meta))
    summary = {"val_acc": val["acc"], "val_loss": val["loss"], "epochs": 0, "steps": 0, "warmup_steps": 0,
               "train_time_s": 0.0}
    if accelerator.is_main_process:
        save_outputs(paths, "teacher", history=[{"epoch": 0, "val_acc": val["acc"], "val_loss": val["loss"]}],
                     model=model.cpu(), kind="teacher", config=cfg, summary=summary,
                     extra=checkpoint_extra(params, data.meta, "teacher", summary, used_as_is=True))
        tracker.log_metrics({f"final_{k}": v for k, v in summary.items()})
    accelerator.wait_for_everyone()
    return summary
