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
Across processes this also needs the model's *initialisation* seeded (``build_model(..., seed=)``)
and the same number of CPU threads (``OMP_NUM_THREADS``): reductions split over a different number
of threads round differently.

Crash safety (docs/reliability.md): the state of every finished epoch is written by
``accelerator.save_state`` into a temporary folder that is renamed into place, so a kill leaves the
previous epoch's state or the new one, never half of one. Everything in it is read back without
unpickling code: weights from safetensors, optimizer and RNG states with ``torch.load(weights_only=True)``,
the scheduler and the history from JSON. A state folder that is there but unreadable is an error
that names it, never a silent restart.

Testing hook: ``DISTILL_FAULT=[<stage>:]<action>@<step>`` injects a fault when ``<step>`` optimizer
steps are done (see :func:`_fault`); it exists for ``tests/test_reliability*.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from distill.checkpoint import CheckpointError
from distill.config import TrainParams
from distill.data import Mix, in_batch_mix
from distill.losses import DistillationLoss

__all__ = [
    "StepContext",
    "Task",
    "SupervisedTask",
    "Views",
    "RandomViews",
    "OnlineTeacher",
    "EpochSampler",
    "NonFiniteLossError",
    "FitResult",
    "discard_state",
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


class Views(NamedTuple):
    """What a view source gives for a batch: each sample's crop, the teacher's logits for the exact input
    the model will see (None without a teacher), and the mixup partners (None without mixup)."""

    params: Tensor
    teacher_logits: Optional[Tensor] = None
    mix: Optional[Mix] = None


class ViewSource(Protocol):
    def __call__(self, batch: dict[str, Tensor], ctx: StepContext) -> Views:
        """Return the batch's views: crop params ``(B, 5)``, teacher logits ``(B, C)`` or None, mix or None."""


def _render(augmenter: Any, images: Tensor, params: Tensor, mix: Optional[Mix]) -> Tensor:
    """The model's input; an augmenter without mixup support is called as ``augmenter(images, params)``."""
    params = params.to(images.device)
    return augmenter(images, params) if mix is None else augmenter(images, params, mix)


def _random_views(augmenter: Any, batch: dict[str, Tensor], ctx: StepContext,
                  mixup: float) -> tuple[Tensor, Optional[Mix]]:
    images = batch["image"]
    params = augmenter.sample(images.shape[0], ctx.generator())
    mix = in_batch_mix(images, batch["label"], params, mixup, ctx.generator(1)) if mixup > 0 else None
    return params, mix


class RandomViews:
    """Fresh random augmentation parameters per step; no teacher.

    Args:
        augmenter: the :class:`distill.data.Augmenter`.
        mixup: Beta(mixup, mixup) mixup of every sample with the batch in reverse order; 0 turns it off.
    """

    def __init__(self, augmenter: Any, *, mixup: float = 0.0) -> None:
        self.augmenter = augmenter
        self.mixup = float(mixup)

    def __call__(self, batch: dict[str, Tensor], ctx: StepContext) -> Views:
        params, mix = _random_views(self.augmenter, batch, ctx, self.mixup)
        return Views(params, None, mix)


class OnlineTeacher:
    """DeiT's way: the frozen teacher runs on the student's own augmented (and mixed) batch at every step.

    The teacher is not a submodule of anything ``accelerate.prepare`` wraps: DDP never syncs it and
    ``student.train()`` cannot flip its BatchNorm layers back to training mode.
    """

    def __init__(self, teacher: nn.Module, augmenter: Any, *, autocast: Callable[[], Any] | None = None,
                 mixup: float = 0.0) -> None:
        from distill.teachers import freeze

        self.teacher = freeze(teacher)
        self.augmenter = augmenter
        self.autocast = autocast
        self.mixup = float(mixup)

    def __call__(self, batch: dict[str, Tensor], ctx: StepContext) -> Views:
        images = batch["image"]
        params, mix = _random_views(self.augmenter, batch, ctx, self.mixup)
        device = next(self.teacher.parameters()).device
        if device != images.device:
            self.teacher.to(images.device)
        with torch.no_grad(), (self.autocast() if self.autocast else _nullcontext()):
            logits = self.teacher(_render(self.augmenter, images, params, mix)).float()
        return Views(params, logits, mix)


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
        params, teacher_logits, mix = self.views(batch, ctx)
        images = batch["image"]
        x = _render(self.augmenter, images, params, mix)
        out = self.model(x)
        if teacher_logits is not None:
            teacher_logits = teacher_logits.to(x.device)
        losses = self.criterion(out, batch["label"], teacher_logits,
                                mix=None if mix is None else (mix.labels, mix.lam))
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

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if cpu is None:
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: accelerate forms the (gloo)
        # process group only when told to use the CPU; otherwise every rank would train alone.
        cpu = cpu or (world > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, cpu=cpu)
    if world > 1 and accelerator.num_processes != world:
        raise RuntimeError(f"{world} processes were launched (WORLD_SIZE) but accelerate formed a group of "
                           f"{accelerator.num_processes}: set ACCELERATE_USE_CPU=1 on machines without GPUs")
    return accelerator


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


STATE_META = "distill_state.json"


def _latest_state(state_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    """The newest complete ``epoch_*`` folder and its metadata, or ``(None, None)``.

    A folder only gets its final name once fully written (see :func:`_save_state`), and is renamed
    away before it is deleted (:func:`discard_state`), so a damaged ``epoch_*`` folder is an error
    naming it, not a silent restart. Leftovers of a kill (``.tmp_*`` / ``.trash_*``) are ignored, and
    so is an ``epoch_*`` folder with no metadata at all: what a plain ``rm -r`` killed midway leaves.
    """
    best: tuple[int, Optional[Path], Optional[dict]] = (-1, None, None)
    if not state_dir.is_dir():
        return None, None
    for d in state_dir.glob("epoch_*"):
        if not (d / STATE_META).exists():
            print(f"warning: ignoring incomplete resume state {d} (no {STATE_META})", file=sys.stderr)
            continue
        try:
            meta = json.loads((d / STATE_META).read_text())
            epoch = int(meta["epoch"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(_bad_state(d, f"{STATE_META} is missing or unreadable: {err}")) from None
        if epoch > best[0]:
            best = (epoch, d, meta)
    return best[1], best[2]


def discard_state(path: Path) -> None:
    """Delete a state folder so that a kill midway cannot leave a half-deleted ``epoch_*`` behind.

    It is renamed to a hidden ``.trash_*`` sibling first (atomic), then removed; leftovers of earlier
    kills next to it go too.
    """
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    if path.exists():
        os.replace(path, trash)
    for old in path.parent.glob(f".trash_{path.name}_*"):
        shutil.rmtree(old, ignore_errors=True)


def _bad_state(folder: Path, why: str) -> str:
    return (f"resume state {folder} is corrupt or truncated ({why}). Delete it (`rm -r {folder.parent}`) to "
            "restart this stage from scratch; the stage's outputs are untouched.")


def _save_state(accelerator: Any, state_dir: Path, epoch: int, history: list[dict], scheduler: Any,
                global_step: int) -> Path:
    """Save full training state for ``epoch`` atomically: write to a temp dir, then rename.

    accelerate writes model (safetensors), optimizer and RNG states; the scheduler (a JSON-able
    dict) and the history go into ``distill_state.json``, so nothing needs unpickling on resume.
    """
    final = state_dir / f"epoch_{epoch:05d}"
    tmp = state_dir / f".tmp_epoch_{epoch:05d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"epoch": epoch, "global_step": global_step, "history": history, "scheduler": scheduler.state_dict()}
        (tmp / STATE_META).write_text(json.dumps(meta))
        discard_state(final)
        os.replace(tmp, final)
        for old in state_dir.glob("epoch_*"):
            if old != final:
                discard_state(old)
    accelerator.wait_for_everyone()
    return final


def _load_state(accelerator: Any, folder: Path, meta: dict, scheduler: Any) -> None:
    """Restore what :func:`_save_state` wrote; any failure names the folder and how to recover."""
    try:
        accelerator.load_state(str(folder))  # accelerate loads with weights_only=True
        scheduler.load_state_dict(meta["scheduler"])
    except Exception as err:  # noqa: BLE001 - any reader failure means a damaged state folder
        raise CheckpointError(_bad_state(folder, f"{type(err).__name__}: {err}")) from None


_FAULTS_FIRED: set[str] = set()


def _fault(desc: str, global_step: int) -> bool:
    """Testing hook: ``DISTILL_FAULT=[<stage>:]<action>@<step>`` fires once ``<step>`` optimizer steps are done.

    Actions: ``kill`` (SIGKILL this very process: a real crash), ``raise`` (a ``RuntimeError``),
    ``nan`` (the next loss is NaN), ``wait`` (touch ``$DISTILL_FAULT_FILE.waiting``, then block until
    ``$DISTILL_FAULT_FILE`` exists). Each fires at most once per process, so a Prefect retry in the same
    process runs on. With ``<stage>:`` only that stage's training (``fit``'s ``desc``) is affected.

    Returns:
        True when the next loss must be replaced by NaN.
    """
    spec = os.environ.get("DISTILL_FAULT", "")
    if not spec or spec in _FAULTS_FIRED:
        return False
    stage, _, rule = spec.rpartition(":")
    action, _, step = rule.partition("@")
    if (stage and stage != desc) or not step.isdigit() or global_step != int(step):
        return False
    _FAULTS_FIRED.add(spec)
    print(f"[{desc}] DISTILL_FAULT: {action} after {global_step} steps", file=sys.stderr, flush=True)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise RuntimeError(f"[{desc}] injected fault (DISTILL_FAULT={spec})")
    elif action == "wait":
        release = Path(os.environ["DISTILL_FAULT_FILE"])
        Path(f"{release}.waiting").touch()
        while not release.exists():
            time.sleep(0.1)
    return action == "nan"


def _non_finite_message(desc: str, loss: Tensor, epoch: int, step: int, state_path: Optional[Path]) -> str:
    """Why training stopped, where (1-based epoch and step), and what is kept."""
    msg = f"[{desc}] loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}; training stopped. "
    if state_path is not None and epoch > 0:
        msg += (f"The last good training state (end of epoch {epoch}) is kept in {state_path / f'epoch_{epoch - 1:05d}'}; "
                "rerunning the stage resumes from it. ")
    elif state_path is not None:
        msg += "No epoch had finished, so there is no training state to resume from. "
    msg += "Earlier outputs of the stage are untouched. Lower the learning rate, enable grad_clip, or check the inputs for NaNs."
    return msg


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
        on_epoch_end: called on the main process with each epoch's record (e.g. MLflow logging). After a
            resume it is first called with the records of the epochs restored from the state.
        desc: progress-bar label.
        num_workers: DataLoader workers.
        stop_after_steps: testing hook: raise ``KeyboardInterrupt`` after this many optimizer steps.

    Returns:
        :class:`FitResult` with the unwrapped trained model and per-epoch history.

    Raises:
        NonFiniteLossError: NaN/inf loss (names epoch and step; the last good state is kept).
        CheckpointError: the resume state in ``state_dir`` is there but damaged (names it and how to recover).
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
    # Not passed to prepare(): accelerate would step it num_processes times per step. Nor registered
    # for checkpointing: accelerate reloads registered objects with pickle (weights_only=False); its
    # state is a small dict that _save_state keeps as JSON instead.

    history: list[dict[str, float]] = []
    start_epoch, resumed = 0, None
    state_path = Path(state_dir) if state_dir is not None else None
    if state_path is not None:
        latest, meta = _latest_state(state_path)
        if latest is not None and meta is not None:
            _load_state(accelerator, latest, meta, scheduler)
            history = meta["history"]
            start_epoch = resumed = meta["epoch"] + 1
            accelerator.print(f"[{desc}] resuming from {latest} (epochs 1..{start_epoch} of {params.epochs} done)")
            if accelerator.is_main_process and on_epoch_end is not None:
                for record in history:  # a fresh tracking run gets the whole curve, not only the epochs after the crash
                    on_epoch_end(record)

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
            inject_nan = _fault(desc, global_step)
            with accelerator.accumulate(model):
                out = task.training_step(batch, ctx)
                loss = out["loss"] * float("nan") if inject_nan else out["loss"]
                if not torch.isfinite(loss.detach()).all():
                    raise NonFiniteLossError(_non_finite_message(desc, loss, epoch, i, state_path))
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
        # Means over every process's batches (what one process would log), not the main process's alone.
        totals = torch.tensor([sums["loss"], sums["base"], sums["distill"], n_batches, seen], device=accelerator.device)
        loss_sum, base_sum, distill_sum, n_all, seen_all = accelerator.reduce(totals, reduction="sum").tolist()
        record: dict[str, float] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(n_all, 1),
            "train_base_loss": base_sum / max(n_all, 1),
            "train_distill_loss": distill_sum / max(n_all, 1),
            "lr": scheduler.get_last_lr()[0],
            "train_images_per_sec": seen_all / max(elapsed, 1e-9),
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
            _save_state(accelerator, state_path, epoch, history, scheduler, global_step)

    accelerator.wait_for_everyone()
    # Without DDP, the mixed-precision forward wrapper and torch.compile's wrapper (accelerate's dynamo
    # backend): a compiled module's state_dict would prefix every key with "_orig_mod.".
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False, keep_torch_compile=False)
    return FitResult(model=model, history=history, resumed_from_epoch=resumed)


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
