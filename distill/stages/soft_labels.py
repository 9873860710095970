"""The soft-label stage: run the frozen teacher once over K augmented views of every transfer image.

The transfer set is the labeled training images, then the unlabeled ones (if any). For each image the store
keeps K views: their augmentation parameters (and, with mixup, the partner image, its crop and the weight)
and the teacher's logits for exactly that view (FKD, Shen & Xing 2022; :mod:`distill.store`). The
student replays them, so no teacher runs in its loop. The store is tied to the teacher checkpoint and the
prepared data by their hashes. Writes ``soft_labels/`` and ``metrics/soft_labels.json``.
"""

from __future__ import annotations

import time
from typing import Any

from distill.augment import train_augmenter
from distill.config import ParamsView, Paths
from distill.data import load_prepared
from distill.io import atomic_write_json, file_sha256
from distill.runtime import log_runtime, make_accelerator
from distill.store import StoreSpec, describe_store, generate_store
from distill.teachers import load_teacher
from distill.tracking import NO_TRACKING, Tracker

__all__ = ["run"]


def run(params: ParamsView, paths: Paths, tracker: Tracker = NO_TRACKING) -> dict[str, Any]:
    """Generate the soft-label store; returns its size and speed."""
    data = load_prepared(paths.data)
    teacher, _ = load_teacher(paths.model("teacher"), data.meta)
    accelerator = make_accelerator()
    log_runtime(tracker, accelerator)
    s = params.soft_labels
    transfer = data.transfer()
    t0 = time.perf_counter()
    spec = StoreSpec(views=s.views, topk=s.topk, dtype=s.dtype, batch_size=s.batch_size, seed=params.seed,
                     mixup=params.student.train.mixup)
    meta = generate_store(teacher, transfer, train_augmenter(params.data.augment, data.meta), out_dir=paths.soft_labels,
                          spec=spec, teacher_sha256=file_sha256(paths.model("teacher")),
                          data_fingerprint=data.meta.fingerprint, accelerator=accelerator)
    elapsed = time.perf_counter() - t0
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        described = describe_store(paths.soft_labels)
        metrics = {"views_per_sec": len(transfer) * s.views / max(elapsed, 1e-9), "time_s": elapsed,
                   **{k: v for k, v in described.items() if isinstance(v, (int, float))}}
        atomic_write_json(paths.metrics("soft_labels"), metrics)
        tracker.log_metrics(metrics)
        tracker.log_dict(meta.to_dict(), "soft_label_store_meta.json")
    accelerator.wait_for_everyone()
    return metrics
