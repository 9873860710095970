"""The data stage's preparation: raw data to the fixed, seeded splits of ``data/prepared/``.


Every dataset is *materialised* once (the ``data`` stage, :func:`prepare_to`) as uint8 arrays at the training
resolution, with a fixed train/val/test split and stable sample ids, plus a ``meta.json`` that records the class
names, the normalisation statistics and a content fingerprint. Training reads those arrays (memory-mapped), never
the original source, so every later stage is reproducible and DVC can version the prepared data.

Sources:

* ``digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits shipped inside
  scikit-learn; no download). The embedded default. Split stratified into train/val/test.
* ``mnist``, ``fashion_mnist``: the four official idx files (``train-images-idx3-ubyte`` ..., plain or
  ``.gz``), read from ``root`` itself (the layout Debian's ``dataset-fashion-mnist`` installs in
  ``/usr/share/datasets/fashion-mnist``) or from torchvision's ``root/FashionMNIST/raw/`` (``root/MNIST/raw/``);
  downloaded by torchvision only when ``download=True``.
* ``cifar10``, ``cifar100``: torchvision datasets read from ``root``; downloaded only when ``download=True``.

  For all four the official test set is the test split and the official training set is split into train/val
  (``test_fraction`` is not used).
* ``imagefolder``: a folder of image files (the extensions torchvision's ``ImageFolder`` accepts, found
  recursively inside each class folder; names starting with ``.`` are ignored). Two layouts:

  - *split*: ``root/train/<class>/``, ``root/val/<class>/`` and optionally ``root/test/<class>/`` (the
    torchvision/DeiT layout). A missing ``val/`` or ``test/`` is carved out of ``train/``, seeded and
    stratified, ``val_fraction`` / ``test_fraction`` of ``train/``'s images per class (rounded: a class of one or
    two images gets none, and a warning names every class a split lacks).
  - *flat*: ``root/<class>/``, split by seed, stratified: ``val_fraction`` and ``test_fraction`` of each class.

  The classes are the sorted folder names of ``train/`` (flat: of ``root``), as torchvision's ``ImageFolder``;
  a class folder in ``val/`` or ``test/`` that ``train/`` lacks is an error. ``root/unlabeled/`` (images at any
  depth, no classes) is the unlabeled transfer set, read when ``unlabeled=True``; the name is therefore
  reserved (never a class). Each image is decoded to RGB (16-bit images by their high byte, as PIL reads 16-bit
  colour PNGs; PIL's own conversion would clip 16-bit grey to white), its shorter side resized to ``image_size``
  (bilinear, antialiased) and centre-cropped, in parallel worker processes, and written straight into the
  split's ``.npy`` file, so memory does not grow with the dataset. An unreadable image is an error naming the
  file, or, with ``skip_bad_images=True``, skipped and counted in ``meta.json`` (``skipped_images``,
  ``skipped_examples``).

Stable sample ids (``Split.ids``): the position of each sample in its *source*: the ``load_digits`` order, the
official torchvision train or test set, or the sorted file list of an image folder (sorted by sub-folder, then
file name, as ``ImageFolder``; over all classes in class order). In the flat layout every split's ids index the
one file list of ``root``. In the split layout each folder is a source of its own: ids of images from ``train/``
index ``train/``'s list (also when val or test is carved out of it), those from ``val/`` index ``val/``'s, and so
on; ``unlabeled/``'s ids index its own list. An id therefore names an image only together with its folder:
``meta.json``'s ``id_sources`` lists, per split, the folders its rows come from in order, with their counts
(the unlabeled split holds the training images above ``max_per_class`` first, then ``unlabeled/``'s). A
skipped unreadable file keeps its position, so the other ids do not move.

Normalisation statistics are declared for the torchvision datasets (the values the literature uses)
and computed, exactly, from the training split for ``digits`` and ``imagefolder``.

How the samples are split (seed, fractions, the labeled images per class, the pool, the unlabeled split) is one
:class:`SplitSpec`. Only the data stage (and the pre-flight check, :func:`check_source`) imports this module: the
stages after it read the prepared folder (:mod:`distill.data`), so an edit here reruns the data stage alone, and
the rest only when ``data/prepared`` changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import math
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from distill.data import SPLITS, UNLABELED, DatasetMeta, DatasetNotFoundError, PreparedData, load_prepared
from distill.io import progress, staged_dir

__all__ = ["DATASETS", "IDX_FILES", "BadImageError", "SplitSpec", "check_source", "decode_image", "prepare_dataset",
           "prepare_to", "read_idx", "stratified_split"]

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder")

# Declared per-channel statistics (of pixel values in [0, 1]) for the torchvision datasets.
_DECLARED_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}
_SKIPPED_EXAMPLES = 5  # how many skipped files meta.json names
_log = logging.getLogger("distill.prepare")


class BadImageError(ValueError):
    """An image file cannot be decoded; the message names the file and how to skip such files."""


@dataclass(frozen=True)
class SplitSpec:
    """How a dataset's samples are split: one seed, the held-out fractions, and the small-label regime.

    Attributes:
        seed: the split's seed (same seed, same split).
        val_fraction: share of each class held out for validation (when not given as a folder or official set).
        test_fraction: share of each class held out for testing (``digits``, image folders without ``test/``).
        max_per_class: keep at most this many *training* images per class (a small-data regime); val and test
            are unchanged.
        pool_per_class: use at most this many training images per class at all (seeded; None: all): the pool
            that the labeled images (``max_per_class``) and the unlabeled split are drawn from. The labeled images
            of a smaller ``max_per_class`` are among those of a larger one (same seed and pool).
        unlabeled: build the ``unlabeled`` split (labels :data:`~distill.data.UNLABELED`): the training images
            above ``max_per_class`` and an image folder's ``root/unlabeled/``; else neither is kept.
    """

    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    max_per_class: int | None = None
    pool_per_class: int | None = None
    unlabeled: bool = False

    @classmethod
    def of(cls, data: Any, seed: int) -> SplitSpec:
        """The split the ``data`` params ask for (the validated group, or a stage's view: only its fields are read),
        with the run's ``seed``: what the data stage prepares and what the pre-flight check plans."""
        return cls(seed=seed, val_fraction=data.val_fraction, test_fraction=data.test_fraction,
                   max_per_class=data.max_per_class, pool_per_class=data.pool_per_class, unlabeled=data.unlabeled)


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
            n = round(frac * len(idx))
            parts[j].append(idx[start:start + n])
            start += n
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def _cap_per_class(idx: np.ndarray, labels: np.ndarray, cap: int | None, seed: int, stream: int = 1) -> np.ndarray:
    """At most ``cap`` of the samples ``idx`` per class, drawn by ``(seed, stream)``; sorted. Caps of one stream
    are nested: the samples kept under a smaller cap are among those kept under a larger one."""
    if cap is None:
        return idx
    rng = np.random.default_rng([seed, stream] if stream != 1 else seed + 1)  # stream 1: the labeled images
    keep = []
    for c in np.unique(labels[idx]):
        members = idx[labels[idx] == c]
        keep.append(members[rng.permutation(len(members))[:cap]])
    return np.sort(np.concatenate(keep)) if keep else idx


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
    return np.concatenate(out) if out else np.zeros((0, *images.shape[1:2], size, size), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Sources: what each split is made of, before anything is decoded
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pool:
    """A source of samples whose positions are their stable ids: a folder's sorted file list, or an array."""

    folder: str  # where the ids point, relative to the root (image folders; "." for the flat layout)
    labels: np.ndarray  # (n,) int64 class of each sample (UNLABELED for an unlabeled folder)
    files: Sequence[str] = ()  # image folders: the image files, sorted
    images: np.ndarray | None = None  # in-memory sources: uint8 (n, C, H, W) at the source resolution


@dataclass(frozen=True)
class _Part:
    """A run of rows of one split: the samples ``index`` (sorted positions, i.e. ids) of ``pool``."""

    pool: _Pool
    index: np.ndarray


@dataclass(frozen=True)
class _Plan:
    classes: list[str]
    source: str
    channels: int
    splits: dict[str, list[_Part]]  # every name of SPLITS, in order
    root: Path | None = None  # image folders: ids and skipped files are named relative to it

    def count(self, split: str) -> int:
        return sum(len(p.index) for p in self.splits[split])


def _assign(train: _Pool, *, val: _Pool | None, test: _Pool | None, extra: _Pool | None,
            split: SplitSpec) -> dict[str, list[_Part]]:
    """The rows of every split: a missing val or test pool is carved out of ``train`` (seeded, stratified), the
    training images are cut to a pool of ``pool_per_class`` per class (the others are not used at all), the
    training split is capped at ``max_per_class`` per class of that pool, and the unlabeled split gets the rest of
    the pool (when ``unlabeled``) followed by the whole ``extra`` pool."""
    carved = [name for name, pool in (("val", val), ("test", test)) if pool is None]
    fractions = [split.val_fraction if name == "val" else split.test_fraction for name in carved]
    seed = split.seed
    train_idx, *carved_idx = stratified_split(train.labels, fractions, seed)
    rows = {"val": [_Part(val, np.arange(len(val.labels)))] if val is not None else [],
            "test": [_Part(test, np.arange(len(test.labels)))] if test is not None else []}
    for name, idx in zip(carved, carved_idx):
        rows[name] = [_Part(train, idx)]
    train_idx = _cap_per_class(train_idx, train.labels, split.pool_per_class, seed, stream=2)
    kept = _cap_per_class(train_idx, train.labels, split.max_per_class, seed)
    rest = [_Part(train, np.setdiff1d(train_idx, kept))]
    if extra is not None:
        rest.append(_Part(extra, np.arange(len(extra.labels))))
    return {"train": [_Part(train, kept)], "val": rows["val"], "test": rows["test"],
            "unlabeled": [p for p in rest if len(p.index)] if split.unlabeled else []}


def _digits_pool() -> tuple[_Pool, list[str]]:
    pixels, target = _digits_arrays()
    images = np.rint(pixels.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)  # (1797, 1, 8, 8), 0..255
    return _Pool(folder="", labels=target, images=images), [str(n) for n in range(10)]


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``load_digits()``: ``(data, target)``, 1797 x 64 pixels in 0..16 and their labels.

    Read from the file the function reads (``sklearn/datasets/data/digits.csv.gz``: 64 pixels and the label per
    row), found without importing scikit-learn: its import takes seconds (SciPy with it), and the data stage, DVC's
    ``check_params`` of every run and every variant, and the commands' pre-flight all plan digits. Any other layout
    of the package falls back to ``load_digits`` itself (tests/test_data.py compares the two).
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        data = np.loadtxt(csv, delimiter=",")
        return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data, d.target.astype(np.int64)


def _torchvision_root(name: str, root: str | Path | None) -> Path:
    if not root:
        raise DatasetNotFoundError(
            f"data.root is not set: {name} is read from a local folder. Set data.root in params.yaml to a "
            f"folder holding (or to receive) the {name} files, and data.download: true to fetch them once "
            "(needs internet)")
    return Path(root).expanduser()


# The official idx files of MNIST and Fashion-MNIST (LeCun's format), plain or gzipped.
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_SUBFOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # torchvision's root/<name>/raw/ layout
_APT_PACKAGE = {"fashion_mnist": "dataset-fashion-mnist"}  # Debian installs it in /usr/share/datasets/fashion-mnist


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file of unsigned bytes (MNIST's format; gzip-compressed when the name ends in ``.gz``) as an array.

    Raises:
        ValueError: not an idx file of unsigned bytes, or fewer values than its header declares (truncated).
    """
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as err:  # a damaged gzip stream: BadGzipFile (an OSError) or EOFError
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err})") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an idx file of unsigned bytes (it starts with {data[:4].hex() or 'nothing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise ValueError(f"{path} holds {len(data) - header} values but its header declares {shape} (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_folder(name: str, root: Path) -> Path | None:
    """The folder holding all four official idx files: ``root`` itself (Debian's layout) or ``root/<Name>/raw``."""
    for folder in (root, root / _IDX_SUBFOLDER[name] / "raw"):
        if all(_idx_file(folder, stem) for pair in IDX_FILES.values() for stem in pair):
            return folder
    return None


def _idx_pools(name: str, root: Path, download: bool) -> tuple[dict[str, _Pool], list[str]]:
    """MNIST / Fashion-MNIST from their official idx files: the official training and test sets."""
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}[name]
    folder = _idx_folder(name, root)
    if folder is None and download:
        for train in (True, False):  # torchvision writes root/<Name>/raw/
            try:
                cls(root=str(root), train=train, download=True)
            except (RuntimeError, OSError) as err:
                raise DatasetNotFoundError(f"{name}: the download into {root.resolve()} failed ({err}); check the "
                                           "network, or place the files there by hand") from None
        folder = _idx_folder(name, root)
    if folder is None:
        wanted = ", ".join(f"{stem}[.gz]" for pair in IDX_FILES.values() for stem in pair)
        fix = (f"`apt-get install {_APT_PACKAGE[name]}` installs them in /usr/share/datasets/fashion-mnist (set "
               "data.root to it)" if name in _APT_PACKAGE else "place them there")
        raise DatasetNotFoundError(
            f"{name}: the official files ({wanted}) are not in {root.resolve()} nor in "
            f"{(root / _IDX_SUBFOLDER[name] / 'raw').resolve()}; {fix}, or set data.download: true to fetch them "
            "once (needs internet)")
    pools: dict[str, _Pool] = {}
    for split, (images_stem, labels_stem) in IDX_FILES.items():
        images_file, labels_file = _idx_file(folder, images_stem), _idx_file(folder, labels_stem)
        try:
            images, labels = read_idx(images_file), read_idx(labels_file)
        except ValueError as err:
            raise DatasetNotFoundError(f"{name}: {err}; replace the file (reinstall the package or download it "
                                       "again)") from None
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetNotFoundError(f"{name}: {images_file} holds images of shape {images.shape} and {labels_file} "
                                       f"labels of shape {labels.shape}; they do not belong together")
        pools[split] = _Pool(folder="", labels=labels.astype(np.int64), images=np.ascontiguousarray(images[:, None]))
    return pools, [str(c) for c in cls.classes]


def _torchvision_pools(name: str, root: str | Path | None, download: bool) -> tuple[dict[str, _Pool], list[str]]:
    path = _torchvision_root(name, root)
    if name in _IDX_SUBFOLDER:
        return _idx_pools(name, path, download)
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    out: dict[str, _Pool] = {}
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
        out["train" if train else "test"] = _Pool(folder="", labels=np.asarray(ds.targets, dtype=np.int64),
                                                  images=np.ascontiguousarray(images, dtype=np.uint8))
        classes = [str(c) for c in ds.classes]
    if len(out["train"].labels) == 0:
        raise DatasetNotFoundError(f"{name} under {path.resolve()} has no training images")
    return out, classes


def _visible_dirs(folder: Path) -> list[str]:
    """Sorted names of the sub-folders of ``folder`` whose names do not start with ``.``."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    """Image files below ``folder`` at any depth, in ``ImageFolder``'s order (by sub-folder, then name)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    found: list[tuple[str, str]] = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [(parent, f) for f in files if not f.startswith(".") and has_file_allowed_extension(f, IMG_EXTENSIONS)]
    return [os.path.join(parent, f) for parent, f in sorted(found)]


def _class_pool(root: Path, folder: str, classes: Sequence[str], present: Sequence[str]) -> _Pool:
    """The images of ``root/folder/<class>/`` for the ``present`` class folders, labelled by their place in
    ``classes``; a class folder of train (or of the flat root) without images is an error."""
    files: list[str] = []
    labels: list[int] = []
    empty = []
    for name in present:
        found = _image_files(root / folder / name)
        if not found and folder in ("train", "."):
            empty.append(name)
        files += found
        labels += [classes.index(name)] * len(found)
    if empty:
        raise DatasetNotFoundError(f"class folder(s) {', '.join(empty)} under {(root / folder).resolve()} hold no "
                                   "images; remove them or add images (.jpg/.png/...)")
    return _Pool(folder=folder, labels=np.asarray(labels, dtype=np.int64), files=files)


def _folder_pools(root: str | Path | None, unlabeled: bool) -> tuple[dict[str, _Pool | None], list[str], Path]:
    """Find the layout of an image folder and list its files: the pools ``train``, ``val``, ``test`` (None:
    to be carved out of train) and ``unlabeled`` (None: not asked for, or no ``unlabeled/`` folder)."""
    if not root:
        raise DatasetNotFoundError("data.root is required for data.name 'imagefolder' (a folder root/train/<class>/"
                                   "<images> and root/val/<class>/..., or root/<class>/<images>)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(f"image folder {path.resolve()} does not exist; set data.root to a folder laid out "
                                   "as root/train/<class>/<images> (+ root/val/, root/test/) or root/<class>/<images>")
    dirs = _visible_dirs(path)
    pools: dict[str, _Pool | None] = {"val": None, "test": None, "unlabeled": None}
    if "train" in dirs:  # the split layout
        stray = [d for d in dirs if d not in SPLITS]
        if stray:
            raise ValueError(f"image folder {path.resolve()} has train/ (the split layout) and also the folder(s) "
                             f"{', '.join(stray)}: only train/, val/, test/ and unlabeled/ belong there; move class "
                             "folders into train/<class>/ (or val/, test/)")
        classes = _visible_dirs(path / "train")
        pools["train"] = _class_pool(path, "train", classes, classes)
        for split in ("val", "test"):
            if split in dirs:
                present = _visible_dirs(path / split)
                unknown = [c for c in present if c not in classes]
                if unknown:
                    raise ValueError(f"class folder(s) {', '.join(unknown)} in {(path / split).resolve()} are not "
                                     f"classes of train/ ({', '.join(classes)}): every class must have training images")
                pools[split] = _class_pool(path, split, classes, present)
                if not len(pools[split].labels):
                    raise DatasetNotFoundError(f"no images found under {(path / split).resolve()}: put images in "
                                               f"{split}/<class>/ (images without labels go in unlabeled/), or remove "
                                               f"{split}/ to carve the {split} split out of train/")
    else:
        misplaced = [d for d in ("val", "test") if d in dirs]
        if misplaced:
            raise ValueError(f"image folder {path.resolve()} has {'/, '.join(misplaced)}/ but no train/: add "
                             "train/<class>/, or use the flat layout root/<class>/ (split by seed)")
        classes = [d for d in dirs if d != "unlabeled"]
        pools["train"] = _class_pool(path, ".", classes, classes)
    if not classes or not len(pools["train"].labels):
        where = path / "train" if "train" in dirs else path
        raise DatasetNotFoundError(f"no images found under {where.resolve()}; expected class folders "
                                   f"{where.name}/<class>/<image files> with .jpg/.png/... images")
    if unlabeled and "unlabeled" in dirs:
        files = _image_files(path / "unlabeled")
        pools["unlabeled"] = _Pool(folder="unlabeled", labels=np.full(len(files), UNLABELED, dtype=np.int64),
                                   files=files)
    return pools, classes, path


def _where(path: Path) -> str:
    """How ``meta.json`` names a raw-data folder: relative to the working directory (the project root, where DVC
    runs the stage) when it lies inside it, so the same data in another clone or a ``dvc exp run --temp`` copy
    has the same fingerprint; absolute otherwise."""
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _plan(name: str, *, root: str | Path | None, download: bool, split: SplitSpec) -> _Plan:
    """Everything about a dataset but its pixels: classes, and which sample of which source each split gets."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    folder: Path | None = None
    unlabeled, max_per_class = split.unlabeled, split.max_per_class
    if name == "digits":
        pool, classes = _digits_pool()
        splits = _assign(pool, val=None, test=None, extra=None, split=split)
        source, channels = "sklearn.datasets.load_digits", 1
    elif name == "imagefolder":
        pools, classes, folder = _folder_pools(root, unlabeled)
        splits = _assign(pools["train"], val=pools["val"], test=pools["test"], extra=pools["unlabeled"], split=split)
        source, channels = _where(folder), 3
    else:
        tv, classes = _torchvision_pools(name, root, download)
        splits = _assign(tv["train"], val=None, test=tv["test"], extra=None, split=split)
        source, channels = f"torchvision.datasets ({_where(Path(root or ''))})", tv["train"].images.shape[1]
    plan = _Plan(classes=classes, source=source, channels=int(channels), splits=splits, root=folder)
    for part in ("train", "val", "test"):
        if plan.count(part) == 0:
            raise DatasetNotFoundError(f"the {part} split of {name} is empty; lower data.max_per_class or raise the "
                                       "split fractions")
    _warn_missing_classes(plan, name)
    if unlabeled and plan.count("unlabeled") == 0:
        where = f" (no images under {folder / 'unlabeled'}/)" if folder is not None else ""
        how = ("set data.max_per_class (the training images above it are kept without their labels)"
               if max_per_class is None else f"lower data.max_per_class (no class has more than {max_per_class} "
               "training images)")
        extra = f", or put images under {folder / 'unlabeled'}/" if folder is not None else ""
        raise ValueError(f"data.unlabeled is true but the unlabeled split of {name} would be empty{where}: {how}"
                         f"{extra}, or set data.unlabeled: false")
    return plan


def _warn_missing_classes(plan: _Plan, name: str) -> None:
    """Warn when a class has no image in the train, val or test split: a class too small to split (one or two
    images get none when ``round(fraction * n)`` is 0), or a val/ or test/ folder without it. Training goes on
    (long-tailed data has such classes); the warning says that the accuracy on that split ignores them.
    """
    labels = {s: np.concatenate([p.pool.labels[p.index] for p in plan.splits[s]] or [np.zeros(0, np.int64)])
              for s in ("train", "val", "test")}
    total = np.bincount(np.concatenate(list(labels.values())), minlength=len(plan.classes))
    for split, found in labels.items():
        absent = np.setdiff1d(np.flatnonzero(total), found).tolist()
        if not absent:
            continue
        listed = ", ".join(f"{plan.classes[c]!r} ({total[c]} image{'s' if total[c] != 1 else ''})" for c in absent[:8])
        more = f" and {len(absent) - 8} more" if len(absent) > 8 else ""
        fix = ("add images to them, or lower data.val_fraction and data.test_fraction" if split == "train" else
               f"add images to them, give a {split}/ folder that has them, or raise data.{split}_fraction (each class "
               "gets round(fraction x its images))")
        _log.warning("%s: class(es) %s%s have no image in the %s split, so its accuracy says nothing about them: %s",
                     name, listed, more, split, fix)


# --------------------------------------------------------------------------------------------------
# Decoding: image files in worker processes, in-memory arrays in batches
# --------------------------------------------------------------------------------------------------


def _rgb_pixels(path: str | Path) -> Tensor:
    """The RGB pixels of an image file as uint8 ``(3, H, W)`` (a channels-last view), as torchvision's
    ``ImageFolder`` reads them: ``PIL.Image.open(...).convert("RGB")``, no EXIF rotation; except 16-bit grey images,
    which that would clip to white: they keep their high byte (:func:`_grey16_to_rgb8`).

    Grey and colour JPEGs (magic bytes, whatever the file name) are decoded by torchvision's libjpeg-turbo decoder
    straight into a tensor: the same library with the same settings as PIL's (accurate integer DCT, smooth chroma
    upsampling), so the same pixels, about a third faster. Anything else (CMYK JPEGs included) goes through PIL.
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    data = read_file(str(path))
    if data[:3].tolist() == [0xFF, 0xD8, 0xFF]:
        x = decode_jpeg(data, mode=ImageReadMode.UNCHANGED)  # (C, H, W); a truncated file raises here
        if x.shape[0] in (1, 3):
            return x.permute(1, 2, 0).expand(-1, -1, 3).contiguous().permute(2, 0, 1)
    try:
        img = Image.open(io.BytesIO(data.numpy()))
    except UnidentifiedImageError:  # its message would name the in-memory buffer, not the file
        raise ValueError("not an image format PIL can read") from None
    if img.mode in _SIXTEEN_BIT_GREY:
        return _grey16_to_rgb8(np.asarray(img))
    if img.mode != "RGB":
        img = img.convert("RGB")  # also decodes; a truncated file raises here
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


# PIL's modes for 16-bit grey images (PNG, TIFF): convert("RGB") clips them at 255, so nearly every pixel would turn
# white; "I" (32-bit) is how some readers hand over 16-bit grey.
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _grey16_to_rgb8(pixels: np.ndarray) -> Tensor:
    """16-bit grey pixels ``(H, W)`` as RGB uint8 ``(3, H, W)``: the high byte, as PIL reads 16-bit colour PNGs
    (``RGB;16B``), so a 16-bit image reads the same whether it is saved grey or colour."""
    grey = (np.clip(pixels.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    return torch.from_numpy(grey)[None].expand(3, -1, -1)


def decode_image(path: str | Path, size: int) -> Tensor:
    """Read an image file as RGB uint8 ``(3, size, size)``: shorter side resized to ``size`` (bilinear,
    antialiased), then centre-cropped. What the data stage stores for every image of an image folder: the same
    array as ``ImageFolder`` with ``v2.Compose([PILToTensor(), Resize(size, antialias=True), CenterCrop(size)])``.

    Raises:
        OSError, RuntimeError, ValueError, ...: whatever the decoder raises for an unreadable file.
    """
    from torchvision.transforms.v2 import functional as TF

    x = _rgb_pixels(path)
    return TF.center_crop(TF.resize(x, [size], antialias=True), [size]).contiguous()


class _Batch(NamedTuple):
    images: Tensor  # uint8 (b, C, S, S): the readable images of the batch, in order
    failed: list[tuple[int, str]]  # (position in the batch, error) of each unreadable image
    sums: Tensor  # int64 (C,): sum of the pixel values of `images`, per channel
    squares: Tensor  # int64 (C,): sum of their squares


def _pixel_sums(images: Tensor) -> tuple[Tensor, Tensor]:
    """Exact per-channel sums of the pixel values of uint8 ``(B, C, H, W)`` images, and of their squares.

    Through a histogram of the 256 levels per channel: an order of magnitude faster than widening every pixel.
    """
    levels = torch.arange(256, dtype=torch.int64)
    hist = torch.stack([torch.bincount(c.reshape(-1), minlength=256) for c in images.transpose(0, 1)])  # (C, 256)
    return hist @ levels, hist @ (levels * levels)


class _ImageFiles(Dataset):
    """Decodes image files for a DataLoader; an unreadable file gives its error instead of an image."""

    def __init__(self, files: Sequence[str], size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor | None, str]:
        try:
            return decode_image(self.files[i], self.size), ""
        except Exception as err:  # noqa: BLE001 -- any failure to decode makes the file unusable; the caller decides
            return None, f"{type(err).__name__}: {err}"

    def collate(self, items: list[tuple[Tensor | None, str]]) -> _Batch:
        """Runs in the worker: stacks the readable images and sums their pixels there, off the main process."""
        good = [x for x, _ in items if x is not None]
        x = torch.stack(good) if good else torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)
        return _Batch(x, [(i, err) for i, (img, err) in enumerate(items) if img is None], *_pixel_sums(x))


def _default_workers(num_batches: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    workers = min(cpus, 8, num_batches)
    return workers if workers > 1 else 0  # one worker would only add a process: decode in this one


def _decoded(jobs: list[tuple[str, _Part, np.ndarray]], size: int, workers: int | None) -> Iterator[_Batch]:
    """The decoded images of every job ``(split, part, positions)``, in order, one :class:`_Batch` per job."""
    if not jobs:
        return
    if jobs[0][1].pool.images is not None:  # in-memory sources (all jobs are): resize here, batch by batch
        for _, part, idx in jobs:
            x = torch.from_numpy(_resize_uint8(np.ascontiguousarray(part.pool.images[idx]), size))
            yield _Batch(x, [], *_pixel_sums(x))
        return
    files = [part.pool.files[i] for _, part, idx in jobs for i in idx]
    ends = np.cumsum([len(idx) for _, _, idx in jobs]).tolist()
    dataset = _ImageFiles(files, size)
    loader = DataLoader(dataset, batch_sampler=[range(end - len(idx), end) for (_, _, idx), end in zip(jobs, ends)],
                        num_workers=_default_workers(len(jobs)) if workers is None else workers,
                        collate_fn=dataset.collate)
    yield from loader


# --------------------------------------------------------------------------------------------------
# Writing: straight to disk, batch by batch, into a staging folder swapped in at the end
# --------------------------------------------------------------------------------------------------


def _npy_header(shape: tuple[int, ...], dtype: Any, length: int = 0) -> bytes:
    """The ``.npy`` (version 1.0) header of a C-order array, byte for byte as ``np.save`` writes it; padded with
    spaces to ``length`` bytes when that is longer (the format's own padding, so ``np.load`` reads it)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    header = buf.getvalue()
    if length > len(header):  # magic (6 bytes), version (2), header length (uint16), header text ending in "\n"
        header = header[:-1] + b" " * (length - len(header)) + b"\n"
        header = header[:8] + struct.pack("<H", len(header) - 10) + header[10:]
    return header


class _RowWriter:
    """Appends the rows of a uint8 ``(N, C, H, W)`` array to an open ``.npy`` file as they come, with plain writes.

    Written pages stay in the page cache, not in this process's resident memory (those of a writable ``np.memmap``
    would count in its RSS until unmapped). Room for the header of ``planned`` rows is left first; :meth:`finish`
    writes the header with the rows actually written (fewer when unreadable images were skipped).
    """

    def __init__(self, file: BinaryIO, planned: int, row_shape: tuple[int, ...]) -> None:
        self.file, self.row_shape, self.rows = file, row_shape, 0
        self.header_len = len(_npy_header((planned, *row_shape), np.uint8))
        file.seek(self.header_len)

    def write(self, images: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(images, dtype=np.uint8))
        self.rows += len(images)

    def finish(self) -> None:
        self.file.seek(0)
        self.file.write(_npy_header((self.rows, *self.row_shape), np.uint8, self.header_len))


def _mean_std(sums: Sequence[int], squares: Sequence[int], n: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of pixel values in [0, 1], from exact integer sums over ``n`` pixels:
    the same figures whatever the batching, and the ones ``numpy`` gives for digits."""
    mean = [s / (n * 255) for s in sums]  # int / int: one correctly rounded division
    std = [math.sqrt((q * n - s * s) / (n * n * 255 * 255)) for s, q in zip(sums, squares)]
    return mean, std


def _fingerprint(folder: Path, meta: dict[str, Any]) -> str:
    """SHA-256 of the metadata, then of every array's shape and bytes (split by split), read back in chunks."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for split in SPLITS:
        for kind in ("images", "labels", "ids"):
            with open(folder / f"{split}_{kind}.npy", "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, _ = read(f)
                h.update(str(shape).encode())
                while chunk := f.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()


class _SplitRows:
    """What is written of one split: its images (straight to disk), labels, ids, and the folders the ids index."""

    def __init__(self, file: BinaryIO, planned: int, row_shape: tuple[int, ...]) -> None:
        self.images = _RowWriter(file, planned, row_shape)
        self.labels: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        self.ids: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        self.sources: dict[str, int] = {}  # folder -> rows, in order

    def add(self, images: np.ndarray, labels: np.ndarray, ids: np.ndarray, folder: str) -> None:
        self.images.write(images)
        self.labels.append(labels.astype(np.int64))
        self.ids.append(ids.astype(np.int64))
        self.sources[folder] = self.sources.get(folder, 0) + len(ids)

    def save(self, staging: Path, split: str) -> None:
        self.images.finish()
        np.save(staging / f"{split}_labels.npy", np.concatenate(self.labels))
        np.save(staging / f"{split}_ids.npy", np.concatenate(self.ids))


def _stream(staging: Path, plan: _Plan, *, image_size: int, skip_bad_images: bool,
            workers: int | None) -> tuple[dict[str, _SplitRows], list[int], list[int], list[str]]:
    """Decode every split of ``plan`` into ``staging`` batch by batch.

    Returns:
        The rows of each split; the per-channel sums of the training pixels and of their squares; the files
        skipped as unreadable.
    """
    row_shape = (plan.channels, image_size, image_size)
    batch = max(16, min(256, (4 << 20) // math.prod(row_shape)))  # about 4 MiB of pixels per batch
    jobs = [(split, part, part.index[i:i + batch]) for split in SPLITS for part in plan.splits[split]
            for i in range(0, len(part.index), batch)]
    sums, squares = [0] * plan.channels, [0] * plan.channels
    skipped: list[str] = []
    with contextlib.ExitStack() as stack:
        rows = {s: _SplitRows(stack.enter_context(open(staging / f"{s}_images.npy", "wb")), plan.count(s), row_shape)
                for s in SPLITS}
        batches = stack.enter_context(contextlib.closing(_decoded(jobs, image_size, workers)))
        bar = stack.enter_context(progress(total=sum(plan.count(s) for s in SPLITS), desc="data: decoding images",
                                           unit="img"))
        for (split, part, idx), b in zip(jobs, batches, strict=True):
            keep = np.ones(len(idx), dtype=bool)
            for i, err in b.failed:
                file = part.pool.files[idx[i]]
                if not skip_bad_images:
                    raise BadImageError(f"cannot read image {file} ({err}); repair or remove it, or set "
                                        "data.skip_bad_images: true to skip unreadable images (counted in meta.json)")
                keep[i] = False
                skipped.append(file)
            labels = np.full(int(keep.sum()), UNLABELED) if split == "unlabeled" else part.pool.labels[idx[keep]]
            rows[split].add(b.images.numpy(), labels, idx[keep], part.pool.folder)
            if split == "train":
                sums = [a + int(v) for a, v in zip(sums, b.sums)]
                squares = [a + int(v) for a, v in zip(squares, b.squares)]
            bar.update(len(idx))
        for split, r in rows.items():
            r.save(staging, split)
    return rows, sums, squares, skipped


def _write(staging: Path, plan: _Plan, *, name: str, image_size: int, seed: int, skip_bad_images: bool,
           workers: int | None) -> None:
    """Decode every split of ``plan`` into ``staging``, then describe it in ``meta.json``."""
    rows, sums, squares, skipped = _stream(staging, plan, image_size=image_size, skip_bad_images=skip_bad_images,
                                           workers=workers)
    sizes = {s: rows[s].images.rows for s in SPLITS}
    for split in ("train", "val", "test"):
        if sizes[split] == 0:
            raise DatasetNotFoundError(f"the {split} split of {name} is empty: all its {plan.count(split)} images "
                                       "are unreadable and were skipped")
    if name in _DECLARED_STATS:
        mean, std = (list(v) for v in _DECLARED_STATS[name])
    else:
        mean, std = _mean_std(sums, squares, sizes["train"] * image_size * image_size)
    if skipped:
        _log.warning("%s: skipped %d unreadable image(s) (data.skip_bad_images), e.g. %s", name, len(skipped),
                     ", ".join(skipped[:_SKIPPED_EXAMPLES]))
    folder = plan.root is not None
    meta = DatasetMeta(name=name, num_classes=len(plan.classes), class_names=list(plan.classes),
                       channels=plan.channels, image_size=image_size, mean=mean, std=[max(s, 1e-3) for s in std],
                       sizes=sizes, seed=seed, source=plan.source, skipped_images=len(skipped),
                       skipped_examples=[os.path.relpath(f, plan.root) for f in skipped[:_SKIPPED_EXAMPLES]],
                       id_sources={s: [[f, n] for f, n in rows[s].sources.items()] for s in SPLITS} if folder else None)
    fields = {k: v for k, v in meta.to_dict().items() if k != "fingerprint"}
    meta = dataclasses.replace(meta, fingerprint=_fingerprint(staging, fields))
    (staging / "meta.json").write_text(json.dumps(meta.to_dict(), indent=2) + "\n")


def prepare_to(out_dir: str | Path, *, name: str, root: str | Path | None = None, image_size: int = 16,
               split: SplitSpec = SplitSpec(), download: bool = False, skip_bad_images: bool = False,
               workers: int | None = None) -> PreparedData:
    """Prepare a dataset into ``out_dir``: split it with a fixed seed, bring it to ``image_size``, write it.

    Image files are decoded in ``workers`` processes and written to disk batch by batch, so memory does not grow
    with the dataset; statistics and fingerprint are computed as the data streams. Everything is written into a
    staging folder beside ``out_dir`` and swapped in atomically: on any error ``out_dir`` keeps its previous
    content.

    Args:
        out_dir: the folder to (re)place, e.g. ``data/prepared``.
        name: one of :data:`DATASETS`.
        root: the raw data: the image folder (``imagefolder``; layouts in the module docstring), or the folder of
            a torchvision dataset. Not used by ``digits``.
        image_size: side of the stored square images.
        split: how the samples are split (:class:`SplitSpec`: seed, fractions, labeled images per class, pool,
            unlabeled split).
        download: let torchvision download the dataset into ``root``.
        skip_bad_images: skip unreadable image files and count them in ``meta.json`` instead of failing.
        workers: decoding processes for image files; None: one per CPU (at most 8); 0: decode in this process.
            The arrays are the same whatever the number.

    Returns:
        The prepared data as :func:`distill.data.load_prepared` opens it (images memory-mapped).

    Raises:
        DatasetNotFoundError: the data is missing or empty (says where it looked and how to get it).
        BadImageError: an image file cannot be decoded and ``skip_bad_images`` is off (names the file).
        ValueError: unknown dataset name, a folder that fits neither layout, a val/test class unknown to train/,
            or ``unlabeled`` with nothing to put in the unlabeled split.
    """
    plan = _plan(name, root=root, download=download, split=split)
    out = Path(out_dir)
    with staged_dir(out, str(os.getpid())) as staging:
        _write(staging, plan, name=name, image_size=image_size, seed=split.seed, skip_bad_images=skip_bad_images,
               workers=workers)
    return load_prepared(out)


def check_source(name: str, *, root: str | Path | None, download: bool, split: SplitSpec) -> None:
    """Check, without decoding a pixel, what :func:`prepare_to` would check before it writes: the dataset's files
    are there (an image folder's layout, torchvision's or the idx files) and every split it asks for can be
    filled. With ``download`` nothing is checked: the files may come on the first run.

    Args:
        name / root / download / split: as :func:`prepare_to`.

    Raises:
        DatasetNotFoundError, ValueError: what :func:`prepare_to` would raise, with the same message.
    """
    if not download:
        _plan(name, root=root, download=False, split=split)


def prepare_dataset(name: str, **kwargs: Any) -> PreparedData:
    """:func:`prepare_to` held in memory: prepared in a temporary folder, then read into arrays (small datasets,
    tests, notebooks). Takes :func:`prepare_to`'s keyword arguments."""
    with tempfile.TemporaryDirectory(prefix="distill-data-") as tmp:
        prepare_to(Path(tmp) / "prepared", name=name, **kwargs)
        return load_prepared(Path(tmp) / "prepared", mmap=False)
