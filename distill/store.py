"""The soft-label store: K replayable augmented views per training image, with the teacher's logits.

Why: running the teacher on every student batch (DeiT's online distillation) costs a teacher forward
pass per step; storing one fixed view per image instead makes the student overfit (Beyer et al. 2022,
"Knowledge distillation: A good teacher is patient and consistent"). FKD (Shen & Xing 2022, "A Fast
Knowledge Distillation Framework for Visual Recognition") stores, per image, many random views: the
augmentation parameters with the teacher's output for exactly that view. The student
(:class:`StoredViews`, the store's replay) re-renders a stored view from its parameters (bit-identical on the same
device: :class:`distill.augment.Augmenter` renders each pixel independently of the rest of the batch) and uses
the stored logits, so no teacher runs in the student's loop and teacher and student stay consistent.

On-disk layout (a folder, tracked by DVC as one output)::

    soft_labels/
      meta.json                           # format, provenance, shapes; written last, hashes every file
      shard-00000.params.npy              # float32 (n_r, K, 5)  view parameters [top, left, h, w, flip]
      shard-00000.logits.npy              # float16|float32 (n_r, K, C)          (topk=None)
      shard-00000.topk_values.npy         # float16|float32 (n_r, K, k)          (topk=k)
      shard-00000.topk_indices.npy        # int16 (C < 32768) else int32 (n_r, K, k)
      shard-00000.rest_logsumexp.npy      # float32 (n_r, K): logsumexp of the C-k other logits
      shard-00000.mix_partner.npy         # int64 (n_r, K): each view's mixup partner image (mixup > 0 only)
      shard-00000.mix_params.npy          # float32 (n_r, K, 6): the partner's crop and lam (mixup > 0 only)
      shard-00001.*                       # one shard per generating process, contiguous images

Images are addressed by their position ``0..N-1`` in the training split (``batch["index"]`` of
:class:`distill.data.ArrayDataset`). Shard ``r`` holds images ``[start_r, stop_r)``. Every ``.npy``
is opened with ``np.load(mmap_mode="r")``: a lookup reads only the rows it needs, never the store.

``meta.json`` ties the store to what produced it: teacher checkpoint sha256, dataset fingerprint,
split, N, K, C, top-k, dtype, source image size and channels, the augmentation
(:meth:`Augmenter.describe`: crop spec, output size, normalisation, resampling), the seed, and per
shard file names, shapes, dtypes, byte sizes and sha256; also, for people only, how the logits were
computed (``runtime``: mixed precision, processes, device type, torch.compile backend). Under an
accelerator the teacher runs in its ``autocast`` (bf16/fp16 mixed precision) and, when accelerate's
dynamo backend is set, under ``torch.compile``. :meth:`SoftLabelStore.open` refuses a store
whose metadata differs from what the caller expects, or whose files are missing, truncated, corrupt
or of the wrong shape; the error names the store, the field or file, and how to regenerate it.

View parameters: the parameters of image ``i``, view ``k`` depend only on ``(seed, i, k)``. Images
are grouped in fixed blocks of :data:`PARAM_BLOCK`; block ``b`` draws ``PARAM_BLOCK * K`` rows from
a generator seeded by ``SeedSequence([seed, b])`` (always the full block, also for the last one), so
the result does not depend on the batch size, the shard boundaries or the number of processes.

Top-k: with ``topk=k`` a view stores its k largest logits ``v`` (and their class indices) plus
``r = logsumexp`` of the other ``C - k`` logits (float32). The full logits are rebuilt by putting
``v`` at its indices and ``r - log(C - k)`` in every other class. Then
``sum_{j not in top-k} exp(z_j) = (C - k) exp(r - log(C - k)) = exp(r)`` exactly, so the softmax of
the rebuilt logits reproduces the teacher's top-k probabilities exactly (up to the storage dtype of
``v``) and spreads the remaining mass uniformly over the other classes; the argmax (what hard
distillation uses) is kept. At a temperature ``tau != 1`` the rebuilt distribution is only an
approximation (the true rest is not uniform): the usual top-k trade-off of FKD.

Atomic writes (staging folder + rename swap, through :mod:`distill.io`, every file and folder
``fsync``-ed before the renames): everything is written into a sibling staging folder
``.<name>.tmp-<pid>`` (pid of the main process); ``meta.json`` is written into it last. The main
process then swaps it in with two renames: ``<name> -> .<name>.old``, ``staging -> <name>``, and
deletes ``.old``. A crash (exception or kill) before the swap leaves the previous store untouched
(the staging folder is ignored, and removed by the next generation); a crash between the two renames
leaves no ``<name>`` but a complete ``.<name>.old``, which :meth:`SoftLabelStore.open` (and the next
generation) renames back. So a reader sees the previous complete store or a new complete one, never
a mix. All processes must see the same file system (multi-node: a shared folder).

Sharding: with an :class:`accelerate.Accelerator` of P processes, process ``r`` runs the teacher over
the contiguous image range ``[r N / P, (r+1) N / P)`` and writes its shard files plus a small
``shard-<r>.json`` record (hashes, shapes) into the common staging folder; after
``wait_for_everyone()`` the main process gathers those records into ``meta.json`` and swaps the
folder in. One process writes one shard. The store is read shard by shard.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill.augment import PARAM_DIM, Mix, sample_lam
from distill.data import Split
from distill.io import atomic_write_text, file_sha256, progress, staged_dir, swapped_meta
from distill.views import StepContext, Views, freeze

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PARAM_BLOCK",
    "SoftLabelStore",
    "SoftLabelStoreError",
    "StoreMeta",
    "StoreSpec",
    "StoredViews",
    "as_index",
    "describe_store",
    "generate_store",
    "mix_params",
    "stored_mix",
    "view_params",
]

FORMAT = "distill-soft-labels"
FORMAT_VERSION = 1  # bump when the layout or the meaning of a stored array changes
PARAM_BLOCK = 256  # images per view-parameter generator (part of the format: changing it changes the views)
_PARAM_STREAM = 0x50A7  # separates this stream of seeds from any other use of the same seed
_MIX_STREAM = 0x313C  # the mixup partners, crops and weights: a stream of their own, so plain crops do not change
_REGENERATE = "regenerate it: `dvc repro soft_labels` (or `python -m flows stage soft_labels`)"


class SoftLabelStoreError(ValueError):
    """A soft-label store is missing, corrupt, or was made for another teacher, dataset or augmentation."""


@dataclass(frozen=True)
class StoreSpec:
    """What a generation makes: K views per image, how their logits are kept, and the views' seed and mixup.

    Attributes:
        views: K, views per image.
        topk: store only the k largest logits per view (plus the log of the remaining mass); ``None``: all.
        dtype: ``"float16"`` or ``"float32"`` for the stored logits.
        batch_size: views per teacher forward pass (how the store is computed, not what it holds).
        seed: seed of the view parameters (image ``i``, view ``k`` depends on ``(seed, i, k)`` only).
        mixup: ``> 0``: every view is mixed with a partner view of another training image, weight drawn from
            Beta(mixup, mixup) (:func:`mix_params`); the teacher's logits are for the mixed image.
    """

    views: int
    topk: int | None = None
    dtype: str = "float16"
    batch_size: int = 256
    seed: int = 0
    mixup: float = 0.0


@dataclass(frozen=True)
class StoreMeta:
    """What a store holds and what produced it (the content of ``meta.json``)."""

    num_images: int
    views: int
    num_classes: int
    topk: int | None
    dtype: str
    index_dtype: str | None
    image_size: int
    channels: int
    augment: dict[str, Any]
    seed: int
    teacher_sha256: str
    data_fingerprint: str
    split: str = "train"
    param_block: int = PARAM_BLOCK
    mixup: float = 0.0  # Beta(mixup, mixup) mixed views (0: plain crops, no mix files)
    shards: tuple[dict[str, Any], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    # How the logits were computed (mixed precision, processes, device type, dynamo backend): provenance
    # for people, never checked (a store made on 8 GPUs in bf16 serves a CPU student).
    runtime: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shards"] = list(d["shards"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreMeta:
        return cls(**{**data, "shards": tuple(data.get("shards", ()))})


# --------------------------------------------------------------------------------------------------
# View parameters
# --------------------------------------------------------------------------------------------------


def _block_generator(seed: int, block: int, stream: int = _PARAM_STREAM) -> torch.Generator:
    state = np.random.SeedSequence([stream, seed % 2**64, block]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _blocks(start: int, stop: int) -> Iterator[tuple[int, slice]]:
    """The parameter blocks that images ``[start, stop)`` fall in, each with the slice of its rows they take.

    A block always draws its whole ``PARAM_BLOCK`` rows: the rows of an image must not depend on where the
    split or a shard ends.
    """
    for block in range(start // PARAM_BLOCK, (stop - 1) // PARAM_BLOCK + 1 if stop > start else start // PARAM_BLOCK):
        first = block * PARAM_BLOCK
        yield block, slice(max(start, first) - first, min(stop, first + PARAM_BLOCK) - first)


def view_params(augmenter: Any, start: int, stop: int, *, views: int, seed: int) -> Tensor:
    """The stored view parameters of images ``[start, stop)``: a function of ``(seed, image, view)`` only.

    Args:
        augmenter: a :class:`distill.augment.Augmenter` (its ``sample`` draws the rows).
        start: first image position.
        stop: one past the last image position.
        views: views per image (K).
        seed: the store's seed.

    Returns:
        float32 ``(stop - start, views, 5)``.
    """
    out = []
    for block, rows_of in _blocks(start, stop):
        rows = augmenter.sample(PARAM_BLOCK * views, _block_generator(seed, block)).view(PARAM_BLOCK, views, PARAM_DIM)
        out.append(rows[rows_of])
    return torch.cat(out) if out else torch.empty(0, views, PARAM_DIM)


def mix_params(augmenter: Any, start: int, stop: int, *, views: int, seed: int, num_images: int,
               alpha: float) -> tuple[Tensor, Tensor]:
    """The mixup partner of every stored view of images ``[start, stop)``, a function of ``(seed, image, view)``.

    View ``k`` of image ``i`` is ``lam * crop_ik(image i) + (1 - lam) * crop'_ik(image j)``: the partner ``j`` is
    uniform over the ``num_images`` training images, its crop ``crop'`` is drawn like any crop, and ``lam`` from
    Beta(alpha, alpha). Blocks of :data:`PARAM_BLOCK` images, as :func:`view_params`, from a separate stream.

    Returns:
        ``partner`` int64 ``(stop - start, views)`` and float32 ``(stop - start, views, 6)``: the partner's crop
        ``[top, left, h, w, flip]`` and ``lam``.
    """
    partners, rows_out = [], []
    for block, rows_of in _blocks(start, stop):
        g = _block_generator(seed, block, _MIX_STREAM)
        m = PARAM_BLOCK * views
        partner = torch.randint(0, num_images, (m,), generator=g).view(PARAM_BLOCK, views)
        crops = augmenter.sample(m, g)
        lam = sample_lam(m, alpha, g)
        rows = torch.cat([crops, lam[:, None]], dim=1).view(PARAM_BLOCK, views, PARAM_DIM + 1)
        partners.append(partner[rows_of])
        rows_out.append(rows[rows_of])
    if not partners:
        return torch.empty(0, views, dtype=torch.int64), torch.empty(0, views, PARAM_DIM + 1)
    return torch.cat(partners), torch.cat(rows_out)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _shard_name(rank: int) -> str:
    return f"shard-{rank:05d}"


class _ShardWriter:
    """Writes one shard's arrays as memory-mapped ``.npy`` files, range by range (bounded RAM).

    The parameters file is created and filled first (it does not need C); the logits files are created
    once the first teacher batch tells the number of classes.
    """

    def __init__(self, folder: Path, rank: int, *, start: int, stop: int, augmenter: Any, spec: StoreSpec,
                 num_images: int) -> None:
        self.folder, self.prefix, self.spec = folder, _shard_name(rank), spec
        self.start, self.n, self.views = start, stop - start, spec.views
        views, seed, mixup = spec.views, spec.seed, spec.mixup
        self.num_classes: int | None = None
        self.arrays: dict[str, np.ndarray] = {}
        for role, (shape, dt) in _param_specs(self.n, views, mixup > 0).items():
            self._create(role, shape, dt)
        for b0 in range(start - start % PARAM_BLOCK, stop, PARAM_BLOCK):  # one parameter block at a time
            lo, hi = max(start, b0), min(stop, b0 + PARAM_BLOCK)
            rows = view_params(augmenter, lo, hi, views=views, seed=seed)
            self.arrays["params"][lo - start:hi - start] = rows.numpy()
            if mixup > 0:
                partner, rows = mix_params(augmenter, lo, hi, views=views, seed=seed, num_images=num_images,
                                           alpha=mixup)
                self.arrays["mix_partner"][lo - start:hi - start] = partner.numpy()
                self.arrays["mix_params"][lo - start:hi - start] = rows.numpy()

    def _create(self, role: str, shape: tuple[int, ...], dtype: str) -> None:
        path = self.folder / f"{self.prefix}.{role}.npy"
        if math.prod(shape) == 0:  # np.memmap cannot map an empty file
            self.arrays[role] = np.empty(shape, dtype=dtype)
            np.save(path, self.arrays[role])
        else:
            self.arrays[role] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def open_logits(self, num_classes: int) -> None:
        """Create the logits files, once the teacher's class count is known."""
        topk, dtype = self.spec.topk, self.spec.dtype
        if topk is not None and topk >= num_classes:
            raise ValueError(f"soft_labels.topk={topk} must be below the number of classes ({num_classes}); "
                             "set topk: null to store all logits")
        self.num_classes, self.dtype = num_classes, np.dtype(dtype)
        specs = _file_specs(n=self.n, views=self.views, num_classes=num_classes, topk=topk, dtype=dtype)
        for role, (shape, dt) in specs.items():
            if role not in self.arrays:
                self._create(role, shape, dt)

    def flat(self, role: str) -> np.ndarray:
        a = self.arrays[role]
        return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])  # (n*K, ...) view, j = i*K + k

    def write_logits(self, j0: int, j1: int, logits: Tensor) -> None:
        """Store the float32 logits ``(j1 - j0, C)`` of flat views ``j0..j1``."""
        topk = self.spec.topk
        if topk is None:
            stored = logits.to(_torch_dtype(self.dtype))
            _check_finite(stored, logits)
            self.flat("logits")[j0:j1] = stored.cpu().numpy()
            return
        values, indices = logits.topk(topk, dim=1)  # (B, k), sorted
        rest = logits.scatter(1, indices, float("-inf")).logsumexp(dim=1)  # (B,): mass outside the top-k
        stored = values.to(_torch_dtype(self.dtype))
        _check_finite(stored, values)
        self.flat("topk_values")[j0:j1] = stored.cpu().numpy()
        self.flat("topk_indices")[j0:j1] = indices.cpu().numpy().astype(self.arrays["topk_indices"].dtype)
        self.flat("rest_logsumexp")[j0:j1] = rest.cpu().numpy()

    def close(self) -> dict[str, dict[str, Any]]:
        """Flush, close and describe every file (name, shape, dtype, bytes, sha256)."""
        records = {}
        for role, arr in self.arrays.items():
            if isinstance(arr, np.memmap):
                arr.flush()
            path = self.folder / f"{self.prefix}.{role}.npy"
            records[role] = {"file": path.name, "shape": list(arr.shape), "dtype": str(arr.dtype),
                             "bytes": path.stat().st_size}
        self.arrays.clear()  # drop the memmaps: the files are complete and closed before hashing
        for rec in records.values():
            rec["sha256"] = file_sha256(self.folder / rec["file"])
        return records


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return {np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32}[np.dtype(dtype)]


def _check_finite(stored: Tensor, source: Tensor) -> None:
    if not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(source).all()):
        raise ValueError(f"teacher logits up to {source.abs().max().item():.4g} overflow {stored.dtype}; "
                         "set soft_labels.dtype: float32")


def _index_dtype(num_classes: int) -> str:
    return "int16" if num_classes < 32768 else "int32"


def _param_specs(n: int, views: int, mixed: bool) -> dict[str, tuple[tuple[int, ...], str]]:
    specs: dict[str, tuple[tuple[int, ...], str]] = {"params": ((n, views, PARAM_DIM), "float32")}
    if mixed:
        specs["mix_partner"] = ((n, views), "int64")
        specs["mix_params"] = ((n, views, PARAM_DIM + 1), "float32")
    return specs


def _file_specs(*, n: int, views: int, num_classes: int, topk: int | None, dtype: str,
                mixed: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of every array of a shard of ``n`` images."""
    specs = _param_specs(n, views, mixed)
    if topk is None:
        specs["logits"] = ((n, views, num_classes), dtype)
    else:
        specs["topk_values"] = ((n, views, topk), dtype)
        specs["topk_indices"] = ((n, views, topk), _index_dtype(num_classes))
        specs["rest_logsumexp"] = ((n, views), "float32")
    return specs


def _dynamo_backend(accelerator: Any) -> str:
    plugin = getattr(getattr(accelerator, "state", None), "dynamo_plugin", None)
    return "no" if plugin is None else str(plugin.backend.value).lower()


def _compiled(teacher: nn.Module, accelerator: Any) -> nn.Module:
    """The teacher under ``torch.compile`` when accelerate's dynamo backend asks for it, else unchanged.

    accelerate compiles what it ``prepare``s; the frozen teacher is not prepared (no DDP wrapper for a model
    that never trains), so it is compiled here with the same settings (``--dynamo_backend``,
    ``ACCELERATE_DYNAMO_BACKEND`` / ``_MODE``).
    """
    if _dynamo_backend(accelerator) == "no":
        return teacher
    return torch.compile(teacher, **accelerator.state.dynamo_plugin.to_kwargs())


def _runtime(accelerator: Any) -> dict[str, Any]:
    """How the logits were computed (``StoreMeta.runtime``)."""
    if accelerator is None:
        return {"mixed_precision": "no", "processes": 1, "dynamo_backend": "no"}
    return {"mixed_precision": str(accelerator.mixed_precision), "processes": accelerator.num_processes,
            "device_type": accelerator.device.type, "dynamo_backend": _dynamo_backend(accelerator)}


def _staging_token(accelerator: Any) -> str:
    """The main process's pid, shared with every process so they all write into one staging folder."""
    token = [str(os.getpid())]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(token, from_process=0)
    return token[0]


def _run_teacher(teacher: nn.Module, split: Any, augmenter: Any, writer: _ShardWriter, procs: _Procs, bar: Any) -> None:
    """Teacher logits of every view of a shard, in flat order ``j = i*K + k``, batch by batch."""
    views, start, batch_size, device = writer.views, writer.start, writer.spec.batch_size, procs.device
    flat_params = writer.flat("params")
    mixed = "mix_partner" in writer.arrays
    total = flat_params.shape[0]
    for j0 in range(0, total, batch_size):
        j1 = min(total, j0 + batch_size)
        first, last = j0 // views, (j1 - 1) // views + 1
        # Move each image once, then repeat it per view on the device.
        images = torch.from_numpy(np.array(split.images[start + first:start + last], copy=True)).to(device)
        sel = torch.from_numpy(np.arange(j0, j1) // views - first).to(device)
        p = torch.from_numpy(np.array(flat_params[j0:j1])).to(device)
        mix = stored_mix(split, writer.flat("mix_partner")[j0:j1], writer.flat("mix_params")[j0:j1], device) \
            if mixed else None
        # rendered in float32 outside autocast, as the student does
        x = augmenter(images.index_select(0, sel), p) if mix is None else augmenter(images.index_select(0, sel), p, mix)
        with procs.autocast():
            logits = teacher(x).float()  # (B, C)
        if writer.num_classes is None:  # C is known from the first batch: no extra probe forward
            writer.open_logits(logits.shape[1])
        writer.write_logits(j0, j1, logits)
        bar.update(j1 - j0)


def stored_mix(split: Split, partner: np.ndarray, rows: np.ndarray, device: Any = None) -> Mix:
    """The :class:`~distill.augment.Mix` of stored views: partner images and labels from ``split`` by position.

    Used where the mixed views are made (generation) and where they are replayed
    (:class:`StoredViews`), so both render the same mixed image.

    Args:
        split: the training split the store was made from.
        partner: int ``(B,)`` each view's partner image (a position in ``split``).
        rows: float32 ``(B, 6)`` the partner's crop ``[top, left, h, w, flip]`` and ``lam``.
        device: where the returned tensors go.
    """
    partner = np.asarray(partner, dtype=np.int64)
    rows = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    order = np.argsort(partner, kind="stable")  # sorted reads are kinder to a memory-mapped split
    images = np.empty((len(partner), *split.images.shape[1:]), dtype=split.images.dtype)
    images[order] = split.images[partner[order]]
    labels = torch.from_numpy(np.asarray(split.labels)[partner]).long()
    return Mix(images=torch.from_numpy(images).to(device), labels=labels.to(device),
               params=rows[:, :PARAM_DIM].to(device), lam=rows[:, PARAM_DIM].to(device))


@dataclass(frozen=True)
class _Procs:
    """This process's part in a generation: its rank among ``world``, device, autocast and barrier."""

    rank: int
    world: int
    device: torch.device
    autocast: Callable[[], Any]
    wait: Callable[[], None]
    show_progress: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def of(cls, accelerator: Any, teacher: nn.Module) -> _Procs:
        if accelerator is None:  # one process, on the teacher's device, full precision
            device = next(iter(teacher.parameters()), torch.empty(0)).device
            return cls(0, 1, device, contextlib.nullcontext, lambda: None, True)
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator.autocast,
                   accelerator.wait_for_everyone, accelerator.is_local_main_process)


def _check_args(spec: StoreSpec, num_images: int) -> None:
    views, topk, dtype, batch_size = spec.views, spec.topk, spec.dtype, spec.batch_size
    if views < 1 or batch_size < 1:
        raise ValueError(f"views ({views}) and batch_size ({batch_size}) must be >= 1")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"soft-label dtype {dtype!r} is not supported; use 'float16' or 'float32'")
    if topk is not None and topk < 1:
        raise ValueError(f"soft_labels.topk={topk} must be >= 1 (or null to store all logits)")
    if num_images == 0:
        raise ValueError("the training split is empty: nothing to store")


def _write_shard(teacher: nn.Module, split: Split, augmenter: Any, staging: Path, procs: _Procs,
                 spec: StoreSpec) -> None:
    """This process's shard: the view parameters and teacher logits of its images, and ``shard-<r>.json``."""
    n = len(split)
    lo, hi = procs.rank * n // procs.world, (procs.rank + 1) * n // procs.world
    writer = _ShardWriter(staging, procs.rank, start=lo, stop=hi, augmenter=augmenter, spec=spec, num_images=n)
    desc = f"soft labels {procs.rank + 1}/{procs.world}" if procs.world > 1 else "soft labels"
    with torch.inference_mode():
        with progress(total=(hi - lo) * spec.views, desc=desc, unit="view", enabled=procs.show_progress,
                      leave=False) as bar:
            _run_teacher(teacher, split, augmenter, writer, procs, bar)
        if writer.num_classes is None:  # an empty shard (N < processes): C from one forward pass of image 0
            probe = augmenter(torch.from_numpy(np.array(split.images[:1])).to(procs.device),
                              augmenter.eval_params(1).to(procs.device))
            with procs.autocast():
                writer.open_logits(int(teacher(probe).shape[1]))
    record = {"index": procs.rank, "start": lo, "stop": hi, "num_classes": writer.num_classes, "files": writer.close()}
    atomic_write_text(staging / f"{_shard_name(procs.rank)}.json", json.dumps(record))


def _gather_meta(staging: Path, world: int, fields: dict[str, Any]) -> StoreMeta:
    """Main process: the shards' records and ``fields`` into ``meta.json``, written last (a staging folder
    without it is never a store)."""
    records = [json.loads((staging / f"{_shard_name(r)}.json").read_text()) for r in range(world)]
    num_classes = records[0]["num_classes"]
    meta = StoreMeta(**fields, num_classes=num_classes,
                     index_dtype=_index_dtype(num_classes) if fields["topk"] is not None else None,
                     shards=tuple({k: r[k] for k in ("index", "start", "stop", "files")} for r in records))
    for r in range(world):
        (staging / f"{_shard_name(r)}.json").unlink()
    atomic_write_text(staging / "meta.json", json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n")
    return meta


def generate_store(teacher: nn.Module, split: Split, augmenter: Any, *, out_dir: str | Path, spec: StoreSpec,
                   teacher_sha256: str, data_fingerprint: str, accelerator: Any = None) -> StoreMeta:
    """Run the frozen teacher over ``views`` augmented views of every image and write the store atomically.

    Args:
        teacher: the trained teacher; frozen here (``eval()``, no gradients).
        split: a :class:`distill.data.Split` (uint8 images ``(N, C, H, W)``); the store is indexed by position.
        augmenter: the :class:`distill.augment.Augmenter` the student will replay the views with.
        out_dir: the store folder (replaced as a whole).
        spec: what to make (:class:`StoreSpec`: views per image, top-k, dtype, batch size, seed, mixup).
        teacher_sha256: sha256 of the teacher checkpoint file (checked by the student).
        data_fingerprint: the prepared dataset's fingerprint (checked by the student).
        accelerator: an :class:`accelerate.Accelerator`: its device, mixed precision and processes (one shard each).

    Returns:
        The :class:`StoreMeta` written (on every process).

    Raises:
        ValueError: bad ``views`` / ``topk`` / ``dtype`` / ``batch_size``, an empty split, or logits that
            overflow float16.
    """
    _check_args(spec, len(split))
    procs = _Procs.of(accelerator, teacher)
    teacher = _compiled(freeze(teacher).to(procs.device), accelerator)
    out = Path(out_dir)
    meta: StoreMeta | None = None
    # One staging folder for every process's shard; its creation also removes what killed generations left.
    with staged_dir(out, _staging_token(accelerator), main=procs.is_main, wait=procs.wait) as staging:
        _write_shard(teacher, split, augmenter, staging, procs, spec)
        procs.wait()
        if procs.is_main:
            fields = {
                "num_images": len(split), "views": spec.views, "topk": spec.topk, "dtype": spec.dtype,
                "seed": spec.seed, "mixup": float(spec.mixup),
                "image_size": int(split.images.shape[-1]), "channels": int(split.images.shape[1]),
                "augment": json.loads(json.dumps(augmenter.describe())), "teacher_sha256": teacher_sha256,
                "data_fingerprint": data_fingerprint, "extra": {}, "runtime": _runtime(accelerator)}
            meta = _gather_meta(staging, procs.world, fields)
    if meta is None:  # other processes read what the main process wrote
        meta = StoreMeta.from_dict(json.loads((out / "meta.json").read_text()))
    return meta


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _diff(stored: Any, expected: Any, name: str) -> list[str]:
    """Human-readable differences between a stored and an expected value, by dotted key."""
    if isinstance(expected, dict) and isinstance(stored, dict):
        out = []
        for key in expected:  # the caller states what it relies on; extra stored keys are not its concern
            sub = f"{name}.{key}"
            if key not in stored:
                out.append(f"{sub}: not in the store, expected {expected[key]!r}")
            else:
                out.extend(_diff(stored[key], expected[key], sub))
        return out
    return [] if stored == expected else [f"{name}: stored {stored!r}, expected {expected!r}"]


def as_index(values: Any) -> np.ndarray:
    """Image positions (or view ids) as a flat int64 array, from a tensor, an array, a list or a number."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)


class SoftLabelStore:
    """A verified, memory-mapped soft-label store (open it with :meth:`open`)."""

    def __init__(self, path: Path, meta: StoreMeta, shards: list[dict[str, np.ndarray]]) -> None:
        self.path = path
        self.meta = meta
        self._shards = shards
        self._starts = np.array([s["start"] for s in meta.shards], dtype=np.int64)

    @classmethod
    def open(cls, path: str | Path, *, expect: dict[str, Any] | None = None,
             verify_hashes: bool = True) -> SoftLabelStore:
        """Open a store, refusing anything that is not exactly what the caller expects.

        Args:
            path: the store folder.
            expect: metadata the caller relies on, e.g. ``teacher_sha256``, ``data_fingerprint``,
                ``num_images``, ``num_classes``, ``image_size``, ``augment`` (an ``Augmenter.describe()``
                dict; only the sub-keys given are compared). Any difference is an error.
            verify_hashes: also check every file's sha256 (sizes and shapes are always checked).

        Raises:
            SoftLabelStoreError: missing store, metadata mismatch, or a missing / truncated / corrupt file;
                the message names the store, the field or file, and how to regenerate it.
        """
        path = Path(path)
        meta = _read_meta(path)
        problems: list[str] = []
        stored = meta.to_dict()
        for key, want in (expect or {}).items():
            want = json.loads(json.dumps(want))  # tuples -> lists, as stored
            if key not in stored:
                problems.append(f"{key}: not recorded in the store, expected {want!r}")
            else:
                problems.extend(_diff(stored[key], want, key))
        if problems:
            raise SoftLabelStoreError(f"soft-label store {path.resolve()} was made for something else: "
                                      + "; ".join(problems) + f". It cannot be used; {_REGENERATE}")
        try:
            shards = cls._open_shards(path, meta, verify_hashes)
        except (KeyError, TypeError) as err:
            raise SoftLabelStoreError(f"soft-label store {path.resolve()}: meta.json lacks shard field {err}; "
                                      f"{_REGENERATE}") from None
        return cls(path, meta, shards)

    @staticmethod
    def _open_shards(path: Path, meta: StoreMeta, verify_hashes: bool) -> list[dict[str, np.ndarray]]:
        shards, expected_start = [], 0
        for shard in meta.shards:
            n = shard["stop"] - shard["start"]
            if shard["start"] != expected_start or n < 0:
                raise SoftLabelStoreError(f"soft-label store {path.resolve()}: shards do not tile the images "
                                          f"(shard {shard['index']} starts at {shard['start']}); {_REGENERATE}")
            expected_start = shard["stop"]
            specs = _file_specs(n=n, views=meta.views, num_classes=meta.num_classes, topk=meta.topk, dtype=meta.dtype,
                                mixed=meta.mixup > 0)
            if set(specs) != set(shard["files"]):
                raise SoftLabelStoreError(f"soft-label store {path.resolve()}: shard {shard['index']} lists files "
                                          f"{sorted(shard['files'])}, expected {sorted(specs)}; {_REGENERATE}")
            arrays = {}
            for role, (shape, dt) in specs.items():
                arrays[role] = _open_array(path, shard["files"][role], shape, dt, verify_hashes)
            shards.append(arrays)
        if expected_start != meta.num_images:
            raise SoftLabelStoreError(f"soft-label store {path.resolve()}: shards cover {expected_start} images, "
                                      f"meta.json says {meta.num_images}; {_REGENERATE}")
        return shards

    @property
    def num_images(self) -> int:
        return self.meta.num_images

    @property
    def views(self) -> int:
        return self.meta.views

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    def _locate(self, indices: Any, view_ids: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Shard of each request, its row in that shard, and the view; vectorised."""
        idx, k = np.broadcast_arrays(as_index(indices), as_index(view_ids))
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"image index out of range [0, {self.num_images}) in soft-label store {self.path}")
        if k.size and (k.min() < 0 or k.max() >= self.views):
            raise IndexError(f"view id out of range [0, {self.views}) in soft-label store {self.path}")
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        return shard, idx - self._starts[shard], k, idx

    def _gather(self, role: str, shard: np.ndarray, rows: np.ndarray, k: np.ndarray) -> np.ndarray:
        first = self._shards[0][role]
        if len(self._shards) == 1:
            return first[rows, k]  # fancy indexing on the memmap reads just these rows
        out = np.empty((rows.shape[0], *first.shape[2:]), dtype=first.dtype)
        for s in np.unique(shard):  # a loop over shards (a handful), not over samples
            m = shard == s
            out[m] = self._shards[s][role][rows[m], k[m]]
        return out

    def params(self, indices: Any, view_ids: Any) -> Tensor:
        """Stored view parameters: float32 ``(B, 5)`` for images ``indices`` and views ``view_ids`` (CPU)."""
        shard, rows, k, _ = self._locate(indices, view_ids)
        return torch.from_numpy(np.ascontiguousarray(self._gather("params", shard, rows, k), dtype=np.float32))

    def mix(self, indices: Any, view_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """The mixup partners of those views: partner positions int64 ``(B,)`` and float32 ``(B, 6)`` rows
        (the partner's crop and ``lam``). Only for a store made with ``mixup > 0``."""
        if self.meta.mixup <= 0:
            raise ValueError(f"soft-label store {self.path} has no mixed views (made with mixup 0)")
        shard, rows, k, _ = self._locate(indices, view_ids)
        return (self._gather("mix_partner", shard, rows, k).astype(np.int64),
                self._gather("mix_params", shard, rows, k))

    def logits(self, indices: Any, view_ids: Any) -> Tensor:
        """The teacher's logits for those views: float32 ``(B, C)`` (rebuilt from the top-k if stored so; CPU)."""
        shard, rows, k, _ = self._locate(indices, view_ids)
        if self.meta.topk is None:
            return torch.from_numpy(self._gather("logits", shard, rows, k).astype(np.float32))
        values = self._gather("topk_values", shard, rows, k).astype(np.float32)  # (B, k)
        index = self._gather("topk_indices", shard, rows, k).astype(np.int64)
        rest = self._gather("rest_logsumexp", shard, rows, k)  # (B,)
        fill = (rest - np.float32(math.log(self.num_classes - self.meta.topk))).astype(np.float32)
        out = np.repeat(fill[:, None], self.num_classes, axis=1)
        np.put_along_axis(out, index, values, axis=1)
        return torch.from_numpy(out)


def _read_meta(path: Path) -> StoreMeta:
    """A store's ``meta.json``, checked to be this format and version."""
    meta_file = swapped_meta(path)
    if meta_file is None:
        raise SoftLabelStoreError(f"no soft-label store at {path.resolve()} (no meta.json); run the soft_labels "
                                  "stage first: `dvc repro soft_labels` (or `python -m flows stage soft_labels`)")
    try:
        raw = json.loads(meta_file.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {raw.get('format_version')!r}, this code reads {FORMAT_VERSION}")
        return StoreMeta.from_dict(raw)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise SoftLabelStoreError(f"soft-label store {path.resolve()}: meta.json is unreadable or foreign ({err}); "
                                  f"{_REGENERATE}") from None


def _open_array(folder: Path, rec: dict[str, Any], shape: tuple[int, ...], dtype: str, verify_hash: bool) -> np.ndarray:
    """Check one data file against its ``meta.json`` record and the expected shape; return it memory-mapped."""
    name = rec["file"]
    file = folder / name

    def fail(what: str) -> SoftLabelStoreError:
        return SoftLabelStoreError(f"soft-label store {folder.resolve()}: file {name} {what}; {_REGENERATE}")

    if Path(name).name != name:  # meta.json must not point outside the store
        raise fail("is not a plain file name")
    if not file.is_file():
        raise fail("is missing")
    size = file.stat().st_size
    if size != rec["bytes"]:
        raise fail(f"has {size} bytes, meta.json records {rec['bytes']} (truncated or replaced)")
    if verify_hash and file_sha256(file) != rec["sha256"]:
        raise fail("does not match its sha256 in meta.json (corrupt)")
    try:
        arr = np.load(file, mmap_mode="r" if math.prod(shape) else None, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise fail(f"is not a readable .npy ({err})") from None
    if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype) or list(arr.shape) != list(rec["shape"]):
        raise fail(f"has shape {tuple(arr.shape)} {arr.dtype}, expected {tuple(shape)} {dtype}")
    return arr


# --------------------------------------------------------------------------------------------------
# Description
# --------------------------------------------------------------------------------------------------


def describe_store(path: str | Path) -> dict[str, Any]:
    """Size and shape of a store, for metrics (numeric fields) and humans (strings).

    Returns:
        ``num_images``, ``views``, ``num_classes``, ``shards``, ``store_bytes`` (all files incl. ``meta.json``),
        ``bytes_per_image``, ``bytes_per_view``, ``dtype`` (str) and ``topk`` (str: ``"all"`` or k).

    Raises:
        SoftLabelStoreError: the store is missing or broken (sizes and shapes are checked, hashes are not).
    """
    store = SoftLabelStore.open(path, verify_hashes=False)
    m = store.meta
    data_bytes = sum(f["bytes"] for s in m.shards for f in s["files"].values())
    total = data_bytes + (Path(path) / "meta.json").stat().st_size
    return {
        "num_images": m.num_images,
        "views": m.views,
        "num_classes": m.num_classes,
        "shards": len(m.shards),
        "store_bytes": total,
        "bytes_per_image": total / max(m.num_images, 1),
        "bytes_per_view": data_bytes / max(m.num_images * m.views, 1),
        "dtype": m.dtype,
        "topk": "all" if m.topk is None else str(m.topk),
    }


# --------------------------------------------------------------------------------------------------
# Replay: the student's view source
# --------------------------------------------------------------------------------------------------


_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based 64-bit mix (Steele et al. 2014): stateless per-sample randomness, vectorised."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class StoredViews:
    """Replays the soft-label store: no teacher in the loop.

    Each epoch, image ``i`` replays view ``(a_i * (epoch mod K) + b_i) mod K``, where ``b_i`` is uniform in
    ``[0, K)`` and ``a_i`` is a unit modulo K, both drawn statelessly from ``(seed, epoch // K, i)``. So in any
    epoch each image's view is uniform over its K views, and every block of K consecutive epochs
    (``0..K-1``, ``K..2K-1``, ...) shows each image every one of its K views exactly once, in a fresh order
    per block. Stateless: resume and multi-process training see the same views.

    A store made with mixup also gives each view's partner: its image and label (from ``split``, by position),
    its crop and the mixing weight, so the student renders exactly the mixed image the teacher saw.

    Args:
        store: an opened :class:`SoftLabelStore`.
        seed: the run's seed.
        split: the training :class:`~distill.data.Split` the store was made from (needed for mixed views).

    Raises:
        ValueError: a store with mixed views and no ``split``.
    """

    def __init__(self, store: SoftLabelStore, *, seed: int = 0, split: Split | None = None) -> None:
        if store.meta.mixup > 0 and split is None:
            raise ValueError("this soft-label store has mixed views: StoredViews needs the training split "
                             "for the partners")
        self.store = store
        self.seed = int(seed)
        self.split = split
        k = store.views
        self._units = np.array([a for a in range(1, k + 1) if math.gcd(a, k) == 1], dtype=np.uint64)

    def view_ids(self, indices: Any, epoch: int) -> np.ndarray:
        """The view each image in ``indices`` replays in ``epoch`` (int64 ``(B,)``)."""
        k = self.store.views
        cycle, pos = divmod(int(epoch), k)
        base = int(_splitmix64(np.array([(self.seed * 0x2545F4914F6CDD1D + cycle) & _MASK64], dtype=np.uint64))[0])
        h = _splitmix64(as_index(indices).astype(np.uint64) ^ np.uint64(base))
        b = h % np.uint64(k)
        a = self._units[(h >> np.uint64(32)) % np.uint64(len(self._units))]
        return ((a * np.uint64(pos) + b) % np.uint64(k)).astype(np.int64)

    def __call__(self, batch: dict[str, Tensor], ctx: StepContext) -> Views:
        """The batch's views: ``params (B, 5)``, ``teacher_logits (B, C)`` float32 and, for a mixed store, the
        :class:`~distill.augment.Mix`; on the batch's device."""
        device = batch["image"].device
        idx = as_index(batch["index"])
        views = self.view_ids(idx, ctx.epoch)
        params = self.store.params(idx, views)
        logits = self.store.logits(idx, views)
        mix = None
        if self.store.meta.mixup > 0:
            partner, rows = self.store.mix(idx, views)
            mix = stored_mix(self.split, partner, rows, device)
        return Views(params.to(device, non_blocking=True), logits.to(device, non_blocking=True), mix)
