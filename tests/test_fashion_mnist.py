"""Fashion-MNIST and MNIST from their official idx files, and the fixed training pool of a label-count curve.

The tests write small idx files themselves (the format: a 4-byte magic ``00 00 08 <ndim>``, big-endian
dimensions, then the bytes), in both layouts the reader accepts, plain and gzipped; they need neither the
Debian package nor a download. One test reads the real package where it is installed.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from distill.data import DatasetNotFoundError
from distill.prepare import IDX_FILES, SplitSpec, prepare_dataset, read_idx

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_set(folder: Path, *, n_train: int = 200, n_test: int = 50, gz: bool = True, seed: int = 0) -> dict:
    """The four official files of a small Fashion-MNIST in ``folder``; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels  # each image carries its label: rows can be matched to their source
        arrays[split] = (images, labels)
        for stem, array in zip(IDX_FILES[split], (images, labels)):
            data = _idx_bytes(array)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("layout, gz", [("debian", True), ("debian", False), ("torchvision", True),
                                        ("torchvision", False)])
def test_the_official_files_are_read_in_both_layouts_plain_or_gzipped(tmp_path, layout, gz):
    folder = tmp_path if layout == "debian" else tmp_path / "FashionMNIST" / "raw"
    arrays = write_idx_set(folder, gz=gz)
    data = prepare_dataset("fashion_mnist", root=str(tmp_path), image_size=28,
                           split=SplitSpec(val_fraction=0.1, seed=3))
    images, labels = arrays["test"]
    # the official test set is the test split, whole and in order
    assert np.array_equal(data.test.labels, labels) and np.array_equal(data.test.ids, np.arange(len(labels)))
    assert np.array_equal(np.asarray(data.test.images)[:, 0], images)
    # validation is carved out of the training images, stratified: 10 % of each class's 20
    assert len(data.val) == 20 and np.bincount(data.val.labels, minlength=10).tolist() == [2] * 10
    assert len(data.train) == 180 and not set(data.train.ids) & set(data.val.ids)
    train_images, _ = arrays["train"]
    assert np.array_equal(np.asarray(data.train.images)[:, 0], train_images[data.train.ids])
    assert data.meta.class_names[0] == "T-shirt/top" and data.meta.num_classes == 10 and data.meta.channels == 1


def test_read_idx_names_a_truncated_or_foreign_file(tmp_path):
    write_idx_set(tmp_path, gz=False)
    f = tmp_path / IDX_FILES["train"][0]
    assert read_idx(f).shape == (200, 28, 28)
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"holds 156795 values but its header declares \(200, 28, 28\)"):
        read_idx(f)
    f.write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(f)
    with pytest.raises(DatasetNotFoundError, match=rf"fashion_mnist: {f} is not an idx file.*reinstall"):
        prepare_dataset("fashion_mnist", root=str(tmp_path))
    g = tmp_path / "gz"
    write_idx_set(g)
    (g / f"{IDX_FILES['test'][1]}.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    with pytest.raises(DatasetNotFoundError, match=r"t10k-labels-idx1-ubyte.gz cannot be read"):
        prepare_dataset("fashion_mnist", root=str(g))


def test_a_missing_file_is_named_with_the_package_that_installs_it(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / f"{IDX_FILES['test'][0]}.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=rf"not in {tmp_path} nor in {tmp_path}/FashionMNIST/raw; "
                                                   r"`apt-get install dataset-fashion-mnist`"):
        prepare_dataset("fashion_mnist", root=str(tmp_path))


def test_the_training_pool_is_fixed_and_the_labeled_images_nest(tmp_path):
    """pool_per_class: the labeled images and the unlabeled split both come from one seeded pool, and the labeled
    images of a smaller label count are among those of a larger one (a label-count curve compares like with like)."""
    write_idx_set(tmp_path, n_train=400)
    kw = {"val_fraction": 0.1, "seed": 5, "pool_per_class": 20, "unlabeled": True}
    by_labels = {n: prepare_dataset("fashion_mnist", root=str(tmp_path), image_size=28,
                                    split=SplitSpec(**kw, max_per_class=n)) for n in (2, 6, 19)}
    pools = {n: set(d.train.ids) | set(d.unlabeled.ids) for n, d in by_labels.items()}
    assert all(len(p) == 200 for p in pools.values()) and pools[2] == pools[6] == pools[19]
    assert set(by_labels[2].train.ids) < set(by_labels[6].train.ids) < set(by_labels[19].train.ids)
    assert np.bincount(by_labels[6].train.labels).tolist() == [6] * 10
    assert all(np.array_equal(d.val.ids, by_labels[2].val.ids) for d in by_labels.values())  # val is untouched
    other_seed = prepare_dataset("fashion_mnist", root=str(tmp_path), image_size=28,
                                 split=SplitSpec(**{**kw, "seed": 6}, max_per_class=6))
    assert set(other_seed.train.ids) != set(by_labels[6].train.ids)


def test_pool_and_labels_must_agree():
    from distill.config import ParamsError, merge, parse_params

    from helpers import project_raw

    with pytest.raises(ParamsError, match=r"max_per_class \(30\) labeled images per class cannot come from a pool"):
        parse_params(merge(project_raw(), {"data": {"max_per_class": 30, "pool_per_class": 20}}))


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_debian_package_gives_the_official_sets():
    from distill.prepare import _idx_pools

    pools, classes = _idx_pools("fashion_mnist", DEBIAN, download=False)
    assert len(pools["train"].labels) == 60_000 and len(pools["test"].labels) == 10_000
    assert pools["train"].images.shape[1:] == (1, 28, 28) and len(classes) == 10
    assert np.bincount(pools["test"].labels).tolist() == [1000] * 10
