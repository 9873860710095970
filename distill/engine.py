"""The one training engine, on accelerate, used for the teacher, the baseline and the student.

What differs between those runs lives in a small *task* object (timm's ``timm/task`` idea): the
task turns a batch into ``{"loss", "logits", ...}``, and its view source (:mod:`distill.views`) says
what the model sees and what the teacher said about it. :func:`fit` reads like DeiT's ``main.py``
loop: set up (optimizer, ``prepare``, schedule), :func:`resume_state`, then per epoch
:func:`train_one_epoch` (the standard accelerate loop: ``accumulate`` / ``backward`` /
``clip_grad_norm_``), :func:`~distill.inference.evaluate`, record, :func:`save_state`. No branch on what is trained.

Step budget: an epoch has ``ceil(batches / grad_accum)`` optimizer steps (accelerate also steps at the
end of the loader), see :func:`steps_per_epoch`. A run lasts ``epochs * steps_per_epoch`` optimizer steps, the
warm-up ``warmup_epochs * steps_per_epoch``; an epoch is ``samples_per_epoch`` samples (the step-matched
baseline's epoch is as long as the student's).

Determinism and resume: every random draw is a function of ``(seed, epoch, step, process)``.
Shuffling uses :class:`EpochSampler` (a permutation seeded by ``seed + epoch``), augmentation
parameters come from a generator seeded per step (:meth:`~distill.views.StepContext.generator`), and
the global RNGs (dropout, DropPath) are re-seeded at every epoch start. A run resumed from the state
saved at the end of epoch ``k`` therefore replays epochs ``k+1 ...`` exactly as an uninterrupted run
would. Across processes this also needs the model's *initialisation* seeded
(``build_model(..., seed=)``) and the same number of CPU threads (``OMP_NUM_THREADS``): reductions
split over a different number of threads round differently.

Crash safety (docs/reliability.md): the state of every finished epoch is written by
``accelerator.save_state`` into a staging folder that is ``fsync``-ed and renamed into place
(:func:`distill.io.staged_dir`), so a kill or a power cut leaves the previous epoch's state or the new
one, never half of one. Everything in it is read back without unpickling code: weights from
safetensors, optimizer and RNG states with ``torch.load(weights_only=True)``, the scheduler and the
history from JSON. A state folder that is there but unreadable is an error that names it, never a
silent restart. What a state belongs to is its folder: the caller keys it by everything the result depends
on (:func:`distill.stages._training.resume_key`).

Callbacks (:class:`Callback`) see every optimizer step and every epoch's record: the training stages log the
records to MLflow with one, and tests inject faults with others (raise, kill the process, block, or write NaN
into the weights after any optimizer step). Progress: one bar per :func:`fit` (optimizer steps); each epoch's
record goes to the ``distill.engine`` logger and to the callbacks' ``on_epoch_end``.

The accelerator comes from the caller (:func:`distill.runtime.make_accelerator`): the engine never decides what it
runs on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from distill.checkpoint import CheckpointError
from distill.config import TrainParams
from distill.inference import evaluate
from distill.io import atomic_write_text, discard_dir, progress, staged_dir
from distill.losses import DistillationLoss
from distill.views import StepContext, ViewSource, render

__all__ = [
    "Callback",
    "EpochSampler",
    "FitResult",
    "NonFiniteLossError",
    "ResumePoint",
    "StepInfo",
    "SupervisedTask",
    "Task",
    "build_optimizer",
    "discard_state",
    "fit",
    "loader_length",
    "resume_state",
    "save_state",
    "steps_per_epoch",
    "train_one_epoch",
    "warmup_cosine",
]

logger = logging.getLogger(__name__)
STATE_META = "distill_state.json"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


@dataclass(frozen=True)
class StepInfo:
    """What a :class:`Callback` sees after each optimizer step.

    Attributes:
        epoch: the epoch, from 0 (as :class:`~distill.views.StepContext`).
        step: the batch within the epoch that completed the step, from 0.
        global_step: optimizer steps done in the whole run, this one included (restored ones too).
        loss: that batch's loss.
        lr: the learning rate this step used.
        model: the model being trained, as ``accelerate.prepare`` wrapped it.
    """

    epoch: int
    step: int
    global_step: int
    loss: float
    lr: float
    model: nn.Module


class Callback(Protocol):
    """Hooks into :func:`fit`'s loop; each method is optional. ``on_step_end`` runs on every process (tests inject
    faults through it: raise an interrupt, kill the process, block, or write NaN into ``info.model``, which makes
    the next loss NaN); ``on_epoch_end`` on the main process only (e.g. MLflow logging)."""

    def on_step_end(self, info: StepInfo) -> None:
        """Called after each optimizer step; an exception stops training (the last saved state is kept)."""

    def on_epoch_end(self, record: dict[str, float]) -> None:
        """Called with each epoch's record (after a resume, first with the records of the restored epochs)."""


class Task(Protocol):
    """Turns a batch into ``{"loss", "logits", ...}``; what differs between teacher, baseline and student."""

    model: nn.Module
    augmenter: Any

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]: ...


class SupervisedTask:
    """Augment the batch with the views' params, run the model, apply the criterion.

    The teacher, the baseline and the student differ only in the arguments: the criterion (mode
    ``none`` / ``soft`` / ``hard``) and where views and teacher logits come from
    (:class:`~distill.views.RandomViews`, :class:`~distill.views.OnlineTeacher`, or
    :class:`~distill.views.StoredViews`, the soft-label store's replay).

    Args:
        model: the trainable model.
        augmenter: a :class:`distill.augment.Augmenter` (replayable crops + normalisation).
        criterion: a :class:`~distill.losses.DistillationLoss`.
        views: a :class:`~distill.views.ViewSource`.
    """

    def __init__(self, *, model: nn.Module, augmenter: Any, criterion: DistillationLoss, views: ViewSource) -> None:
        self.model = model
        self.augmenter = augmenter
        self.criterion = criterion
        self.views = views

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        params, teacher_logits, mix = self.views(batch, ctx)
        images = batch["image"]
        x = render(self.augmenter, images, params, mix)
        out = self.model(x)
        if teacher_logits is not None:
            teacher_logits = teacher_logits.to(x.device)
        losses = self.criterion(out, batch["label"], teacher_logits,
                                mix=None if mix is None else (mix.labels, mix.lam))
        return {**losses, "logits": out[0] if isinstance(out, tuple) else out}


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on ``(seed, epoch)`` (exact resume, DDP-safe).

    An epoch is ``length`` samples (default ``n``): one permutation of the ``n`` indices after another, each
    seeded by ``(seed, epoch, pass)``, cut at ``length``. So an epoch of a small set can take as many steps as
    an epoch of a larger one (the step-matched baseline), every image still seen as evenly as possible.
    """

    def __init__(self, n: int, seed: int, length: int | None = None) -> None:
        self.n = n
        self.seed = seed
        self.length = n if length is None else int(length)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order: list[int] = []
        for p in range(math.ceil(self.length / self.n) if self.n else 0):
            g = torch.Generator()
            g.manual_seed(self.seed * 100_003 + self.epoch + p * 1_000_000_007)  # pass 0: the plain epoch order
            order += torch.randperm(self.n, generator=g).tolist()
        return iter(order[:self.length])

    def __len__(self) -> int:
        return self.length


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norm weights, and the tokens / position embedding (as DeiT/timm)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained model, unwrapped from accelerate's wrappers.
        history: one record per epoch (restored ones included after a resume).
        resumed_from_epoch: the epochs restored from a saved state (None: started afresh).
        steps: optimizer steps done, in total.
        total_steps: the step budget (``epochs * steps_per_epoch``); ``steps`` equals it when the run finished.
        warmup_steps: the warm-up's length in optimizer steps.
        steps_per_epoch: optimizer steps in a full epoch.
        epochs: epochs run (the last one may be partial).
    """

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int | None = None
    steps: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    steps_per_epoch: int = 0
    epochs: int = 0


def _drop_last(num_samples: int, batch_size: int) -> bool:
    """The project's rule: drop a ragged last batch, unless the whole set fits in one batch."""
    return num_samples > batch_size


def loader_length(num_samples: int, batch_size: int, *, processes: int = 1) -> int:
    """Batches per process per epoch of :func:`fit`'s training loader, as ``accelerate.prepare`` shards it.

    One process: ``num_samples // batch_size`` (the ragged last batch is dropped when ``num_samples >
    batch_size``), else one batch. Several: accelerate deals whole batches round-robin; with ``drop_last``
    the incomplete last round is dropped (``floor(batches / processes)``), without it (a single batch) every
    process gets a batch (``even_batches``: ``ceil(batches / processes)``).
    """
    if _drop_last(num_samples, batch_size):
        return num_samples // batch_size // processes
    return math.ceil(math.ceil(num_samples / batch_size) / processes)


def steps_per_epoch(num_samples: int, batch_size: int, *, processes: int = 1, grad_accum: int = 1) -> int:
    """Optimizer steps per epoch: ``ceil(loader_length / grad_accum)``.

    accelerate's ``accumulate`` steps every ``grad_accum`` batches and also at the end of the loader
    (``sync_with_dataloader``), so a ragged group of batches still makes a step.
    """
    return math.ceil(loader_length(num_samples, batch_size, processes=processes) / grad_accum)


@dataclass(frozen=True)
class _Budget:
    steps_per_epoch: int
    epochs: int
    warmup_epochs: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return self.warmup_epochs * self.steps_per_epoch


def _budget(params: TrainParams, accelerator: Any, loader: DataLoader, num_samples: int) -> _Budget:
    """The run's step budget, checked against the prepared loader (a mismatch would mis-plan every caller)."""
    grad_accum = accelerator.gradient_accumulation_steps
    if grad_accum != params.grad_accum:
        raise ValueError(f"the accelerator accumulates {grad_accum} batches per step but params.grad_accum is "
                         f"{params.grad_accum}: make it with make_accelerator(grad_accum=params.grad_accum)")
    planned = loader_length(num_samples, params.batch_size, processes=accelerator.num_processes)
    if planned != len(loader):
        raise RuntimeError(f"accelerate gives {len(loader)} batches per process, loader_length() planned {planned}: "
                           "the sharding rule changed; fix loader_length")
    if planned == 0:
        raise ValueError(f"{num_samples} training images make no full batch of {params.batch_size} for each of "
                         f"{accelerator.num_processes} processes: lower batch_size")
    return _Budget(math.ceil(planned / grad_accum), params.epochs, params.warmup_epochs)


@dataclass(frozen=True)
class ResumePoint:
    """What :func:`resume_state` restored: the folder, the last finished epoch (from 0), the optimizer steps
    done and the history so far."""

    folder: Path
    epoch: int
    global_step: int
    history: list[dict[str, float]]


def _latest_state(state_dir: Path) -> tuple[Path | None, dict | None]:
    """The newest complete ``epoch_*`` folder and its metadata, or ``(None, None)``.

    A folder only gets its final name once fully written (see :func:`save_state`), and is renamed
    away before it is deleted (:func:`discard_state`), so a damaged ``epoch_*`` folder is an error
    naming it, not a silent restart. Leftovers of a kill (hidden ``.epoch_*`` staging folders, ``.trash_*``)
    are ignored, and so is an ``epoch_*`` folder with no metadata at all: what a plain ``rm -r`` killed
    midway leaves.
    """
    best: tuple[int, Path | None, dict | None] = (-1, None, None)
    if not state_dir.is_dir():
        return None, None
    for d in state_dir.glob("epoch_*"):
        if not (d / STATE_META).exists():
            logger.warning("ignoring incomplete resume state %s (no %s)", d, STATE_META)
            continue
        try:
            meta = json.loads((d / STATE_META).read_text())
            epoch = int(meta["epoch"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(_bad_state(d, f"{STATE_META} is missing or unreadable: {err}")) from None
        if epoch > best[0]:
            best = (epoch, d, meta)
    return best[1], best[2]


#: Delete a state folder so that a kill midway cannot leave a half-deleted ``epoch_*`` behind: renamed to a hidden
#: ``.trash_*`` sibling first (atomic), then removed (:func:`distill.io.discard_dir`).
discard_state = discard_dir


def _bad_state(folder: Path, why: str) -> str:
    return (f"resume state {folder} is corrupt or truncated ({why}). Delete it (`rm -r {folder.parent}`) to "
            "restart this stage from scratch; the stage's outputs are untouched.")


def save_state(accelerator: Any, state_dir: str | Path, *, epoch: int, history: list[dict[str, float]],
               scheduler: Any, global_step: int) -> Path:
    """Save the full training state at the end of ``epoch`` as ``epoch_<epoch>``, atomically and durably.

    accelerate writes model (safetensors), optimizer and RNG states into a staging folder; the scheduler (a
    JSON-able dict), the history and the step count go into ``distill_state.json``, so nothing needs
    unpickling on resume. The folder is then swapped in (:func:`distill.io.staged_dir`) and older states go.

    Args:
        accelerator: the accelerator of the run.
        state_dir: the run's state folder.
        epoch: the epoch just finished, from 0.
        history: every epoch's record so far.
        scheduler: the LR scheduler (its ``state_dict`` must be JSON-able).
        global_step: optimizer steps done.

    Returns:
        The new ``epoch_*`` folder.
    """
    state_dir = Path(state_dir)
    final = state_dir / f"epoch_{epoch:05d}"
    main = accelerator.is_main_process
    # "save": one staging name every process agrees on (one run per state folder)
    with staged_dir(final, "save", main=main, wait=accelerator.wait_for_everyone) as staging:
        accelerator.save_state(str(staging), safe_serialization=True)
        if main:
            meta = {"epoch": epoch, "global_step": global_step, "history": history,
                    "scheduler": scheduler.state_dict()}
            atomic_write_text(staging / STATE_META, json.dumps(meta))
    if main:
        _drop_other_states(state_dir, keep=final)
    accelerator.wait_for_everyone()
    return final


def _drop_other_states(state_dir: Path, *, keep: Path) -> None:
    """After a save: older ``epoch_*`` states and hidden leftovers of killed saves are no longer needed."""
    for old in state_dir.glob("epoch_*"):
        if old != keep:
            discard_state(old)
    for leftover in state_dir.glob(".epoch_*"):
        shutil.rmtree(leftover, ignore_errors=True)


def resume_state(accelerator: Any, state_dir: str | Path, scheduler: Any) -> ResumePoint | None:
    """Restore the newest complete ``epoch_*`` state in ``state_dir`` into the prepared objects.

    Args:
        accelerator: the accelerator the model and optimizer were prepared with.
        state_dir: the run's state folder (may not exist).
        scheduler: the LR scheduler, restored from the state's JSON.

    Returns:
        What was restored, or None when there is nothing to resume from.

    Raises:
        CheckpointError: the state is there but damaged; the message names it and how to recover.
    """
    folder, meta = _latest_state(Path(state_dir))
    if folder is None or meta is None:
        return None
    return _load_state(accelerator, folder, meta, scheduler)


def _load_state(accelerator: Any, folder: Path, meta: dict, scheduler: Any) -> ResumePoint:
    """Restore what :func:`save_state` wrote; any failure names the folder and how to recover."""
    try:
        accelerator.load_state(str(folder))  # accelerate loads with weights_only=True
        scheduler.load_state_dict(meta["scheduler"])
        return ResumePoint(folder, int(meta["epoch"]), int(meta["global_step"]), list(meta["history"]))
    except Exception as err:  # noqa: BLE001 - any reader failure means a damaged state folder
        raise CheckpointError(_bad_state(folder, f"{type(err).__name__}: {err}")) from None


def _begin_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Seed everything an epoch draws from by ``(seed, epoch)`` alone (also after a resume)."""
    from accelerate.utils import set_seed

    set_seed(seed * 1009 + epoch, device_specific=True)
    # accelerate's DataLoaderShard keeps its own epoch counter and forwards it to the sampler on
    # iteration; set it explicitly so the order depends on the epoch alone.
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    else:
        loader.sampler.set_epoch(epoch)


class _EpochMeter:
    """Loss sums, batches and images of one epoch on this process; :meth:`summary` reduces over processes."""

    def __init__(self) -> None:
        self.sums = {"loss": 0.0, "base": 0.0, "distill": 0.0}
        self.batches = 0
        self.images = 0
        self.t0 = time.perf_counter()

    def add(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> float:
        """Count one batch; returns its loss."""
        self.images += batch["image"].shape[0]
        self.batches += 1
        for k in self.sums:
            if k in out:
                self.sums[k] += float(out[k].detach())
        return float(out["loss"].detach())

    def summary(self, accelerator: Any, scheduler: Any) -> dict[str, float]:
        elapsed = time.perf_counter() - self.t0
        # Means over every process's batches (what one process would log), not the main process's alone.
        totals = torch.tensor([self.sums["loss"], self.sums["base"], self.sums["distill"], self.batches, self.images],
                              device=accelerator.device)
        loss_sum, base_sum, distill_sum, n_all, seen_all = accelerator.reduce(totals, reduction="sum").tolist()
        return {
            "train_loss": loss_sum / max(n_all, 1),
            "train_base_loss": base_sum / max(n_all, 1),
            "train_distill_loss": distill_sum / max(n_all, 1),
            "lr": scheduler.get_last_lr()[0],
            "train_images_per_sec": seen_all / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
        }


def _optimizer_step(accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any,
                    grad_clip: float | None) -> float | None:
    """Clip, step, schedule and zero the gradients; between accumulation boundaries accelerate's optimizer
    wrapper skips its step and zeroing, and this skips clipping and the schedule.

    Returns:
        The learning rate the step used, or None when this batch only accumulated gradients.
    """
    synced = accelerator.sync_gradients
    if synced and grad_clip:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    lr = None
    if synced:
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


@dataclass(frozen=True)
class _Loop:
    """What :func:`fit` prepared for every epoch: the optimizer and its schedule, the accelerator, the seed, the
    gradient clipping, the callbacks, the progress bar, and the run's name and state folder (for error messages)."""

    optimizer: Any
    scheduler: Any
    accelerator: Any
    seed: int
    grad_clip: float | None = None
    callbacks: Sequence[Callback] = ()
    bar: Any = None
    desc: str = "train"
    state_dir: Path | None = None


def train_one_epoch(task: Task, loader: DataLoader, loop: _Loop, *, epoch: int,
                    global_step: int = 0) -> tuple[dict[str, float], int]:
    """One pass over ``loader`` (DeiT's ``train_one_epoch``).

    Args:
        task: its ``model`` is the prepared model.
        loader: the prepared training loader.
        loop: what :func:`fit` prepared (optimizer and schedule, stepped once per optimizer step; accelerator, seed,
            clipping; callbacks, whose ``on_step_end`` runs after each optimizer step; the bar; the run's name).
        epoch: the epoch, from 0.
        global_step: optimizer steps done before this epoch.

    Returns:
        The epoch's training record (mean losses, lr, images per second, time) and the new ``global_step``.

    Raises:
        NonFiniteLossError: a NaN or infinite loss (names epoch, step and the last good state).
    """
    accelerator = loop.accelerator
    _begin_epoch(loader, loop.seed, epoch)
    model = task.model
    model.train()
    meter = _EpochMeter()
    for i, batch in enumerate(loader):
        ctx = StepContext(seed=loop.seed, epoch=epoch, step=i, process_index=accelerator.process_index)
        with accelerator.accumulate(model):
            out = task.training_step(batch, ctx)
            if not torch.isfinite(out["loss"].detach()).all():
                raise NonFiniteLossError(_non_finite_message(loop.desc, out["loss"], epoch, i, loop.state_dir))
            accelerator.backward(out["loss"])
            lr = _optimizer_step(accelerator, model, loop.optimizer, loop.scheduler, loop.grad_clip)
        loss = meter.add(out, batch)
        if lr is None:
            continue
        global_step += 1
        if loop.bar is not None:
            loop.bar.update(1)
        _call(loop.callbacks, "on_step_end",
              StepInfo(epoch=epoch, step=i, global_step=global_step, loss=loss, lr=lr, model=model))
    return meter.summary(accelerator, loop.scheduler), global_step


def _call(callbacks: Sequence[Callback], hook: str, arg: Any) -> None:
    """Each callback's ``hook`` (each one is optional) with ``arg``."""
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(arg)


def _non_finite_message(desc: str, loss: Tensor, epoch: int, step: int, state_path: Path | None) -> str:
    """Why training stopped, where (1-based epoch and step), and what is kept."""
    msg = f"[{desc}] loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; training stopped. "
    if state_path is not None and epoch > 0:
        kept = state_path / f"epoch_{epoch - 1:05d}"
        msg += (f"The last good training state (end of epoch {epoch}) is kept in {kept}; "
                "rerunning the stage resumes from it. ")
    elif state_path is not None:
        msg += "No epoch had finished, so there is no training state to resume from. "
    msg += ("Earlier outputs of the stage are untouched. Lower the learning rate, enable grad_clip, or check the "
            "inputs for NaNs.")
    return msg


def _prepare(task: Task, train_set: Dataset, val_set: Dataset | None, params: TrainParams, accelerator: Any, *,
             seed: int, samples_per_epoch: int | None) -> tuple[DataLoader, DataLoader | None, Any]:
    """Loaders and optimizer, prepared with ``task.model`` (which becomes the prepared model)."""
    sampler = EpochSampler(len(train_set), seed, length=samples_per_epoch)
    loader = DataLoader(train_set, batch_size=params.batch_size, sampler=sampler,
                        drop_last=_drop_last(len(sampler), params.batch_size))
    lr = params.lr * (accelerator.num_processes * params.grad_accum if params.scale_lr else 1)
    optimizer = build_optimizer(task.model, lr=lr, weight_decay=params.weight_decay)
    task.model, optimizer, loader = accelerator.prepare(task.model, optimizer, loader)
    val_loader = None
    if val_set is not None:
        val_loader = accelerator.prepare(DataLoader(val_set, batch_size=max(params.batch_size, 256), shuffle=False))
    return loader, val_loader, optimizer


def _scheduler(optimizer: Any, budget: _Budget, params: TrainParams) -> torch.optim.lr_scheduler.LambdaLR:
    # Not passed to prepare(): accelerate would step it num_processes times per step. Nor registered
    # for checkpointing: accelerate reloads registered objects with pickle (weights_only=False); its
    # state is a small dict that save_state keeps as JSON instead.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps=budget.warmup_steps, total_steps=budget.total_steps,
                                           min_ratio=params.min_lr / params.lr))


def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _report_epoch(record: dict[str, float], loop: _Loop, *, epochs: int) -> None:
    """An epoch's record to the bar's postfix, the ``distill.engine`` log and the callbacks (main process)."""
    epoch = int(record["epoch"])
    postfix = f"epoch={epoch}/{epochs} loss={record['train_loss']:.4f}"
    if "val_acc" in record:
        postfix += f" val_acc={record['val_acc']:.4f}"
    loop.bar.set_postfix_str(postfix)
    if not loop.accelerator.is_main_process:
        return
    logger.info("[%s] epoch %d/%d %s", loop.desc, epoch, epochs,
                " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "epoch"))
    _call(loop.callbacks, "on_epoch_end", record)


def _restore(loop: _Loop, *, epochs: int) -> ResumePoint | None:
    """:func:`resume_state`, then the restored epochs replayed to the callbacks' ``on_epoch_end``: a fresh tracking
    run gets the whole curve, not only the epochs after the crash."""
    accelerator = loop.accelerator
    resumed = None if loop.state_dir is None else resume_state(accelerator, loop.state_dir, loop.scheduler)
    if resumed is None:
        return None
    if accelerator.is_main_process:  # a warning: the terminal shows it too, not only the stage's log
        logger.warning("[%s] resuming from %s (epochs 1..%d of %d done)", loop.desc, resumed.folder,
                       resumed.epoch + 1, epochs)
        for record in resumed.history:
            _call(loop.callbacks, "on_epoch_end", record)
    return resumed


# Ten parameters, kept apart on purpose: what is trained (task, the two sets, the recipe, the seed), on what
# (accelerator), and the run's bookkeeping (state folder, callbacks, epoch length, name). Grouping them in a
# record would only hide what a caller must decide.
def fit(
    task: Task,
    *,
    train_set: Dataset,
    val_set: Dataset | None,
    params: TrainParams,
    seed: int,
    accelerator: Any,
    state_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    samples_per_epoch: int | None = None,
    desc: str = "train",
) -> FitResult:
    """Train ``task.model``: set up, resume, then per epoch train, evaluate, record and save the state.

    Args:
        task: turns a batch into ``{"loss", "logits", ...}``.
        train_set / val_set: datasets yielding ``{"image", "label", "index"}`` (uint8 images).
        params: the training recipe (epochs, batch size, lr, warm-up, clipping, accumulation ...).
        seed: global seed; all randomness derives from it.
        accelerator: an :class:`accelerate.Accelerator` accumulating ``params.grad_accum`` batches
            (:func:`distill.runtime.make_accelerator`).
        state_dir: where the full training state is saved every epoch and resumed from. ``None``: no resume.
        callbacks: see :class:`Callback`: ``on_step_end(StepInfo)`` after every optimizer step, ``on_epoch_end``
            with each epoch's record (main process; after a resume, first the restored epochs' records).
        samples_per_epoch: draw this many samples per epoch (default ``len(train_set)``), permutation after
            permutation: an epoch of a small set then has as many steps as one of a larger set.
        desc: the run's name, in the progress bar, the log and error messages.

    Returns:
        :class:`FitResult`: the unwrapped trained model, the per-epoch history and the step counts.

    Raises:
        NonFiniteLossError: NaN/inf loss (names epoch and step; the last good state is kept).
        CheckpointError: the resume state in ``state_dir`` is there but damaged (names it and how to recover).
        ValueError: an accelerator that accumulates another number of batches than ``params.grad_accum``, or a
            training set too small for one batch per process.
    """
    loader, val_loader, optimizer = _prepare(task, train_set, val_set, params, accelerator, seed=seed,
                                             samples_per_epoch=samples_per_epoch)
    budget = _budget(params, accelerator, loader, samples_per_epoch or len(train_set))
    loop = _Loop(optimizer=optimizer, scheduler=_scheduler(optimizer, budget, params), accelerator=accelerator,
                 seed=seed, grad_clip=params.grad_clip, callbacks=tuple(callbacks), desc=desc,
                 state_dir=None if state_dir is None else Path(state_dir))
    resumed = _restore(loop, epochs=budget.epochs)
    history = [] if resumed is None else resumed.history
    global_step = 0 if resumed is None else resumed.global_step
    with progress(total=budget.total_steps, initial=global_step, desc=desc, unit="step",
                  enabled=accelerator.is_local_main_process) as bar:
        loop = dataclasses.replace(loop, bar=bar)
        for epoch in range(0 if resumed is None else resumed.epoch + 1, budget.epochs):
            stats, global_step = train_one_epoch(task, loader, loop, epoch=epoch, global_step=global_step)
            record: dict[str, float] = {"epoch": epoch + 1, "steps": global_step, **stats}
            if val_loader is not None:
                record.update({f"val_{k}": v for k, v in evaluate(task.model, val_loader, accelerator,
                                                                  task.augmenter).items()})
            history.append(record)
            _report_epoch(record, loop, epochs=budget.epochs)
            if loop.state_dir is not None:
                save_state(accelerator, loop.state_dir, epoch=epoch, history=history, scheduler=loop.scheduler,
                           global_step=global_step)
    accelerator.wait_for_everyone()
    # Without DDP, the mixed-precision forward wrapper and torch.compile's wrapper (accelerate's dynamo
    # backend): a compiled module's state_dict would prefix every key with "_orig_mod.".
    model = accelerator.unwrap_model(task.model, keep_fp32_wrapper=False, keep_torch_compile=False)
    return FitResult(model=model, history=history, resumed_from_epoch=None if resumed is None else resumed.epoch + 1,
                     steps=global_step, total_steps=budget.total_steps, warmup_steps=budget.warmup_steps,
                     steps_per_epoch=budget.steps_per_epoch, epochs=budget.epochs)
