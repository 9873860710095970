"""What the training stages share (teacher, student, baseline): one resumable fit, then the stage's outputs.

Each training stage builds what differs between them (its model, criterion, view source, recipe and accelerator)
and hands the task to a :class:`Training`: the one engine (:func:`distill.engine.fit`) with the stage's resume
state, then the per-epoch curves (DVC plots), the self-describing checkpoint and the metrics (DVC metrics), each
written atomically *before* anything goes to MLflow, so a tracking outage loses nothing. The soft-label stage trains
nothing and does not import this module (nor the engine).

Resume: the engine saves its full state after every epoch under ``.state/<stage>/<key>/`` (outside DVC's
outputs). The key fingerprints everything the result depends on (:func:`resume_key`): the stage's declared
parameters, its input files, the library's code, the number of processes and the precision. A rerun after any of
them changed starts fresh instead of resuming state another configuration made.

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
from typing import Any, Callable, Sequence

import torch
from torch import nn

from distill.augment import Augmenter
from distill.checkpoint import checkpoint_writer
from distill.config import ParamsView, Paths, TrainParams
from distill.data import ArrayDataset, DatasetMeta, PreparedData, Split
from distill.engine import FitResult, SupervisedTask, fit
from distill.io import file_sha256, json_text, replace_together
from distill.losses import DistillationLoss
from distill.stages.runner import mark_finished
from distill.tracking import Tracker
from distill.views import RandomViews

__all__ = ["WALL_CLOCK", "Training", "build_seeded", "checkpoint_extra", "code_fingerprint", "curves_text",
           "labels_only_task", "resume_key", "save_outputs", "without_wall_clock"]


def build_seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with its initialisation drawn from ``seed``, leaving the global RNG as it was. Without it the
    initialisation depends on whatever the global RNG holds, and two processes with the same params would train
    different models."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


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


def checkpoint_extra(params: ParamsView, meta: DatasetMeta, stage: str, summary: dict[str, Any],
                     **more: Any) -> dict[str, Any]:
    """What a checkpoint records besides its weights: the data it fits, the stage's params and metrics (timings
    aside: identical weights give an identical file)."""
    return {"stage": stage, "image_size": meta.image_size, "mean": meta.mean, "std": meta.std,
            "num_classes": meta.num_classes, "class_names": meta.class_names, "data_fingerprint": meta.fingerprint,
            "params": params.declared(), "metrics": without_wall_clock(summary), **more}


class _EpochMetrics:
    """The engine callback that logs each epoch's record to the stage's tracking run, at its epoch as the step."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_epoch_end(self, record: dict[str, float]) -> None:
        self.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))


def _summary(result: FitResult) -> dict[str, Any]:
    """A training's metrics: the last epoch's losses and accuracy, its step counts, its mean speed and time."""
    history = result.history
    last = history[-1]
    out: dict[str, Any] = {k: last[k] for k in ("train_loss", "val_acc", "val_loss") if k in last}
    out.update(epochs=int(last["epoch"]), steps=int(result.steps), warmup_steps=int(result.warmup_steps),
               train_time_s=sum((h.get("epoch_time_s", 0.0) for h in history), 0.0))
    speeds = [h["train_images_per_sec"] for h in history if "train_images_per_sec" in h]
    if speeds:  # none for a teacher used as it is
        out["train_images_per_sec"] = sum(speeds) / len(speeds)
    return out


def labels_only_task(model: nn.Module, augmenter: Augmenter, recipe: TrainParams) -> SupervisedTask:
    """Training on the labels alone (the teacher's, the baseline's): label-smoothed cross-entropy on fresh random
    views (with the recipe's mixup)."""
    return SupervisedTask(model=model, augmenter=augmenter,
                          criterion=DistillationLoss(mode="none", label_smoothing=recipe.label_smoothing),
                          views=RandomViews(augmenter, mixup=recipe.mixup))


class Training:
    """One training stage's run: :meth:`fit` its task with the engine, resumably, then :meth:`save` its outputs.

    Args:
        stage: the stage's name (outputs ``models/<stage>.safetensors``, ``metrics/<stage>.json``,
            ``plots/<stage>.csv``; resume state ``.state/<stage>/<key>``).
        params: the stage's parameter view (its declared values go into the checkpoint and the resume key).
        paths: the project layout.
        tracker: where the stage logs (each epoch's record, the final metrics, the curves).
    """

    def __init__(self, stage: str, params: ParamsView, paths: Paths, tracker: Tracker) -> None:
        self.stage, self.params, self.paths, self.tracker = stage, params, paths, tracker
        self.state_dir: Path | None = None

    def fit(self, task: SupervisedTask, *, recipe: TrainParams, train: Split, data: PreparedData, accelerator: Any,
            inputs: Sequence[Path], samples_per_epoch: int | None = None) -> FitResult:
        """Train ``task`` on ``train`` (validated on ``data.val``) with the stage's resume state.

        Args:
            task: the model, augmentation, criterion and view source the stage built.
            recipe: the training recipe.
            train: the training split (the student's transfer set, or ``data.train``).
            data: the prepared data (its validation split, and what is logged as the run's dataset).
            accelerator: the stage's accelerator (:func:`distill.runtime.make_accelerator`).
            inputs: the files the result depends on besides params and code (the resume key).
            samples_per_epoch: images drawn per epoch (default: the training split's size), the step-matched
                baseline's epoch as long as the student's (:class:`distill.engine.EpochSampler`).
        """
        meta = data.meta
        self.tracker.log_dataset(name=meta.label, digest=meta.fingerprint, source=f"file://{self.paths.data.resolve()}",
                                 context="train")
        self.state_dir = self.paths.state(self.stage, resume_key(self.params.declared(), inputs, accelerator))
        return fit(task, train_set=ArrayDataset(train), val_set=ArrayDataset(data.val), params=recipe,
                   seed=self.params.seed, accelerator=accelerator, state_dir=self.state_dir,
                   callbacks=[_EpochMetrics(self.tracker)], samples_per_epoch=samples_per_epoch,
                   desc=self.stage)

    def save(self, result: FitResult, *, kind: str, config: dict[str, Any], meta: DatasetMeta, accelerator: Any,
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the curves, the checkpoint and the metrics as one set, mark the resume state finished, log them.

        Args:
            result: what :meth:`fit` returned (or a model with a one-record history, for a teacher used as it is).
            kind / config: how the checkpoint rebuilds the model (its kind's loader, :mod:`distill.checkpoint`).
            meta: the data the model fits (recorded in the checkpoint).
            accelerator: the stage's accelerator (the main process writes).
            extra: more checkpoint metadata.

        Returns:
            The stage's summary (its metrics).
        """
        summary = _summary(result)
        if accelerator.is_main_process:
            outputs = save_outputs(self.paths, self.stage, history=result.history, model=result.model, kind=kind,
                                   config=config, summary=summary,
                                   extra=checkpoint_extra(self.params, meta, self.stage, summary, **(extra or {})))
            if self.state_dir is not None:
                mark_finished(self.state_dir, self.paths, outputs)  # kept until dvc.lock records these outputs
            self.tracker.log_artifact(self.paths.curves(self.stage), "curves")
            self.tracker.log_metrics({f"final_{k}": v for k, v in summary.items()})
        accelerator.wait_for_everyone()
        return summary
