"""The data stage: materialise the dataset as versioned arrays with a fixed, seeded train/val/test split.

Reads the raw data (``data.root``: an image folder or torchvision's files; nothing for the embedded
``digits``), writes ``data/prepared/`` (uint8 arrays, stable sample ids, normalisation statistics, a content
fingerprint; :mod:`distill.prepare`) and ``metrics/data.json``. With ``data.unlabeled`` it also builds the
unlabeled transfer split, whose labels are dropped before anything is saved.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distill.config import ParamsView, Paths
from distill.io import atomic_write_json
from distill.prepare import SplitSpec, prepare_to
from distill.tracking import NO_TRACKING, Tracker

__all__ = ["run"]


def run(params: ParamsView, paths: Paths, tracker: Tracker = NO_TRACKING) -> dict[str, Any]:
    """Prepare ``data.name`` into ``data/prepared`` and describe it in ``metrics/data.json``."""
    d = params.data
    root = Path(d.root)
    t0 = time.perf_counter()
    data = prepare_to(paths.data, name=d.name, root=root if root.is_absolute() else paths.root / root,
                      image_size=d.image_size, split=SplitSpec.of(d, params.seed), download=d.download,
                      skip_bad_images=d.skip_bad_images)
    meta = data.meta
    metrics: dict[str, Any] = {
        "num_train": len(data.train), "num_unlabeled": len(data.unlabeled), "num_val": len(data.val),
        "num_test": len(data.test), "num_classes": meta.num_classes, "image_size": meta.image_size,
        "skipped_images": int(getattr(meta, "skipped_images", 0) or 0), "time_s": time.perf_counter() - t0}
    atomic_write_json(paths.metrics("data"), {**metrics, "fingerprint": meta.fingerprint})
    tracker.log_metrics(metrics)
    tracker.log_dict(meta.to_dict(), "dataset_meta.json")
    tracker.log_dataset(name=meta.label, digest=meta.fingerprint, source=f"file://{paths.data.resolve()}",
                        context="prepared")
    return {**metrics, "fingerprint": meta.fingerprint}
