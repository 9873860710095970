"""The pipeline's stages as plain functions: the logic of each stage lives here once.

``data -> teacher -> soft_labels -> student``, ``data -> baseline``, then ``evaluate``. Each
function takes the validated :class:`~distill.config.Params`, a :class:`Paths` layout and a
:class:`~distill.tracking.Tracker`; it reads its inputs from files and writes its outputs to files,
so DVC can version them and Prefect flows only pass paths. Nothing here knows about Prefect, DVC
or a CLI: ``flows/`` wraps these, and ``bench/pipeline_overhead.py`` calls them directly.

Each stage writes its metrics to a JSON file (DVC ``metrics``) and per-epoch curves to a CSV
(DVC ``plots``) *before* logging them to MLflow, so a tracking outage loses nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from distill.checkpoint import atomic_write_json, atomic_write_text, file_sha256, load_model, save_model
from distill.config import STAGES, Params, Paths, TrainParams
from distill.tracking import NullTracker, Tracker

if TYPE_CHECKING:  # training modules are imported where used: the data stage does not depend on them
    from distill.losses import DistillationLoss

__all__ = ["Paths", "STAGES", "run_data", "run_teacher", "run_soft_labels", "run_student", "run_baseline",
           "run_evaluate", "stage_params"]


def stage_params(params: Params, stage: str) -> dict[str, Any]:
    """The parameters a stage reads (what it logs, and what keys its resume state)."""
    p = params.model_dump(mode="json")
    sections = {
        "data": ["data"],
        "teacher": ["data", "teacher"],
        "soft_labels": ["data", "soft_labels"],
        "student": ["data", "student"],
        "baseline": ["data", "student", "baseline"],
        "evaluate": ["data", "evaluate"],
    }[stage]
    out: dict[str, Any] = {"seed": p["seed"]}
    for s in sections:
        out[s] = p[s]
    if stage == "baseline":  # the student's model and recipe, and whether it trains on the unlabeled images too
        out["student"] = {k: p["student"][k] for k in ("model", "train", "distillation")}
    if stage == "soft_labels":  # the store's views are mixed as the student's recipe says
        out["student"] = {"train": {"mixup": p["student"]["train"]["mixup"]}}
    return out


def _key(obj: Any, *files: Path) -> str:
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode())
    for f in files:
        if f.is_file():
            h.update(file_sha256(f).encode())
        elif f.is_dir():
            meta = f / "meta.json"
            if meta.is_file():
                h.update(meta.read_bytes())
    return h.hexdigest()[:16]


def _write_curves(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    keys = list(history[0].keys())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for rec in history:
        writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items()})
    atomic_write_text(path, buf.getvalue())


def _augmenter(params: Params, meta: Any) -> Any:
    from distill.data import Augmenter, AugmentSpec

    a = params.data.augment
    spec = AugmentSpec(scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip)
    return Augmenter(spec=spec, out_size=meta.image_size, mean=meta.mean, std=meta.std)


def _load_data(paths: Paths) -> Any:
    from distill.data import load_prepared

    return load_prepared(paths.data)


def _datasets(data: Any, train: Any = None) -> tuple[Any, Any]:
    """Training and validation sets; ``train``: another training split (the student's transfer split)."""
    from distill.data import ArrayDataset

    return ArrayDataset(data.train if train is None else train), ArrayDataset(data.val)


def _train(model: torch.nn.Module, *, stage: str, kind: str, config: dict[str, Any], params: Params,
           train_params: TrainParams, data: Any, paths: Paths, criterion: DistillationLoss, views_factory: Any,
           tracker: Tracker, key: str, accelerator: Any = None, train_split: Any = None) -> dict[str, Any]:
    """Shared by teacher, baseline and student: fit with the one engine, then write curves, checkpoint and metrics.

    The resume state lives in ``paths.state(stage, key)`` (outside DVC's outputs) until the outputs are written.

    Returns:
        The stage summary (last epoch's losses and accuracy, mean throughput, training time).
    """
    from distill.engine import SupervisedTask, discard_state, fit, make_accelerator

    accelerator = accelerator or make_accelerator(grad_accum=train_params.grad_accum)
    augmenter = _augmenter(params, data.meta)
    views = views_factory(augmenter, accelerator)
    task = SupervisedTask(model=model, augmenter=augmenter, criterion=criterion, views=views)
    train_set, val_set = _datasets(data, train_split)

    def log_epoch(rec: dict[str, float]) -> None:
        tracker.log_metrics({k: v for k, v in rec.items() if k != "epoch"}, step=int(rec["epoch"]))

    tracker.log_dataset(name=data.meta.name, digest=data.meta.fingerprint, source=f"file://{paths.data.resolve()}",
                        context="train")
    state_dir = paths.state(stage, key)
    result = fit(task, train_set=train_set, val_set=val_set, params=train_params, seed=params.seed,
                 accelerator=accelerator, state_dir=state_dir, on_epoch_end=log_epoch, desc=stage)
    summary = _fit_summary(result.history)
    if accelerator.is_main_process:
        _write_curves(paths.curves(stage), result.history)
        tracker.log_artifact(paths.curves(stage), "curves")
        save_model(paths.model(stage), result.model, kind=kind, config=config,
                   extra=_extra(params, data.meta, stage, summary))
        atomic_write_json(paths.metrics(stage), summary)
        tracker.log_metrics({f"final_{k}": v for k, v in summary.items()})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # the outputs are written: the resume state is no longer needed
        discard_state(state_dir)
    return summary


def _fit_summary(history: list[dict[str, float]]) -> dict[str, float]:
    last = history[-1]
    out = {k: last[k] for k in ("train_loss", "val_acc", "val_loss") if k in last}
    out["epochs"] = last["epoch"]
    out["train_images_per_sec"] = sum(h["train_images_per_sec"] for h in history) / len(history)
    out["train_time_s"] = sum(h["epoch_time_s"] for h in history)
    return out


# --------------------------------------------------------------------------------------------- data
def run_data(params: Params, paths: Paths, tracker: Tracker = NullTracker()) -> dict[str, Any]:
    """Materialise the dataset as versioned arrays with a fixed, seeded train/val/test split."""
    from distill.data import prepare_dataset, save_prepared

    d = params.data
    t0 = time.perf_counter()
    data = prepare_dataset(d.name, root=d.root, image_size=d.image_size, val_fraction=d.val_fraction,
                           test_fraction=d.test_fraction, seed=params.seed, download=d.download,
                           max_per_class=d.max_per_class, unlabeled=d.unlabeled)
    save_prepared(data, paths.data)
    meta = data.meta
    metrics = {"num_train": len(data.train.labels), "num_unlabeled": len(data.unlabeled.labels),
               "num_val": len(data.val.labels), "num_test": len(data.test.labels),
               "num_classes": meta.num_classes, "image_size": meta.image_size, "time_s": time.perf_counter() - t0}
    atomic_write_json(paths.metrics("data"), {**metrics, "fingerprint": meta.fingerprint})
    tracker.log_metrics(metrics)
    tracker.log_dict(meta.to_dict(), "dataset_meta.json")
    tracker.log_dataset(name=d.name, digest=meta.fingerprint, source=f"file://{paths.data.resolve()}", context="prepared")
    return {**metrics, "fingerprint": meta.fingerprint}


# ------------------------------------------------------------------------------------------ teacher
def _teacher_config(params: Params, meta: Any) -> dict[str, Any]:
    t = params.teacher
    cfg: dict[str, Any] = {"arch": t.arch, "num_classes": meta.num_classes, "in_chans": meta.channels}
    if t.arch == "resnet_small":
        cfg.update(width=t.width, blocks=t.blocks)
    return cfg


def run_teacher(params: Params, paths: Paths, tracker: Tracker = NullTracker(), accelerator: Any = None) -> dict[str, Any]:
    """Train the CNN teacher with the one engine (labels only)."""
    from distill.checkpoint import build_model
    from distill.engine import RandomViews
    from distill.losses import DistillationLoss
    from distill.teachers import load_pretrained

    data = _load_data(paths)
    cfg = _teacher_config(params, data.meta)
    model = build_model("teacher", cfg, seed=params.seed)
    if params.teacher.pretrained_path:
        info = load_pretrained(model, params.teacher.pretrained_path)
        tracker.log_dict(info, "pretrained_load.json")
    tp = params.teacher.train
    crit = DistillationLoss(mode="none", label_smoothing=tp.label_smoothing)
    key = _key(stage_params(params, "teacher"), paths.data)
    return _train(model, stage="teacher", kind="teacher", config=cfg, params=params, train_params=tp, data=data,
                  paths=paths, criterion=crit, views_factory=lambda aug, _acc: RandomViews(aug, mixup=tp.mixup),
                  tracker=tracker, key=key, accelerator=accelerator)


def _extra(params: Params, meta: Any, stage: str, summary: dict[str, float]) -> dict[str, Any]:
    return {"stage": stage, "image_size": meta.image_size, "mean": meta.mean, "std": meta.std,
            "num_classes": meta.num_classes, "class_names": meta.class_names, "data_fingerprint": meta.fingerprint,
            "params": stage_params(params, stage), "metrics": summary}


def load_teacher(paths: Paths, meta: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the trained teacher and check it fits the current dataset (classes, channels)."""
    model, info = load_model(paths.model("teacher"))
    n = info["config"].get("num_classes")
    if n != meta.num_classes:
        raise ValueError(f"teacher checkpoint {paths.model('teacher')} has {n} classes but dataset {meta.name!r} has "
                         f"{meta.num_classes}: retrain the teacher on this dataset (`dvc repro teacher`)")
    return model, info


# ------------------------------------------------------------------------------------- soft labels
def _store_expectations(paths: Paths, params: Params, meta: Any, num_images: int) -> dict[str, Any]:
    """What a soft-label store must have been generated from for the current teacher, data and augmentation."""
    return {"teacher_sha256": file_sha256(paths.model("teacher")), "data_fingerprint": meta.fingerprint,
            "image_size": meta.image_size, "num_classes": meta.num_classes, "num_images": num_images,
            "augment": _augmenter(params, meta).describe(), "mixup": params.student.train.mixup}


def run_soft_labels(params: Params, paths: Paths, tracker: Tracker = NullTracker(), accelerator: Any = None) -> dict[str, Any]:
    """Run the frozen teacher once over K augmented views of every training image and store the results."""
    from distill.engine import make_accelerator
    from distill.soft_labels import describe_store, generate_store

    data = _load_data(paths)
    teacher, _ = load_teacher(paths, data.meta)
    accelerator = accelerator or make_accelerator()
    teacher.to(accelerator.device)
    s = params.soft_labels
    t0 = time.perf_counter()
    transfer = data.transfer()  # the labeled training images, then the unlabeled ones (if kept)
    meta = generate_store(teacher, transfer, _augmenter(params, data.meta), out_dir=paths.soft_labels, views=s.views,
                          topk=s.topk, dtype=s.dtype, batch_size=s.batch_size, seed=params.seed,
                          teacher_sha256=file_sha256(paths.model("teacher")), data_fingerprint=data.meta.fingerprint,
                          accelerator=accelerator, mixup=params.student.train.mixup)
    elapsed = time.perf_counter() - t0
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        desc = describe_store(paths.soft_labels)
        n_views = len(transfer) * s.views
        metrics = {"views_per_sec": n_views / max(elapsed, 1e-9), "time_s": elapsed,
                   **{k: v for k, v in desc.items() if isinstance(v, (int, float))}}
        atomic_write_json(paths.metrics("soft_labels"), metrics)
        tracker.log_metrics(metrics)
        tracker.log_dict(meta.to_dict() if hasattr(meta, "to_dict") else dict(meta), "soft_label_store_meta.json")
    accelerator.wait_for_everyone()
    return metrics


# ---------------------------------------------------------------------------------- student / baseline
def _student_config(params: Params, meta: Any, *, distilled: bool) -> dict[str, Any]:
    from distill.models.deit import PRESETS, DeiTConfig

    m = params.student.model
    if m.preset not in PRESETS:
        raise ValueError(f"student.model.preset {m.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    cfg = {**PRESETS[m.preset].to_dict(), **m.overrides(), "img_size": meta.image_size, "in_chans": meta.channels,
           "num_classes": meta.num_classes, "distilled": distilled}
    try:
        return DeiTConfig.from_dict(cfg).to_dict()
    except ValueError as err:
        raise ValueError(f"student.model: {err} (data.image_size={meta.image_size})") from None


def run_student(params: Params, paths: Paths, tracker: Tracker = NullTracker(), accelerator: Any = None) -> dict[str, Any]:
    """Train the DeiT student with its distillation token (DeiT's hard/soft/none losses)."""
    from distill.checkpoint import build_model
    from distill.engine import OnlineTeacher, RandomViews
    from distill.losses import DistillationLoss

    data = _load_data(paths)
    sp = params.student
    cfg = _student_config(params, data.meta, distilled=True)
    model = build_model("deit", cfg, seed=params.seed)
    crit = DistillationLoss(mode=sp.distillation, alpha=sp.alpha, tau=sp.tau, label_smoothing=sp.train.label_smoothing)
    extra_inputs: list[Path] = [paths.data]
    transfer = data.transfer() if sp.distillation != "none" else data.train  # the teacher labels the unlabeled

    if sp.distillation == "none":
        views_factory = lambda aug, _acc: RandomViews(aug, mixup=sp.train.mixup)  # noqa: E731
    elif sp.teacher_mode == "stored":
        from distill.soft_labels import SoftLabelStore, StoredViews

        store = SoftLabelStore.open(paths.soft_labels,
                                    expect=_store_expectations(paths, params, data.meta, len(transfer)))
        views_factory = lambda aug, _acc: StoredViews(store, seed=params.seed, split=transfer)  # noqa: E731
        extra_inputs.append(paths.soft_labels)
    else:
        teacher, _ = load_teacher(paths, data.meta)
        views_factory = lambda aug, acc: OnlineTeacher(teacher.to(acc.device), aug, autocast=acc.autocast,  # noqa: E731
                                                       mixup=sp.train.mixup)
        extra_inputs.append(paths.model("teacher"))
    key = _key(stage_params(params, "student"), *extra_inputs)
    return _train(model, stage="student", kind="deit", config=cfg, params=params, train_params=sp.train, data=data,
                  paths=paths, criterion=crit, views_factory=views_factory, tracker=tracker, key=key,
                  accelerator=accelerator, train_split=transfer)


def baseline_recipe(params: Params, n_labeled: int, n_transfer: int) -> TrainParams:
    """The student's recipe for the baseline, with the same budget.

    The distilled student trains on ``n_transfer`` images per epoch (the labeled ones and, with
    ``data.unlabeled``, the unlabeled ones), the baseline on the ``n_labeled`` labeled ones. With
    ``baseline.budget: steps`` the baseline's epochs and warm-up epochs are scaled by ``n_transfer / n_labeled``
    (rounded), so both get as many optimizer steps and the same schedule in steps; ``epochs`` keeps them.
    """
    sp = params.student
    if params.baseline.budget == "epochs" or sp.distillation == "none" or n_transfer <= n_labeled:
        return sp.train
    scale = n_transfer / n_labeled
    return sp.train.model_copy(update={"epochs": max(1, round(sp.train.epochs * scale)),
                                       "warmup_epochs": round(sp.train.warmup_epochs * scale)})


def run_baseline(params: Params, paths: Paths, tracker: Tracker = NullTracker(), accelerator: Any = None) -> dict[str, Any]:
    """The same student, same recipe and budget, trained on labels only (what distillation is measured against)."""
    from distill.checkpoint import build_model
    from distill.engine import RandomViews
    from distill.losses import DistillationLoss

    data = _load_data(paths)
    sp = params.student
    cfg = _student_config(params, data.meta, distilled=params.baseline.dist_token)
    model = build_model("deit", cfg, seed=params.seed)
    crit = DistillationLoss(mode="none", label_smoothing=sp.train.label_smoothing)
    key = _key(stage_params(params, "baseline"), paths.data)
    train = baseline_recipe(params, len(data.train), len(data.train) + len(data.unlabeled))
    return _train(model, stage="baseline", kind="deit", config=cfg, params=params, train_params=train, data=data,
                  paths=paths, criterion=crit, views_factory=lambda aug, _acc: RandomViews(aug, mixup=sp.train.mixup),
                  tracker=tracker, key=key, accelerator=accelerator)


# ---------------------------------------------------------------------------------------- evaluate
def run_evaluate(params: Params, paths: Paths, tracker: Tracker = NullTracker()) -> dict[str, Any]:
    """Teacher, baseline and distilled student side by side on the test split (see distill/evaluate_stage.py)."""
    from distill.evaluate_stage import evaluate_all

    return evaluate_all(params, paths, tracker)
