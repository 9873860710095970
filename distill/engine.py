"""The one training engine, on accelerate, used for the teacher, the baseline and the student.

What differs between those runs lives in a small *task* object (timm's ``timm/task`` idea): the
task turns a batch into ``{"loss", "logits", ...}``. :func:`fit` is the standard accelerate loop
(``prepare`` / ``accumulate`` / ``backward`` / ``clip_grad_norm_`` / ``gather_for_metrics`` /
``save_state``) with no branch on what is being trained.

Determinism and resume: every random draw is a function of ``(seed, epoch, step, process)``.
Shuffling uses :class:`EpochSampler` (a permutation seeded by ``seed + epoch``), augmentation
parameters come from a generator seeded per step (:meth:`StepContext.generator`), and the global
RNGs (dropout, DropPath) are re-seeded at every epoch start. A run resumed from the state saved at
the end of epoch ``k`` therefore replays epochs ``k+1 ...`` exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from distill.config import TrainParams
from distill.losses import DistillationLoss

__all__ = [
    "StepContext",
    "Task",
    "SupervisedTask",
    "RandomViews",
    "OnlineTeacher",
    "EpochSampler",
    "NonFiniteLossError",
    "FitResult",
    "make_accelerator",
    "build_optimizer",
    "warmup_cosine",
    "fit",
    "predict",
    "evaluate",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


@dataclass(frozen=True)
class StepContext:
    """Where a training step is: used to derive its random draws statelessly."""

    seed: int
    epoch: int
    step: int
    process_index: int = 0

    def generator(self, stream: int = 0) -> torch.Generator:
        """A CPU generator that depends only on (seed, epoch, step, process, stream)."""
        g = torch.Generator()
        g.manual_seed(hash((self.seed, self.epoch, self.step, self.process_index, stream)) & 0x7FFF_FFFF_FFFF)
        return g


class ViewSource(Protocol):
    def __call__(self, batch: dict[str, Tensor], ctx: StepContext) -> tuple[Tensor, Optional[Tensor]]:
        """Return augmentation params ``(B, 5)`` for the batch and teacher logits ``(B, C)`` or None."""


class RandomViews:
    """Fresh random augmentation parameters per step; no teacher."""

    def __init__(self, augmenter: Any) -> None:
        self.augmenter = augmenter

    def __call__(self, batch: dict[str, Tensor], ctx: StepContext) -> tuple[Tensor, Optional[Tensor]]:
        return self.augmenter.sample(batch["image"].shape[0], ctx.generator()), None


class OnlineTeacher:
    """DeiT's way: the frozen teacher runs on the student's own augmented batch at every step.

    The teacher is not a submodule of anything ``accelerate.prepare`` wraps: DDP never syncs it and
    ``student.train()`` cannot flip its BatchNorm layers back to training mode.
    """

    def __init__(self, teacher: nn.Module, augmenter: Any, *, autocast: Callable[[], Any] | None = None) -> None:
        from distill.teachers import freeze

        self.teacher = freeze(teacher)
        self.augmenter = augmenter
        self.autocast = autocast

    def __call__(self, batch: dict[str, Tensor], ctx: StepContext) -> tuple[Tensor, Optional[Tensor]]:
        images = batch["image"]
        params = self.augmenter.sample(images.shape[0], ctx.generator())
        device = next(self.teacher.parameters()).device
        if device != images.device:
            self.teacher.to(images.device)
        with torch.no_grad(), (self.autocast() if self.autocast else _nullcontext()):
            logits = self.teacher(self.augmenter(images, params.to(images.device))).float()
        return params, logits


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class Task(Protocol):
    model: nn.Module
    augmenter: Any

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]: ...


class SupervisedTask:
    """Augment the batch with the views' params, run the model, apply the criterion.

    The teacher, the baseline and the student differ only in the arguments: the criterion (mode
    ``none`` / ``soft`` / ``hard``) and where views and teacher logits come from
    (:class:`RandomViews`, :class:`OnlineTeacher`, or the soft-label store's replay).

    Args:
        model: the trainable model.
        augmenter: a :class:`distill.data.Augmenter` (replayable crops + normalisation).
        criterion: a :class:`~distill.losses.DistillationLoss`.
        views: a view source returning ``(params, teacher_logits or None)``.
    """

    def __init__(self, *, model: nn.Module, augmenter: Any, criterion: DistillationLoss, views: ViewSource) -> None:
        self.model = model
        self.augmenter = augmenter
        self.criterion = criterion
        self.views = views

    def training_step(self, batch: dict[str, Tensor], ctx: StepContext) -> dict[str, Tensor]:
        params, teacher_logits = self.views(batch, ctx)
        images = batch["image"]
        x = self.augmenter(images, params.to(images.device))
        out = self.model(x)
        if teacher_logits is not None:
            teacher_logits = teacher_logits.to(x.device)
        losses = self.criterion(out, batch["label"], teacher_logits)
        return {**losses, "logits": out[0] if isinstance(out, tuple) else out}


class EpochSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on ``(seed, epoch)`` (exact resume, DDP-safe)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def make_accelerator(*, grad_accum: int = 1, cpu: Optional[bool] = None) -> Any:
    """Create the :class:`accelerate.Accelerator`.

    Precision, device and process count come from ``accelerate launch`` / ``accelerate config`` /
    the environment (``ACCELERATE_MIXED_PRECISION``, ``ACCELERATE_USE_CPU``), never from params.
    """
    from accelerate import Accelerator

    if cpu is None:
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return Accelerator(gradient_accumulation_steps=grad_accum, cpu=cpu)


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
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: Optional[int] = None


def _latest_state(state_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    best: tuple[int, Optional[Path], Optional[dict]] = (-1, None, None)
    if not state_dir.is_dir():
        return None, None
    for d in state_dir.glob("epoch_*"):
        meta_file = d / "distill_state.json"
        if not meta_file.is_file():  # incomplete (crashed mid-save): ignore
            continue
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if meta["epoch"] > best[0]:
            best = (meta["epoch"], d, meta)
    return best[1], best[2]


def _save_state(accelerator: Any, state_dir: Path, epoch: int, history: list[dict]) -> Path:
    """Save full training state for ``epoch`` atomically: write to a temp dir, then rename."""
    final = state_dir / f"epoch_{epoch:05d}"
    tmp = state_dir / f".tmp_epoch_{epoch:05d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "distill_state.json").write_text(json.dumps({"epoch": epoch, "history": history}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in state_dir.glob("epoch_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _progress(iterable: Any, *, total: int, desc: str, enabled: bool) -> Any:
    if not enabled or os.environ.get("DISTILL_PROGRESS", "1") == "0":
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5, file=sys.stderr)


def fit(
    task: Task,
    *,
    train_set: Dataset,
    val_set: Optional[Dataset],
    params: TrainParams,
    seed: int,
    accelerator: Any = None,
    state_dir: str | Path | None = None,
    on_epoch_end: Optional[Callable[[dict[str, float]], None]] = None,
    desc: str = "train",
    num_workers: int = 0,
    stop_after_steps: Optional[int] = None,
) -> FitResult:
    """Train ``task.model`` with the standard accelerate loop.

    Args:
        task: turns a batch into ``{"loss", "logits", ...}``.
        train_set / val_set: datasets yielding ``{"image", "label", "index"}`` (uint8 images).
        params: the training recipe (epochs, batch size, lr, warm-up, clipping, accumulation ...).
        seed: global seed; all randomness derives from it.
        accelerator: an :class:`accelerate.Accelerator`; one is made from the environment if None.
        state_dir: where full training state is saved every epoch and resumed from. ``None``: no resume.
        on_epoch_end: called on the main process with each epoch's record (e.g. MLflow logging).
        desc: progress-bar label.
        num_workers: DataLoader workers.
        stop_after_steps: testing hook: raise ``KeyboardInterrupt`` after this many optimizer steps.

    Returns:
        :class:`FitResult` with the unwrapped trained model and per-epoch history.

    Raises:
        NonFiniteLossError: NaN/inf loss (names epoch and step; the last good state is kept).
    """
    from accelerate.utils import set_seed

    accelerator = accelerator or make_accelerator(grad_accum=params.grad_accum)
    sampler = EpochSampler(len(train_set), seed)
    loader = DataLoader(train_set, batch_size=params.batch_size, sampler=sampler, drop_last=len(train_set) > params.batch_size,
                        num_workers=num_workers)
    lr = params.lr * (accelerator.num_processes * params.grad_accum if params.scale_lr else 1)
    optimizer = build_optimizer(task.model, lr=lr, weight_decay=params.weight_decay)
    model, optimizer, loader = accelerator.prepare(task.model, optimizer, loader)
    task.model = model
    val_loader = None
    if val_set is not None:
        val_loader = accelerator.prepare(DataLoader(val_set, batch_size=max(params.batch_size, 256), shuffle=False,
                                                    num_workers=num_workers))

    steps_per_epoch = max(1, len(loader) // params.grad_accum)
    total_steps = steps_per_epoch * params.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps=params.warmup_epochs * steps_per_epoch, total_steps=total_steps,
                                           min_ratio=params.min_lr / params.lr))
    # Not passed to prepare(): accelerate would step it num_processes times per step. Registered so
    # save_state/load_state carry it.
    accelerator.register_for_checkpointing(scheduler)

    history: list[dict[str, float]] = []
    start_epoch, resumed = 0, None
    state_path = Path(state_dir) if state_dir is not None else None
    if state_path is not None:
        latest, meta = _latest_state(state_path)
        if latest is not None and meta is not None:
            accelerator.load_state(str(latest))
            history = meta["history"]
            start_epoch = resumed = meta["epoch"] + 1
            accelerator.print(f"[{desc}] resuming from {latest} (epochs 0..{meta['epoch']} done)")

    global_step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, params.epochs):
        set_seed(seed * 1009 + epoch, device_specific=True)
        # accelerate's DataLoaderShard keeps its own epoch counter and forwards it to the sampler on
        # iteration; set it explicitly so the order depends on the epoch alone (also after a resume).
        loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else sampler.set_epoch(epoch)
        model.train()
        t0, seen, sums, n_batches = time.perf_counter(), 0, {"loss": 0.0, "base": 0.0, "distill": 0.0}, 0
        bar = _progress(loader, total=len(loader), desc=f"{desc} {epoch + 1}/{params.epochs}", enabled=accelerator.is_local_main_process)
        for i, batch in enumerate(bar):
            ctx = StepContext(seed=seed, epoch=epoch, step=i, process_index=accelerator.process_index)
            with accelerator.accumulate(model):
                out = task.training_step(batch, ctx)
                loss = out["loss"]
                if not torch.isfinite(loss.detach()).all():
                    raise NonFiniteLossError(
                        f"[{desc}] loss is {loss.item()} at epoch {epoch + 1}, step {i + 1}; stopped. "
                        + (f"The last good training state (end of epoch {start_epoch if resumed else epoch}) is kept in {state_path}. "
                           if state_path else "")
                        + "Lower the learning rate, enable grad_clip, or check the inputs for NaNs.")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if params.grad_clip:
                        accelerator.clip_grad_norm_(model.parameters(), params.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                    global_step += 1
                optimizer.zero_grad(set_to_none=True)
            seen += batch["image"].shape[0]
            n_batches += 1
            for k in sums:
                if k in out:
                    sums[k] += float(out[k].detach())
            if hasattr(bar, "set_postfix") and i % 5 == 0:
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{sums['loss'] / n_batches:.4f}", img_s=f"{seen * accelerator.num_processes / max(elapsed, 1e-9):.0f}")
            if stop_after_steps is not None and global_step >= stop_after_steps:
                raise KeyboardInterrupt(f"stop_after_steps={stop_after_steps} reached")
        elapsed = time.perf_counter() - t0
        record: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": sums["loss"] / max(n_batches, 1),
            "train_base_loss": sums["base"] / max(n_batches, 1),
            "train_distill_loss": sums["distill"] / max(n_batches, 1),
            "lr": scheduler.get_last_lr()[0],
            "train_images_per_sec": seen * accelerator.num_processes / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
        }
        if val_loader is not None:
            record.update({f"val_{k}": v for k, v in evaluate(model, val_loader, accelerator, task.augmenter).items()})
        history.append(record)
        if accelerator.is_main_process:
            msg = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch")
            accelerator.print(f"[{desc}] epoch {epoch + 1}/{params.epochs} {msg}")
            if on_epoch_end is not None:
                on_epoch_end(record)
        if state_path is not None:
            _save_state(accelerator, state_path, epoch, history)

    accelerator.wait_for_everyone()
    return FitResult(model=accelerator.unwrap_model(model), history=history, resumed_from_epoch=resumed)


@torch.no_grad()
def predict(forward: Callable[[Tensor], Any], loader: DataLoader, accelerator: Any, augmenter: Any) -> dict[str, Any]:
    """Run ``forward`` on the eval view of every sample and gather results across processes.

    Args:
        forward: maps a normalised batch to a tensor or a tuple of tensors (e.g. both DeiT heads).
        loader: a prepared DataLoader yielding ``{"image", "label", "index"}``.
        accelerator: the accelerator the loader was prepared with.
        augmenter: provides the eval view (full image) and normalisation.

    Returns:
        ``{"outputs": Tensor or tuple of Tensors (N, C), "labels": (N,), "index": (N,)}`` on CPU,
        duplicates from uneven sharding removed by ``gather_for_metrics``.
    """
    outs: list[Any] = []
    labels, index = [], []
    for batch in loader:
        images = batch["image"]
        x = augmenter(images, augmenter.eval_params(images.shape[0]).to(images.device))
        out = forward(x)
        out = tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
        out, lab, idx = accelerator.gather_for_metrics((out, batch["label"], batch["index"]))
        outs.append(out)
        labels.append(lab.cpu())
        index.append(idx.cpu())
    if outs and isinstance(outs[0], tuple):
        outputs: Any = tuple(torch.cat([o[i] for o in outs]).cpu() for i in range(len(outs[0])))
    else:
        outputs = torch.cat(outs).cpu() if outs else torch.empty(0)
    return {"outputs": outputs, "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
            "index": torch.cat(index) if index else torch.empty(0, dtype=torch.long)}


def evaluate(model: nn.Module, loader: DataLoader, accelerator: Any, augmenter: Any) -> dict[str, float]:
    """Top-1 accuracy and cross-entropy of ``model`` (in eval mode) on ``loader``."""
    was_training = model.training
    model.eval()
    res = predict(model, loader, accelerator, augmenter)
    if was_training:
        model.train()
    logits, labels = res["outputs"], res["labels"]
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"acc": float((logits.argmax(-1) == labels).float().mean()) if len(labels) else float("nan"),
            "loss": float(torch.nn.functional.cross_entropy(logits, labels)) if len(labels) else float("nan")}
