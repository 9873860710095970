"""Datasets: fixed seeded splits, stable ids, storage, clear errors, and the replayable augmentation."""

import json

import numpy as np
import pytest
import torch

from distill.data import (UNLABELED, ArrayDataset, AugmentSpec, Augmenter, DatasetNotFoundError, Mix, in_batch_mix,
                          load_prepared, prepare_dataset, sample_lam, save_prepared, stratified_split)


@pytest.fixture(scope="module")
def digits():
    return prepare_dataset("digits", image_size=16, val_fraction=0.15, test_fraction=0.2, seed=0)


def test_digits_split_is_disjoint_stratified_and_complete(digits):
    ids = [set(digits.split(s).ids.tolist()) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(ids[0] | ids[1] | ids[2]) == 1797
    m = digits.meta
    assert (m.num_classes, m.channels, m.image_size) == (10, 1, 16)
    assert digits.train.images.shape[1:] == (1, 16, 16) and digits.train.images.dtype == np.uint8
    # stratified: every class present in every split, test share per class close to 20 %
    for s in ("train", "val", "test"):
        assert set(digits.split(s).labels.tolist()) == set(range(10))
    assert abs(len(digits.test) / 1797 - 0.2) < 0.01
    # statistics computed from the training split
    x = digits.train.images.astype(np.float64) / 255
    assert m.mean[0] == pytest.approx(x.mean()) and m.std[0] == pytest.approx(x.std())


def test_split_is_seeded_and_ids_are_stable(digits):
    again = prepare_dataset("digits", image_size=16, seed=0)
    other = prepare_dataset("digits", image_size=16, seed=1)
    assert np.array_equal(again.test.ids, digits.test.ids) and again.meta.fingerprint == digits.meta.fingerprint
    assert not np.array_equal(other.test.ids, digits.test.ids) and other.meta.fingerprint != digits.meta.fingerprint
    # a sample keeps its id (and content) whatever the split: id -> image is the same mapping
    from sklearn.datasets import load_digits

    raw = load_digits()
    i = int(other.test.ids[0])
    assert other.test.labels[0] == raw.target[i]


def test_max_per_class_caps_training_only(digits):
    small = prepare_dataset("digits", image_size=16, seed=0, max_per_class=5)
    assert np.bincount(small.train.labels).tolist() == [5] * 10
    assert np.array_equal(small.test.ids, digits.test.ids)


def test_unlabeled_keeps_the_rest_of_the_training_images_without_labels(digits, tmp_path):
    data = prepare_dataset("digits", image_size=16, seed=0, max_per_class=20, unlabeled=True)
    assert np.bincount(data.train.labels).tolist() == [20] * 10
    # the unlabeled split is exactly the uncapped training split minus the kept images, and has no labels
    assert set(data.train.ids.tolist()) | set(data.unlabeled.ids.tolist()) == set(digits.train.ids.tolist())
    assert not set(data.train.ids.tolist()) & set(data.unlabeled.ids.tolist())
    assert len(data.unlabeled) == len(digits.train) - 200 and (data.unlabeled.labels == UNLABELED).all()
    assert np.array_equal(data.test.ids, digits.test.ids) and data.meta.sizes["unlabeled"] == len(data.unlabeled)
    transfer = data.transfer()  # labeled first, so store positions 0..199 are the training split's
    assert np.array_equal(transfer.ids, np.concatenate([data.train.ids, data.unlabeled.ids]))
    assert np.array_equal(transfer.labels[:200], data.train.labels) and (transfer.labels[200:] == UNLABELED).all()
    loaded = load_prepared(save_prepared(data, tmp_path / "p"))
    assert np.array_equal(loaded.unlabeled.images, data.unlabeled.images) and loaded.meta == data.meta
    # off (the default): no unlabeled images, the transfer split is the training split, and it still loads
    assert len(digits.unlabeled) == 0 and digits.transfer() is digits.train
    assert len(load_prepared(save_prepared(digits, tmp_path / "q")).unlabeled) == 0
    with pytest.raises(ValueError, match="set data.max_per_class"):
        prepare_dataset("digits", image_size=16, seed=0, unlabeled=True)


def test_stratified_split_fractions():
    labels = np.repeat(np.arange(3), 100)
    rest, a, b = stratified_split(labels, (0.1, 0.3), seed=4)
    assert (len(a), len(b), len(rest)) == (30, 90, 180)
    assert len(np.unique(np.concatenate([rest, a, b]))) == 300


def test_save_load_round_trip_and_dataset_items(digits, tmp_path):
    out = save_prepared(digits, tmp_path / "prepared")
    loaded = load_prepared(out)
    assert loaded.meta == digits.meta
    for s in ("train", "val", "test"):
        assert np.array_equal(loaded.split(s).images, digits.split(s).images)
        assert np.array_equal(loaded.split(s).labels, digits.split(s).labels)
    item = ArrayDataset(loaded.train)[3]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, 16, 16)
    assert int(item["index"]) == 3 and int(item["label"]) == int(digits.train.labels[3])
    # saving again replaces the folder as a whole (no leftovers from the previous write)
    (out / "stray.txt").write_text("x")
    save_prepared(digits, out)
    assert not (out / "stray.txt").exists()


def test_missing_and_corrupt_prepared_data_name_the_folder(digits, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"nowhere.*dvc repro data"):
        load_prepared(tmp_path / "nowhere")
    out = save_prepared(digits, tmp_path / "prepared")
    labels = out / "train_labels.npy"
    labels.write_bytes(labels.read_bytes()[:40])
    with pytest.raises(DatasetNotFoundError, match=r"corrupt.*dvc repro -f data"):
        load_prepared(out)


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_missing_torchvision_dataset_says_where_and_how(name, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=rf"{name} not found under {tmp_path}.*data.download: true"):
        prepare_dataset(name, root=str(tmp_path), download=False)
    with pytest.raises(DatasetNotFoundError, match="data.root is not set"):
        prepare_dataset(name, root=None)


def _write_cifar10(root, n_train=30, n_test=10):
    """A real CIFAR-10 python-format folder (the layout torchvision reads), made by the test: no download."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [int(v) for v in rng.integers(0, 10, n)]}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_train), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_from_a_local_root(tmp_path, monkeypatch):
    import hashlib

    import torchvision

    _write_cifar10(tmp_path)
    # The files are ours, so torchvision's real integrity check must be given their md5s, not the official ones.
    cls = torchvision.datasets.CIFAR10
    md5 = lambda name: hashlib.md5((tmp_path / cls.base_folder / name).read_bytes()).hexdigest()  # noqa: E731
    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})
    data = prepare_dataset("cifar10", root=str(tmp_path), image_size=32, val_fraction=0.2, seed=0)
    assert data.train.images.shape[1:] == (3, 32, 32) and len(data.test) == 10
    assert len(data.train) + len(data.val) == 150
    assert data.meta.mean == pytest.approx([0.4914, 0.4822, 0.4465])
    assert data.meta.class_names[:2] == ["c0", "c1"]


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    data = prepare_dataset("imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.2, test_fraction=0.2)
    assert data.meta.class_names == ["cat", "dog"] and data.train.images.shape[1:] == (3, 16, 16)
    assert sum(data.meta.sizes.values()) == 20
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images found under"):
        prepare_dataset("imagefolder", root=str(empty))
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        prepare_dataset("imagefolder", root=str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------ augmentation
def _aug(**kw):
    return Augmenter(spec=AugmentSpec(**kw), out_size=16, mean=[0.5], std=[0.25])


def test_sampled_params_are_valid_and_seeded():
    aug = _aug(scale=(0.2, 1.0), hflip=True)
    p = aug.sample(500, torch.Generator().manual_seed(0))
    top, left, h, w, flip = p.unbind(1)
    assert p.shape == (500, 5)
    assert ((top >= 0) & (left >= 0) & (top + h <= 1 + 1e-6) & (left + w <= 1 + 1e-6)).all()
    area = h * w
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 1 + 1e-6
    assert set(flip.tolist()) == {0.0, 1.0}
    assert torch.equal(p, aug.sample(500, torch.Generator().manual_seed(0)))
    assert not torch.equal(p, aug.sample(500, torch.Generator().manual_seed(1)))
    assert (_aug(hflip=False).sample(50, torch.Generator().manual_seed(0))[:, 4] == 0).all()


def test_eval_view_is_the_normalised_image():
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    aug = _aug()
    x = aug(images, aug.eval_params(3))
    torch.testing.assert_close(x, (images.float() / 255 - 0.5) / 0.25)


def test_crop_and_flip_render_the_right_pixels():
    """A crop of the left half at 2x resolution of an 8x8 image, flipped, must be the mirrored half."""
    img = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8) * 3
    aug = Augmenter(spec=AugmentSpec(), out_size=8, mean=[0.0], std=[1.0])
    left_half = aug.render(img, torch.tensor([[0.0, 0.0, 1.0, 0.5, 0.0]]))  # (1,1,8,8) from 8x4 source
    # columns 0,2,4,6 of the output sit between source columns: bilinear of neighbours; the mean is preserved
    assert left_half.mean().item() == pytest.approx(img[..., :4].float().mean().item() / 255, abs=0.02)
    flipped = aug.render(img, torch.tensor([[0.0, 0.0, 1.0, 0.5, 1.0]]))
    torch.testing.assert_close(flipped, left_half.flip(-1))
    full_flip = aug.render(img, torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]]))
    torch.testing.assert_close(full_flip, img.float().flip(-1) / 255)


def test_replay_is_bit_identical_whatever_the_batch():
    """The soft-label store relies on this: the same params give the same view, alone or in any batch."""
    aug = _aug()
    images = torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8)
    params = aug.sample(32, torch.Generator().manual_seed(3))
    full = aug(images, params)
    for i in (0, 7, 31):
        assert torch.equal(aug(images[i:i + 1], params[i:i + 1]), full[i:i + 1])
    perm = torch.randperm(32)
    assert torch.equal(aug(images[perm], params[perm]), full[perm])


def test_describe_names_everything_that_changes_a_view():
    d = _aug(scale=(0.5, 1.0)).describe()
    assert d["scale"] == [0.5, 1.0] and d["out_size"] == 16 and d["mean"] == [0.5] and d["version"] >= 1
    assert json.loads(json.dumps(d)) == d


def test_mixup_blends_the_two_crops_before_normalising():
    aug = _aug()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    params = aug.sample(4, g)
    mix = in_batch_mix(images, labels, params, 0.4, torch.Generator().manual_seed(1))
    assert torch.equal(mix.labels, labels.flip(0)) and torch.equal(mix.images, images.flip(0))
    assert mix.lam.shape == (4,) and bool(((mix.lam >= 0) & (mix.lam <= 1)).all())
    assert torch.equal(mix.lam, in_batch_mix(images, labels, params, 0.4, torch.Generator().manual_seed(1)).lam)
    lam = torch.tensor([1.0, 0.0, 0.25, 0.5])
    x = aug(images, params, Mix(images=mix.images, labels=mix.labels, params=mix.params, lam=lam))
    own, other = aug.render(images, params), aug.render(mix.images, mix.params)
    torch.testing.assert_close(x[0], aug.normalize(own)[0])  # lam 1: the sample alone
    torch.testing.assert_close(x[1], aug.normalize(other)[1])  # lam 0: the partner alone
    torch.testing.assert_close(x[2], aug.normalize(0.25 * own + 0.75 * other)[2])


def test_sample_lam_follows_beta():
    lam = sample_lam(20000, 0.4, torch.Generator().manual_seed(0))
    # Beta(0.4, 0.4): mean 1/2, variance ab/((a+b)^2 (a+b+1)) = 0.16/(0.64*1.8) = 0.1389
    assert abs(lam.mean().item() - 0.5) < 0.01 and abs(lam.var().item() - 0.1389) < 0.005
