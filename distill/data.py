"""Prepared data: the fixed, seeded splits every stage after the data stage reads, and nothing that makes them.

The data stage writes ``data/prepared/`` (:mod:`distill.prepare`); everything else opens it here. The folder holds
one ``<split>_images.npy`` (uint8 ``(N, C, S, S)``), ``<split>_labels.npy`` and ``<split>_ids.npy`` per split of
:data:`SPLITS`, and ``meta.json`` (:class:`DatasetMeta`: class names, normalisation statistics, sizes and a content
fingerprint). :func:`load_prepared` opens it, images memory-mapped. ``ids`` are stable sample ids: the position of
each sample in its source, so a sample keeps its id whatever the split seed (:mod:`distill.prepare` says what
each source's ids are). The ``unlabeled`` split's labels are all :data:`UNLABELED`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from distill.io import swapped_meta

__all__ = ["SPLITS", "UNLABELED", "ArrayDataset", "DatasetMeta", "DatasetNotFoundError", "PreparedData", "Split",
           "load_prepared"]

SPLITS = ("train", "val", "test", "unlabeled")
UNLABELED = -1  # the label of every image of the unlabeled split: no code can learn from a label it lacks


class DatasetNotFoundError(FileNotFoundError):
    """The dataset (or the prepared arrays) is missing or empty; the message says where and how to get it."""


@dataclass
class Split:
    """One split: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``, ``ids`` int64 ``(N,)``.

    ``ids`` are stable sample ids: the position of each sample in its source (module docstring), so a sample
    keeps its id whatever the split seed.
    """

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class DatasetMeta:
    """What a prepared dataset is; saved as ``meta.json`` and inside every checkpoint and soft-label store.

    ``skipped_images`` / ``skipped_examples``: unreadable image files left out (``skip_bad_images``), and a few of
    their paths relative to the root. ``id_sources`` (image folders): per split, ``[folder, count]`` for each run
    of rows whose ids index that folder's sorted file list. These three are written only when set, so data
    prepared without them keeps its ``meta.json`` and fingerprint.
    """

    name: str
    num_classes: int
    class_names: list[str]
    channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    sizes: dict[str, int]
    seed: int
    fingerprint: str = ""
    source: str = ""
    skipped_images: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    id_sources: dict[str, list[list[Any]]] | None = None

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("skipped_images", "skipped_examples", "id_sources")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self._OPTIONAL or v}

    @property
    def label(self) -> str:
        """What to call this data where a name is shown (MLflow's dataset list): an image folder's own folder name
        (``flowers`` for ``data/raw/flowers``), else the dataset's name. Not part of ``meta.json``."""
        folder = Path(self.source).name if self.name == "imagefolder" else ""
        return folder or self.name

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetMeta:
        return cls(**data)


def _empty_split() -> Split:
    return Split(images=np.zeros((0, 1, 1, 1), dtype=np.uint8), labels=np.zeros(0, dtype=np.int64),
                 ids=np.zeros(0, dtype=np.int64))


@dataclass
class PreparedData:
    """The splits and their metadata. ``unlabeled`` (labels all :data:`UNLABELED`) is the unlabeled transfer set:
    the training images above ``max_per_class`` and an image folder's ``unlabeled/``; it is empty unless asked for."""

    train: Split
    val: Split
    test: Split
    meta: DatasetMeta
    unlabeled: Split = field(default_factory=_empty_split)

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
        return getattr(self, name)

    def transfer(self) -> Split:
        """What the teacher's knowledge is transferred on: the labeled training images, then the unlabeled ones.

        Positions ``0..len(train)-1`` are the training split's, so a store over this split extends one over
        ``train``. Without unlabeled images this is ``train`` itself.
        """
        if len(self.unlabeled) == 0:
            return self.train
        return Split(images=np.concatenate([np.asarray(self.train.images), np.asarray(self.unlabeled.images)]),
                     labels=np.concatenate([self.train.labels, self.unlabeled.labels]),
                     ids=np.concatenate([self.train.ids, self.unlabeled.ids]))


class ArrayDataset(Dataset):
    """A split as a map-style dataset of ``{"image": uint8 (C,H,W), "label": int64, "index": int64}``.

    ``index`` is the position within the split (what the soft-label store is indexed by); the stable
    source id is ``split.ids[index]``.
    """

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "image": torch.from_numpy(np.array(self.split.images[i], dtype=np.uint8, copy=True)),
            "label": torch.tensor(int(self.split.labels[i]), dtype=torch.long),
            "index": torch.tensor(int(i), dtype=torch.long),
        }


def load_prepared(path: str | Path, *, mmap: bool = True) -> PreparedData:
    """Open prepared data written by :func:`distill.prepare.prepare_to` (images memory-mapped by default).

    A swap that a crash interrupted (only ``.<name>.old`` left) is finished first, as every reader of a swapped
    folder does (:func:`distill.io.swapped_meta`).

    Raises:
        DatasetNotFoundError: the folder or one of its files is missing or unreadable.
    """
    path = Path(path)
    meta_file = swapped_meta(path)
    if meta_file is None:
        raise DatasetNotFoundError(f"prepared data not found at {path.resolve()} (no meta.json); run the data stage "
                                   "first: `dvc repro data` (or `python -m flows stage data`)")
    try:
        meta = DatasetMeta.from_dict(json.loads(meta_file.read_text()))
        splits = {}
        for name in SPLITS:
            if name == "unlabeled" and name not in meta.sizes:  # prepared before unlabeled sets existed: none
                splits[name] = _empty_split()
                continue
            images = np.load(path / f"{name}_images.npy", mmap_mode="r" if mmap and meta.sizes.get(name) else None)
            labels = np.load(path / f"{name}_labels.npy")
            ids = np.load(path / f"{name}_ids.npy")
            if not (images.shape[0] == labels.shape[0] == ids.shape[0] == meta.sizes[name]):
                raise ValueError(f"{name} split has {images.shape[0]} images, {labels.shape[0]} labels, "
                                 f"{ids.shape[0]} ids, meta.json says {meta.sizes[name]}")
            splits[name] = Split(images=images, labels=labels, ids=ids)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetNotFoundError(f"prepared data at {path.resolve()} is incomplete or corrupt ({err}); "
                                   "rerun the data stage: `dvc repro -f data`") from None
    return PreparedData(train=splits["train"], val=splits["val"], test=splits["test"], meta=meta,
                        unlabeled=splits["unlabeled"])
