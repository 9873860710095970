"""What the training stages share: the augmentation, the student's config, one fit, then the stage's outputs.

The teacher, the baseline and the student all train through :func:`train_and_save`: the one engine
(:func:`distill.engine.fit`) with a task that differs only in its criterion and its view source, then the
per-epoch curves (DVC plots), the self-describing checkpoint and the metrics (DVC metrics), each written
atomically *before* anything goes to MLflow, so a tracking outage loses nothing.

Resume: the engine saves its full state after every epoch under ``.state/<stage>/<key>/`` (outside DVC's
outputs). The key fingerprints everything the result depends on: the stage's declared parameters, its input
files, the library's code, the number of processes and the precision. A rerun after any of them changed
starts fresh instead of resuming state another configuration made.

Outputs: the curves, the checkpoint and the metrics are replaced as one set (:func:`save_outputs`), so a failed
write (a full disk) leaves all three as they were. The resume state is then marked finished and kept until DVC has
recorded the outputs (:mod:`distill.stages.runner`): a rerun with the same key writes them again from the last
epoch's state, without training.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from distill.augment import Augmenter, AugmentSpec
from distill.checkpoint import checkpoint_writer
from distill.config import ParamsView, Paths, TrainParams
from distill.data import ArrayDataset, DatasetMeta, PreparedData, Split
from distill.engine import SupervisedTask, fit, make_accelerator
from distill.io import file_sha256, json_text, replace_together
from distill.losses import DistillationLoss
from distill.models.deit import DeiT
from distill.models.deit_config import DeiTConfig, student_config
from distill.models.deit_pretrained import load_pretrained_deit
from distill.stages.runner import mark_finished
from distill.tracking import Tracker
from distill.weights import pretrained_file

__all__ = ["augmenter", "build_seeded", "build_student", "resume_key", "train_and_save",
           "curves_text", "save_outputs", "code_fingerprint", "checkpoint_extra", "WALL_CLOCK",
           "without_wall_clock", "log_runtime"]

ViewsFactory = Callable[[Augmenter, Any], Any]


def augmenter(params: ParamsView, meta: DatasetMeta) -> Augmenter:
    """The replayable training augmentation of ``data.augment``, at the data's size and normalisation."""
    a = params.data.augment
    spec = AugmentSpec(scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip)
    return Augmenter(spec=spec, out_size=meta.image_size, mean=meta.mean, std=meta.std)


def build_student(model: ParamsView, meta: DatasetMeta, paths: Paths, *, distilled: bool, seed: int,
                  tracker: Tracker) -> tuple[nn.Module, dict[str, Any], list[Path]]:
    """A DeiT for this dataset, started from ``student.model.pretrained_path`` when one is set.

    Returns:
        The model, its config, and the weights file it started from (a resume-key input), if any.
    """
    cfg = student_config(model, image_size=meta.image_size, channels=meta.channels, num_classes=meta.num_classes,
                         distilled=distilled)
    net = build_seeded(lambda: DeiT(DeiTConfig.from_dict(cfg)), seed)
    if not model.pretrained_path:
        return net, cfg, []
    weights = pretrained_file(paths, "student", model.pretrained_path)
    tracker.log_dict(load_pretrained_deit(net, weights), "pretrained_load.json")
    return net, cfg, [weights]


def build_seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with its initialisation drawn from ``seed``, leaving the global RNG as it was. Without it the
    initialisation depends on whatever the global RNG holds, and two processes with the same params would train
    different models."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def log_runtime(tracker: Tracker, accelerator: Any) -> None:
    """What accelerate runs the stage on, as params of its MLflow run: the process count and the precision change
    the steps and the learning rate (``scale_lr``), the device the speed, yet none of them is in ``params.yaml``."""
    tracker.log_params({"runtime": {"num_processes": accelerator.num_processes,
                                    "mixed_precision": str(accelerator.mixed_precision),
                                    "device": str(accelerator.device),
                                    "distributed_type": str(accelerator.distributed_type.value)}})


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over the library's source files (a code fix must not resume state the old code made)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def resume_key(values: dict[str, Any], inputs: Sequence[Path], accelerator: Any) -> str:
    """The resume-state key: declared params, input files, code, process count and precision."""
    h = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode())
    for f in inputs:
        if f.is_file():
            h.update(file_sha256(f).encode())
        elif (f / "meta.json").is_file():  # prepared data and the store: their meta.json hashes their content
            h.update((f / "meta.json").read_bytes())
    h.update(code_fingerprint().encode())
    h.update(f"processes={accelerator.num_processes};precision={accelerator.mixed_precision}".encode())
    return h.hexdigest()[:16]


#: Wall-clock figures of an epoch record and of a stage's summary: they differ from run to run, so they go to the
#: metrics file and MLflow only, never into a checkpoint or the curves (DVC deps downstream), where they would make
#: identical weights look like new outputs and rerun everything after them.
WALL_CLOCK = frozenset({"epoch_time_s", "train_images_per_sec", "train_time_s"})


def without_wall_clock(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its :data:`WALL_CLOCK` figures."""
    return {k: v for k, v in record.items() if k not in WALL_CLOCK}


def curves_text(history: list[dict[str, float]]) -> str:
    """The per-epoch curves (DVC plots) as CSV, without wall-clock figures: the same training gives the same file."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(without_wall_clock(history[0])) if history else [])
    writer.writeheader()
    for rec in history:
        writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in without_wall_clock(rec).items()})
    return buf.getvalue()


def save_outputs(paths: Paths, stage: str, *, history: list[dict[str, float]], model: nn.Module, kind: str,
                 config: dict[str, Any], extra: dict[str, Any], summary: dict[str, Any]) -> list[Path]:
    """A training stage's outputs, replaced as one set: ``plots/<stage>.csv``, the checkpoint, ``metrics/<stage>.json``.

    Returns:
        The three files.
    """
    writes = {paths.curves(stage): _text(curves_text(history)),
              paths.model(stage): checkpoint_writer(model, kind=kind, config=config, extra=extra),
              paths.metrics(stage): _text(json_text(summary))}
    replace_together(writes)
    return list(writes)


def _text(text: str) -> Callable[[str], None]:
    return lambda tmp: Path(tmp).write_text(text)


def _summary(result: Any) -> dict[str, Any]:
    history = result.history
    last = history[-1]
    out: dict[str, Any] = {k: last[k] for k in ("train_loss", "val_acc", "val_loss") if k in last}
    out.update(epochs=int(last["epoch"]), steps=int(result.steps), warmup_steps=int(result.warmup_steps),
               train_images_per_sec=sum(h["train_images_per_sec"] for h in history) / len(history),
               train_time_s=sum(h["epoch_time_s"] for h in history))
    return out


def checkpoint_extra(params: ParamsView, meta: DatasetMeta, stage: str, summary: dict[str, Any],
                     **more: Any) -> dict[str, Any]:
    """What a checkpoint records besides its weights: the data it fits, the stage's params and metrics (timings
    aside: identical weights give an identical file)."""
    return {"stage": stage, "image_size": meta.image_size, "mean": meta.mean, "std": meta.std,
            "num_classes": meta.num_classes, "class_names": meta.class_names, "data_fingerprint": meta.fingerprint,
            "params": params.declared(), "metrics": without_wall_clock(summary), **more}


def train_and_save(model: nn.Module, *, stage: str, kind: str, config: dict[str, Any], params: ParamsView,
                   recipe: TrainParams, data: PreparedData, criterion: DistillationLoss, views_factory: ViewsFactory,
                   paths: Paths, tracker: Tracker, inputs: Sequence[Path], train_split: Optional[Split] = None,
                   samples_per_epoch: Optional[int] = None, callbacks: Sequence[Any] = (),
                   extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Fit ``model`` with the one engine, then write curves, checkpoint and metrics; returns the summary.

    Args:
        stage: the stage's name (outputs ``models/<stage>.safetensors``, ``metrics/<stage>.json``,
            ``plots/<stage>.csv``; resume state ``.state/<stage>/<key>``).
        kind / config: how the checkpoint rebuilds the model (its kind's loader, :mod:`distill.checkpoint`).
        params: the stage's parameter view (its declared values go into the checkpoint and the resume key).
        recipe: the training recipe.
        data: the prepared data; ``train_split`` replaces its training split (the student's transfer set).
        criterion / views_factory: what differs between the three trainings (``views_factory(aug, accelerator)``).
        inputs: the files the result depends on besides params and code (for the resume key).
        samples_per_epoch: images drawn per epoch (default: the training split's size), the step-matched
            baseline's epoch as long as the student's (:class:`distill.engine.EpochSampler`).
        callbacks: engine callbacks (tests inject faults through them).
        extra: more checkpoint metadata.
    """
    accelerator = make_accelerator(grad_accum=recipe.grad_accum)
    log_runtime(tracker, accelerator)
    aug = augmenter(params, data.meta)
    task = SupervisedTask(model=model, augmenter=aug, criterion=criterion, views=views_factory(aug, accelerator))
    train = data.train if train_split is None else train_split
    tracker.log_dataset(name=data.meta.label, digest=data.meta.fingerprint, source=f"file://{paths.data.resolve()}",
                        context="train")
    state_dir = paths.state(stage, resume_key(params.declared(), inputs, accelerator))
    result = fit(task, train_set=ArrayDataset(train), val_set=ArrayDataset(data.val), params=recipe,
                 seed=params.seed, accelerator=accelerator, state_dir=state_dir, desc=stage,
                 on_epoch_end=lambda rec: tracker.log_metrics({k: v for k, v in rec.items() if k != "epoch"},
                                                            step=int(rec["epoch"])),
                 samples_per_epoch=samples_per_epoch, callbacks=callbacks)
    summary = _summary(result)
    if accelerator.is_main_process:
        outputs = save_outputs(paths, stage, history=result.history, model=result.model, kind=kind, config=config,
                               extra=checkpoint_extra(params, data.meta, stage, summary, **(extra or {})),
                               summary=summary)
        mark_finished(state_dir, paths, outputs)  # kept until dvc.lock records these outputs
        tracker.log_artifact(paths.curves(stage), "curves")
        tracker.log_metrics({f"final_{k}": v for k, v in summary.items()})
    accelerator.wait_for_everyone()
    return summary
