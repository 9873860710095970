"""Datasets with fixed, seeded splits and a replayable augmentation.

Every dataset is *materialised* once (the ``data`` stage) as uint8 arrays at the training resolution,
with a fixed train/val/test split and stable sample ids, plus a ``meta.json`` that records the class
names, the normalisation statistics and a content fingerprint. Training reads those arrays, never the
original source, so every later stage is reproducible and DVC can version the prepared data.

Sources:

* ``digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits shipped inside
  scikit-learn; no download). The embedded default. Split stratified into train/val/test.
* ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``: torchvision datasets read from ``root``;
  downloaded only when ``download=True``. The official test set is the test split; the official
  training set is split into train/val (``test_fraction`` is not used).
* ``imagefolder``: ``root/<class>/<image>``; each image is resized (shorter side) and centre-cropped
  to ``image_size``. Split stratified into train/val/test.

Normalisation statistics are declared for the torchvision datasets (the values the literature uses)
and computed from the training split for ``digits`` and ``imagefolder``.

Augmentation (:class:`Augmenter`): a random-resized crop (Szegedy et al. 2015, torchvision's
``RandomResizedCrop`` sampling) with an optional horizontal flip. Its parameters are drawn from an
explicit ``torch.Generator`` and returned as a ``(B, 5)`` tensor ``[top, left, height, width, flip]``
in units of the source side (so a parameter row is independent of the resolution); the view is
produced from those parameters alone by a bilinear ``grid_sample``, which computes each output pixel
independently of the rest of the batch. The same parameters therefore give the bit-identical view on
the same device: the soft-label store records parameters at generation and the student replays them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "AUGMENT_VERSION",
    "DATASETS",
    "PARAM_DIM",
    "SPLITS",
    "UNLABELED",
    "Mix",
    "in_batch_mix",
    "sample_lam",
    "ArrayDataset",
    "AugmentSpec",
    "Augmenter",
    "DatasetMeta",
    "DatasetNotFoundError",
    "PreparedData",
    "Split",
    "load_prepared",
    "prepare_dataset",
    "save_prepared",
    "stratified_split",
]

AUGMENT_VERSION = 1  # bump when the meaning of a parameter row or the resampling changes
PARAM_DIM = 5  # [top, left, height, width, flip]
DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder")
SPLITS = ("train", "val", "test", "unlabeled")
UNLABELED = -1  # the label of every image of the unlabeled split: no code can learn from a label it lacks

# Declared per-channel statistics (of pixel values in [0, 1]) for the torchvision datasets.
_DECLARED_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset (or the prepared arrays) is missing or empty; the message says where and how to get it."""


# --------------------------------------------------------------------------------------------------
# Prepared arrays
# --------------------------------------------------------------------------------------------------


@dataclass
class Split:
    """One split: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``, ``ids`` int64 ``(N,)``.

    ``ids`` are stable sample ids: the index of each sample in its source (``load_digits`` order, the
    official torchvision train/test set, the sorted ImageFolder file list), so a sample keeps its id
    whatever the split seed.
    """

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class DatasetMeta:
    """What a prepared dataset is; saved as ``meta.json`` and inside every checkpoint and soft-label store."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DatasetMeta":
        return cls(**data)


def _empty_split() -> Split:
    return Split(images=np.zeros((0, 1, 1, 1), dtype=np.uint8), labels=np.zeros(0, dtype=np.int64),
                 ids=np.zeros(0, dtype=np.int64))


@dataclass
class PreparedData:
    """The splits and their metadata. ``unlabeled`` (labels all :data:`UNLABELED`) holds the training images
    above ``max_per_class`` when they are kept as an unlabeled transfer set; it is empty otherwise."""

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


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices per class into parts of the given fractions (the remainder forms the first part).

    Args:
        labels: ``(N,)`` class of each sample.
        fractions: fractions of every class for parts 1..k; part 0 gets the rest.
        seed: the split's seed (same seed, same split).

    Returns:
        ``k + 1`` sorted index arrays.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for j, frac in enumerate(fractions, start=1):
            n = int(round(frac * len(idx)))
            parts[j].append(idx[start:start + n])
            start += n
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def _cap_per_class(idx: np.ndarray, labels: np.ndarray, cap: Optional[int], seed: int) -> np.ndarray:
    if cap is None:
        return idx
    rng = np.random.default_rng(seed + 1)
    keep = []
    for c in np.unique(labels[idx]):
        members = idx[labels[idx] == c]
        keep.append(members[rng.permutation(len(members))[:cap]])
    return np.sort(np.concatenate(keep))


def _resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``(N, C, H, W)`` uint8 square images to ``size`` (bilinear, antialiased when shrinking)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for start in range(0, len(images), 1024):  # chunked: bounded memory for large datasets
        x = torch.from_numpy(images[start:start + 1024]).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < images.shape[-1])
        out.append(x.round_().clamp_(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out) if out else images[:, :, :size, :size]


def _fingerprint(splits: dict[str, Split], meta: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in SPLITS:
        s = splits[name]
        for arr in (s.images, s.labels, s.ids):
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)).tolist(), x.std(axis=(0, 2, 3)).tolist()


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def _load_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8), 0..16 -> 0..255
    return images, d.target.astype(np.int64), [str(n) for n in d.target_names]


def _torchvision_root(name: str, root: Optional[str]) -> Path:
    if not root:
        raise DatasetNotFoundError(
            f"data.root is not set: {name} is read from a local folder. Set data.root in params.yaml to a "
            f"folder holding (or to receive) the {name} files, and data.download: true to fetch them once "
            "(needs internet)")
    return Path(root).expanduser()


def _load_torchvision(name: str, root: Optional[str], download: bool) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}[name]
    path = _torchvision_root(name, root)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    classes: list[str] = []
    for train in (True, False):
        try:
            ds = cls(root=str(path), train=train, download=download)
        except (RuntimeError, OSError) as err:
            hint = ("the download failed: check the network, or place the files there by hand"
                    if download else "set data.download: true to download it once (needs internet), or place the "
                    f"files under {path} as torchvision's {cls.__name__} expects")
            raise DatasetNotFoundError(f"{name} not found under {path.resolve()} ({err}); {hint}") from None
        data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
        images = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)  # (N, C, H, W)
        labels = np.asarray(ds.targets, dtype=np.int64)
        out["train" if train else "test"] = (np.ascontiguousarray(images, dtype=np.uint8), labels)
        classes = [str(c) for c in ds.classes]
    return out, classes


def _load_imagefolder(root: Optional[str], image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    if not root:
        raise DatasetNotFoundError("data.root is required for data.name 'imagefolder' (a folder root/<class>/<images>)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(f"image folder {path.resolve()} does not exist; set data.root to a folder laid out "
                                   "as root/<class>/<image files>")
    try:
        folder = ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as err:
        raise DatasetNotFoundError(f"no images found under {path.resolve()} ({err}); expected root/<class>/<image files> "
                                   "with .jpg/.png/... images") from None
    resize = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])
    images = np.empty((len(folder), 3, image_size, image_size), dtype=np.uint8)
    from tqdm.auto import tqdm

    for i, (file, _) in enumerate(tqdm(folder.samples, desc="reading images", disable=_progress_off())):
        img = v2.functional.pil_to_tensor(folder.loader(file).convert("RGB"))
        images[i] = resize(img).numpy()
    return images, np.asarray(folder.targets, dtype=np.int64), list(folder.classes)


def _progress_off() -> bool:
    return os.environ.get("DISTILL_PROGRESS", "1") == "0"


def prepare_dataset(name: str, *, root: Optional[str] = None, image_size: int = 16, val_fraction: float = 0.15,
                    test_fraction: float = 0.2, seed: int = 0, download: bool = False,
                    max_per_class: Optional[int] = None, unlabeled: bool = False) -> PreparedData:
    """Load a dataset, split it with a fixed seed and bring it to ``image_size``.

    Args:
        name: one of :data:`DATASETS`.
        root: local folder (torchvision datasets, imagefolder).
        image_size: side of the stored square images.
        val_fraction: share of the training data held out for validation (per class).
        test_fraction: share held out for testing (digits, imagefolder; the others have an official test set).
        seed: split seed.
        download: let torchvision download the dataset into ``root``.
        max_per_class: keep at most this many *training* images per class (a small-data regime); val and test
            are unchanged.
        unlabeled: keep the training images above ``max_per_class`` as the ``unlabeled`` split, their labels
            replaced by :data:`UNLABELED` (an unlabeled transfer set for distillation); else they are dropped.

    Returns:
        The splits and their :class:`DatasetMeta` (fingerprint included).

    Raises:
        DatasetNotFoundError: the data is missing or empty (says where it looked and how to get it).
        ValueError: unknown dataset name.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if unlabeled and max_per_class is None:
        raise ValueError("data.unlabeled keeps the training images above data.max_per_class as unlabeled; "
                         "set data.max_per_class too")
    source = name
    if name in ("digits", "imagefolder"):
        if name == "digits":
            images, labels, classes = _load_digits()
            source = "sklearn.datasets.load_digits"
        else:
            images, labels, classes = _load_imagefolder(root, image_size)
            source = str(Path(root or "").resolve())
        if len(labels) == 0:
            raise DatasetNotFoundError(f"dataset {name} at {source} is empty")
        train_idx, val_idx, test_idx = stratified_split(labels, (val_fraction, test_fraction), seed)
        ids = np.arange(len(labels), dtype=np.int64)
        pools = {"train": (images, labels, ids, train_idx), "val": (images, labels, ids, val_idx),
                 "test": (images, labels, ids, test_idx)}
    else:
        parts, classes = _load_torchvision(name, root, download)
        tr_images, tr_labels = parts["train"]
        te_images, te_labels = parts["test"]
        if len(tr_labels) == 0:
            raise DatasetNotFoundError(f"{name} under {root} has no training images")
        train_idx, val_idx = stratified_split(tr_labels, (val_fraction,), seed)
        tr_ids = np.arange(len(tr_labels), dtype=np.int64)
        te_ids = np.arange(len(te_labels), dtype=np.int64)
        pools = {"train": (tr_images, tr_labels, tr_ids, train_idx), "val": (tr_images, tr_labels, tr_ids, val_idx),
                 "test": (te_images, te_labels, te_ids, np.arange(len(te_labels)))}
        source = f"torchvision.datasets ({Path(root or '').resolve()})"

    pool_images, pool_labels, pool_ids, tr = pools["train"]
    kept = _cap_per_class(tr, pool_labels, max_per_class, seed)
    pools["train"] = (pool_images, pool_labels, pool_ids, kept)
    pools["unlabeled"] = (pool_images, pool_labels, pool_ids,
                          np.setdiff1d(tr, kept) if unlabeled else np.empty(0, dtype=np.int64))
    splits: dict[str, Split] = {}
    for split_name, (imgs, labs, ids, idx) in pools.items():
        labels = labs[idx].astype(np.int64)
        if split_name == "unlabeled":  # the labels are dropped here, before anything is saved
            labels = np.full_like(labels, UNLABELED)
        splits[split_name] = Split(images=_resize_uint8(np.ascontiguousarray(imgs[idx]), image_size),
                                   labels=labels, ids=ids[idx].astype(np.int64))
    for split_name, s in splits.items():
        if len(s) == 0 and split_name != "unlabeled":
            raise DatasetNotFoundError(f"the {split_name} split of {name} is empty; lower data.max_per_class or "
                                       "raise the split fractions")
    channels = int(splits["train"].images.shape[1])
    if name in _DECLARED_STATS:
        mean, std = (list(v) for v in _DECLARED_STATS[name])
    else:
        mean, std = _channel_stats(splits["train"].images)
    std = [max(s, 1e-3) for s in std]
    meta_fields = dict(name=name, num_classes=len(classes), class_names=classes, channels=channels,
                       image_size=image_size, mean=mean, std=std, sizes={k: len(v) for k, v in splits.items()},
                       seed=seed, source=source)
    meta = DatasetMeta(**meta_fields, fingerprint=_fingerprint(splits, meta_fields))
    return PreparedData(train=splits["train"], val=splits["val"], test=splits["test"], meta=meta,
                        unlabeled=splits["unlabeled"])


# --------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------


def save_prepared(data: PreparedData, out_dir: str | Path) -> Path:
    """Write the splits as ``.npy`` arrays plus ``meta.json``, atomically (temp folder, then rename).

    Args:
        data: what :func:`prepare_dataset` returned.
        out_dir: target folder; replaced as a whole.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in SPLITS:
        s = data.split(name)
        np.save(tmp / f"{name}_images.npy", s.images)
        np.save(tmp / f"{name}_labels.npy", s.labels)
        np.save(tmp / f"{name}_ids.npy", s.ids)
    (tmp / "meta.json").write_text(json.dumps(data.meta.to_dict(), indent=2) + "\n")
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def load_prepared(path: str | Path, *, mmap: bool = True) -> PreparedData:
    """Open prepared data written by :func:`save_prepared` (images memory-mapped by default).

    Raises:
        DatasetNotFoundError: the folder or one of its files is missing or unreadable.
    """
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
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
        raise DatasetNotFoundError(f"prepared data at {path.resolve()} is incomplete or corrupt ({err}); rerun the data "
                                   "stage: `dvc repro -f data`") from None
    return PreparedData(train=splits["train"], val=splits["val"], test=splits["test"], meta=meta,
                        unlabeled=splits["unlabeled"])


# --------------------------------------------------------------------------------------------------
# Replayable augmentation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mix:
    """Mixup partners for a batch of views (Zhang et al. 2018): the model sees
    ``lam * view(image) + (1 - lam) * view(partner)``, pixel by pixel, after cropping and before normalising.

    Attributes:
        images: uint8 ``(B, C, H, W)``, each sample's partner image.
        labels: ``(B,)`` the partners' true classes (the label loss mixes with the same weights).
        params: ``(B, 5)`` the partners' own crop parameters.
        lam: float32 ``(B,)`` the weight of the sample itself, in [0, 1].
    """

    images: Tensor
    labels: Tensor
    params: Tensor
    lam: Tensor


def sample_lam(n: int, alpha: float, generator: torch.Generator) -> Tensor:
    """``n`` mixing weights from Beta(alpha, alpha), reproducible from ``generator`` (float32 ``(n,)``)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return torch.from_numpy(rng.beta(alpha, alpha, size=n)).float()


def in_batch_mix(images: Tensor, labels: Tensor, params: Tensor, alpha: float, generator: torch.Generator) -> Mix:
    """Pair every sample with the batch in reverse order (timm's pairing) with its own Beta(alpha, alpha) weight."""
    return Mix(images=images.flip(0), labels=labels.flip(0), params=params.flip(0),
               lam=sample_lam(images.shape[0], alpha, generator))


@dataclass(frozen=True)
class AugmentSpec:
    """Random-resized crop (area ``scale``, aspect ``ratio``) and optional horizontal flip."""

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: bool = False
    version: int = field(default=AUGMENT_VERSION)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "random_resized_crop", "scale": [float(v) for v in self.scale],
                "ratio": [float(v) for v in self.ratio], "hflip": bool(self.hflip), "version": int(self.version)}


class Augmenter:
    """Samples view parameters and renders views from them; also normalises.

    Args:
        spec: the augmentation.
        out_size: side of the rendered view (the model's input size).
        mean: per-channel mean of pixel values in [0, 1].
        std: per-channel std.
    """

    def __init__(self, *, spec: AugmentSpec, out_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.spec = spec
        self.out_size = int(out_size)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def sample(self, n: int, generator: torch.Generator, attempts: int = 10) -> Tensor:
        """Draw ``n`` parameter rows ``[top, left, height, width, flip]`` (fractions of the source side).

        torchvision's ``RandomResizedCrop`` rule, vectorised: up to ``attempts`` draws of (area, log-aspect) per
        image; the first that fits is used, else the whole image.
        """
        lo, hi = self.spec.scale
        log_r = torch.log(torch.tensor(self.spec.ratio, dtype=torch.float64))
        area = lo + (hi - lo) * torch.rand(n, attempts, generator=generator, dtype=torch.float64)
        aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(n, attempts, generator=generator,
                                                                         dtype=torch.float64))
        w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
        ok = (w <= 1.0) & (h <= 1.0)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        rows = torch.arange(n)
        w = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.ones(n, dtype=torch.float64))
        h = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.ones(n, dtype=torch.float64))
        pos = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        top, left = pos[:, 0] * (1.0 - h), pos[:, 1] * (1.0 - w)
        coin = torch.rand(n, generator=generator, dtype=torch.float64)
        flip = (coin < 0.5).double() if self.spec.hflip else torch.zeros(n, dtype=torch.float64)
        return torch.stack([top, left, h, w, flip], dim=1).float()  # (n, 5)

    @staticmethod
    def eval_params(n: int) -> Tensor:
        """The identity view (whole image, no flip) for ``n`` images."""
        return torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).expand(n, PARAM_DIM).clone()

    def render(self, images: Tensor, params: Tensor) -> Tensor:
        """Render views as float images in [0, 1], ``(B, C, out, out)``, without normalisation.

        Args:
            images: uint8 ``(B, C, H, W)`` (square).
            params: ``(B, 5)`` rows from :meth:`sample` / :meth:`eval_params`.
        """
        if params.ndim != 2 or params.shape != (images.shape[0], PARAM_DIM):
            raise ValueError(f"expected view parameters of shape ({images.shape[0]}, {PARAM_DIM}), got {tuple(params.shape)}")
        x = images.float().div_(255.0)
        p = params.to(device=x.device, dtype=torch.float32)
        # Identity rows are copied, not resampled: grid_sample at pixel centres is exact only up to ~3e-6, and a
        # row must render the same whether its batch is all-identity or mixed.
        same_size = x.shape[-1] == self.out_size
        rows_identity = (p == self.eval_params(1).to(p.device)).all(1) if same_size else None
        if rows_identity is not None and bool(rows_identity.all()):
            return x
        top, left, h, w, flip = p.unbind(1)
        # Map output coords in [-1, 1] to source coords (align_corners=False: [-1, 1] spans pixel edges).
        sx = w * (1.0 - 2.0 * flip)
        theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
        theta[:, 0, 0] = sx
        theta[:, 0, 2] = 2.0 * left + w - 1.0
        theta[:, 1, 1] = h
        theta[:, 1, 2] = 2.0 * top + h - 1.0
        grid = F.affine_grid(theta, [x.shape[0], x.shape[1], self.out_size, self.out_size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if rows_identity is not None and bool(rows_identity.any()):
            out[rows_identity] = x[rows_identity]
        return out

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, images: Tensor, params: Tensor, mix: Optional["Mix"] = None) -> Tensor:
        """Render and normalise: the model's input for the views ``params`` of ``images``, mixed with ``mix``."""
        x = self.render(images, params)
        if mix is not None:
            lam = mix.lam.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
            x = lam * x + (1.0 - lam) * self.render(mix.images.to(x.device), mix.params)
        return self.normalize(x)

    def describe(self) -> dict[str, Any]:
        """Everything that determines a rendered view (stored with soft labels, checked on replay)."""
        return {**self.spec.to_dict(), "out_size": self.out_size, "mean": [round(v, 6) for v in self.mean.flatten().tolist()],
                "std": [round(v, 6) for v in self.std.flatten().tolist()], "resample": "grid_sample-bilinear-border"}
