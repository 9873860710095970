"""The soft-label store: exact replay, top-k reconstruction, metadata and integrity checks, atomic writes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.augment import Augmenter, AugmentSpec
from distill.data import Split
from distill.io import file_sha256
from distill.store import (
    SoftLabelStore,
    SoftLabelStoreError,
    StoredViews,
    StoreSpec,
    describe_store,
    generate_store,
    mix_params,
    view_params,
)
from distill.teachers import build_teacher
from distill.views import StepContext

N, K = 40, 3
SPEC = AugmentSpec(hflip=True)  # flips too, so replay covers every parameter


def make_teacher(num_classes=4, seed=0):
    torch.manual_seed(seed)
    t = build_teacher("resnet_small", num_classes=num_classes, in_chans=1, width=4, blocks=1)
    with torch.no_grad():  # leave the identity init: distinct, non-trivial logits per view
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return t


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and on a shared CPU intra-op threads just spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split():
    rng = np.random.default_rng(0)
    return Split(images=rng.integers(0, 256, (N, 1, 16, 16), dtype=np.uint8), labels=rng.integers(0, 4, N),
                 ids=np.arange(N))


@pytest.fixture(scope="module")
def aug():
    return Augmenter(spec=SPEC, out_size=16, mean=[0.5], std=[0.25])


def generate(teacher, split, aug, out, *, teacher_sha256="t" * 64, data_fingerprint="d" * 64, **spec):
    """A store of K views in batches of 16 unless ``spec`` (:class:`StoreSpec`'s fields) says otherwise."""
    return generate_store(teacher, split, aug, out_dir=out, spec=StoreSpec(**{"views": K, "batch_size": 16, **spec}),
                          teacher_sha256=teacher_sha256, data_fingerprint=data_fingerprint)


def replay_in_generation_order(teacher, split, aug, store, batch_size=16):
    """Re-render every stored view from its parameters and run the teacher in the generation's batches."""
    i = np.repeat(np.arange(N), K)
    k = np.tile(np.arange(K), N)
    x = aug(torch.from_numpy(split.images[i]), store.params(i, k))
    with torch.no_grad():
        return x, torch.cat([teacher(x[j:j + batch_size]) for j in range(0, len(x), batch_size)]), i, k


def all_content(store):
    i, k = np.repeat(np.arange(store.num_images), store.views), np.tile(np.arange(store.views), store.num_images)
    return store.params(i, k), store.logits(i, k)


def test_round_trip_fp16(tmp_path, split, aug):
    teacher = make_teacher()
    meta = generate(teacher, split, aug, tmp_path / "sl", seed=3)
    store = SoftLabelStore.open(tmp_path / "sl", expect={"num_images": N, "augment": aug.describe()})
    assert (store.num_images, store.views, store.num_classes) == (N, K, 4)
    m = store.meta
    assert m == meta and m.to_dict()["shards"][0]["files"]["logits"]["shape"] == [N, K, 4]
    assert (m.format, m.split, m.dtype, m.topk, m.seed, m.image_size, m.channels) == (
        "distill-soft-labels", "train", "float16", None, 3, 16, 1)
    assert m.augment == json.loads(json.dumps(aug.describe())) and m.extra == {}
    assert m.teacher_sha256 == "t" * 64 and m.data_fingerprint == "d" * 64
    assert np.load(tmp_path / "sl" / "shard-00000.logits.npy", mmap_mode="r").dtype == np.float16
    _, fresh, i, k = replay_in_generation_order(teacher, split, aug, store)
    logits = store.logits(i, k)
    assert logits.dtype == torch.float32 and logits.shape == (N * K, 4)
    assert torch.equal(logits, fresh.half().float())
    assert store.params(i, k).shape == (N * K, 5) and store.params([7], 2).dtype == torch.float32


def test_replay_is_bit_identical_to_what_the_teacher_saw(tmp_path, split, aug):
    teacher = make_teacher()
    seen = []
    teacher.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    generate(teacher, split, aug, tmp_path / "sl", batch_size=16)
    seen = torch.cat(seen)  # (N*K, 1, 16, 16) in generation order j = i*K + k
    store = SoftLabelStore.open(tmp_path / "sl")
    for i, k in [(0, 0), (5, 1), (21, 2), (39, 2)]:  # alone: another batch composition than at generation
        x = aug(torch.from_numpy(split.images[[i]]), store.params([i], [k]))
        assert torch.equal(x[0], seen[i * K + k])
    perm = np.random.default_rng(1).permutation(N * K)  # a shuffled batch, as the student's loader gives
    i, k = perm // K, perm % K
    assert torch.equal(aug(torch.from_numpy(split.images[i]), store.params(i, k)), seen[perm])


def test_float32_store_equals_a_fresh_teacher_forward(tmp_path, split, aug):
    teacher = make_teacher()
    generate(teacher, split, aug, tmp_path / "sl", dtype="float32")
    store = SoftLabelStore.open(tmp_path / "sl")
    assert store.meta.dtype == "float32"
    _, fresh, i, k = replay_in_generation_order(teacher, split, aug, store)
    assert torch.equal(store.logits(i, k), fresh)
    # One view alone: same input bits; CPU convolutions may differ in the last bit with the batch size.
    x = aug(torch.from_numpy(split.images[[9]]), store.params([9], [1]))
    with torch.no_grad():
        torch.testing.assert_close(store.logits([9], [1]), teacher(x), rtol=1e-6, atol=1e-6)


def test_topk_rebuild_keeps_topk_probabilities_and_spreads_the_rest(tmp_path, split, aug):
    teacher = make_teacher(num_classes=10)
    meta = generate(teacher, split, aug, tmp_path / "sl", topk=3)
    store = SoftLabelStore.open(tmp_path / "sl")
    assert (meta.topk, meta.index_dtype) == (3, "int16")
    assert np.load(tmp_path / "sl" / "shard-00000.topk_indices.npy").dtype == np.int16
    _, fresh, i, k = replay_in_generation_order(teacher, split, aug, store)
    p_true = fresh.softmax(1)
    p = store.logits(i, k).softmax(1)  # (N*K, 10)
    torch.testing.assert_close(p.sum(1), torch.ones(N * K))
    top = p_true.topk(3, dim=1).indices
    torch.testing.assert_close(p.gather(1, top), p_true.gather(1, top), rtol=2e-3, atol=1e-4)  # fp16 values
    rest = torch.ones_like(p, dtype=torch.bool).scatter(1, top, False)
    p_rest = p[rest].view(N * K, 7)
    torch.testing.assert_close(p_rest, p_rest[:, :1].expand(-1, 7))  # uniform
    torch.testing.assert_close(p_rest.sum(1), p_true[rest].view(N * K, 7).sum(1), rtol=2e-3, atol=1e-4)
    with pytest.raises(ValueError, match="topk=10 must be below the number of classes"):
        generate(teacher, split, aug, tmp_path / "bad", topk=10)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))


def test_view_params_depend_only_on_seed_image_and_view(tmp_path, split, aug):
    teacher = make_teacher()
    generate(teacher, split, aug, tmp_path / "a", batch_size=7)
    generate(teacher, split, aug, tmp_path / "b", batch_size=64)
    a, b = SoftLabelStore.open(tmp_path / "a"), SoftLabelStore.open(tmp_path / "b")
    assert torch.equal(all_content(a)[0], all_content(b)[0])
    # A shard's rows equal the same rows of the whole split (what makes P-process generation equal 1-process).
    whole = view_params(aug, 0, N, views=K, seed=0)
    assert torch.equal(torch.cat([view_params(aug, 0, 17, views=K, seed=0), view_params(aug, 17, N, views=K, seed=0)]),
                       whole)
    assert torch.equal(whole.reshape(-1, 5), all_content(a)[0])
    assert not torch.equal(view_params(aug, 0, N, views=K, seed=1), whole)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, split, aug):
    out = tmp_path_factory.mktemp("store") / "sl"
    generate(make_teacher(), split, aug, out)
    return out


@pytest.mark.parametrize("key, value, needle", [
    ("teacher_sha256", "0" * 64, "teacher_sha256: stored 'tttt"),
    ("data_fingerprint", "f" * 64, "data_fingerprint: stored 'dddd"),
    ("num_classes", 5, "num_classes: stored 4, expected 5"),
    ("num_images", 41, "num_images: stored 40, expected 41"),
    ("image_size", 32, "image_size: stored 16, expected 32"),
    ("augment", {"scale": (0.5, 1.0)}, "augment.scale: stored [0.35, 1.0], expected [0.5, 1.0]"),
    ("mixup", 0.4, "mixup: stored 0.0, expected 0.4"),
    ("augment", Augmenter(spec=SPEC, out_size=32, mean=[0.5], std=[0.25]).describe(),
     "augment.out_size: stored 16, expected 32"),
    ("augment", Augmenter(spec=SPEC, out_size=16, mean=[0.4], std=[0.25]).describe(),
     "augment.mean: stored [0.5], expected [0.4]"),
])
def test_metadata_mismatch_is_refused(store_path, aug, key, value, needle):
    with pytest.raises(SoftLabelStoreError) as err:
        SoftLabelStore.open(store_path, expect={"num_classes": 4, "augment": aug.describe(), key: value})
    msg = str(err.value)
    assert needle in msg and str(store_path.resolve()) in msg and "dvc repro soft_labels" in msg
    assert "python -m flows stage soft_labels" in msg


def test_matching_expectations_open(store_path, aug):
    store = SoftLabelStore.open(store_path, expect={"teacher_sha256": "t" * 64, "data_fingerprint": "d" * 64,
                                                    "num_images": N, "num_classes": 4, "image_size": 16,
                                                    "augment": aug.describe()})
    assert store.num_images == N


def test_missing_store_is_refused(tmp_path):
    with pytest.raises(SoftLabelStoreError, match="no soft-label store .* run the soft_labels stage"):
        SoftLabelStore.open(tmp_path / "nothing")


def _copy_store(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_corrupt_or_missing_files_are_refused(tmp_path, store_path):
    data = "shard-00000.logits.npy"
    trunc = _copy_store(store_path, tmp_path / "trunc")
    (trunc / data).write_bytes((trunc / data).read_bytes()[:-3])
    for verify in (True, False):
        with pytest.raises(SoftLabelStoreError, match=f"{data} has .* bytes.*truncated"):
            SoftLabelStore.open(trunc, verify_hashes=verify)

    flipped = _copy_store(store_path, tmp_path / "flipped")
    raw = bytearray((flipped / data).read_bytes())
    raw[-1] ^= 0xFF
    (flipped / data).write_bytes(bytes(raw))
    with pytest.raises(SoftLabelStoreError, match=f"{data} does not match its sha256"):
        SoftLabelStore.open(flipped)

    header = _copy_store(store_path, tmp_path / "header")
    raw = bytearray((header / data).read_bytes())
    raw[:6] = b"XXXXXX"  # not an .npy any more; caught without hashes by the reader
    (header / data).write_bytes(bytes(raw))
    with pytest.raises(SoftLabelStoreError, match=f"{data} is not a readable .npy"):
        SoftLabelStore.open(header, verify_hashes=False)

    gone = _copy_store(store_path, tmp_path / "gone")
    (gone / "shard-00000.params.npy").unlink()
    with pytest.raises(SoftLabelStoreError, match="shard-00000.params.npy is missing"):
        SoftLabelStore.open(gone)

    bad_meta = _copy_store(store_path, tmp_path / "bad_meta")
    (bad_meta / "meta.json").write_text('{"format": "distill-soft-labels", "format_version": 1, "num_im')
    with pytest.raises(SoftLabelStoreError, match="meta.json is unreadable"):
        SoftLabelStore.open(bad_meta)


def _raising_teacher(after_calls):
    teacher = make_teacher(seed=1)
    calls = []

    def hook(_m, _args):
        calls.append(1)
        if len(calls) > after_calls:
            raise RuntimeError("teacher crashed mid-generation")

    teacher.register_forward_pre_hook(hook)
    return teacher


def test_crash_mid_write_keeps_the_previous_store(tmp_path, split, aug):
    out = tmp_path / "sl"
    meta_a = generate(make_teacher(), split, aug, out)
    before = all_content(SoftLabelStore.open(out))
    with pytest.raises(RuntimeError, match="crashed mid-generation"):
        generate(_raising_teacher(after_calls=2), split, aug, out, teacher_sha256="b" * 64)
    store = SoftLabelStore.open(out)
    assert store.meta == meta_a
    after = all_content(store)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sl"]  # the staging folder is gone


def test_crash_between_the_swap_renames_is_recovered(tmp_path, split, aug, monkeypatch):
    out = tmp_path / "sl"
    meta_a = generate(make_teacher(), split, aug, out)
    before = all_content(SoftLabelStore.open(out))
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".sl.tmp-"):  # the second rename: staging -> sl
            raise OSError("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="between the renames"):
        generate(make_teacher(seed=2), split, aug, out, teacher_sha256="b" * 64)
    monkeypatch.undo()
    assert not out.exists() and (tmp_path / ".sl.old" / "meta.json").is_file()  # the state a kill there leaves
    store = SoftLabelStore.open(out)  # renames .sl.old back
    assert store.meta == meta_a and torch.equal(all_content(store)[1], before[1])
    meta_b = generate(make_teacher(seed=2), split, aug, out, teacher_sha256="b" * 64)
    assert SoftLabelStore.open(out, expect={"teacher_sha256": "b" * 64}).meta == meta_b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sl"]


def test_kill_mid_write_keeps_the_previous_store(tmp_path, split, aug):
    out = tmp_path / "sl"
    meta_a = generate(make_teacher(), split, aug, out)
    np.save(tmp_path / "images.npy", split.images)
    marker = tmp_path / "second_batch"
    script = textwrap.dedent(f"""
        import time, numpy as np, torch
        from distill.augment import AugmentSpec, Augmenter
        from distill.data import Split
        from distill.store import StoreSpec, generate_store
        from distill.teachers import build_teacher
        images = np.load({str(tmp_path / 'images.npy')!r})
        split = Split(images=images, labels=np.zeros(len(images), dtype=np.int64), ids=np.arange(len(images)))
        teacher = build_teacher("resnet_small", num_classes=4, in_chans=1, width=4, blocks=1)
        calls = []
        def hook(_m, _a):
            calls.append(1)
            if len(calls) == 2:
                open({str(marker)!r}, "w").close()
                time.sleep(60)
        teacher.register_forward_pre_hook(hook)
        generate_store(teacher, split, Augmenter(spec=AugmentSpec(hflip=True), out_size=16, mean=[0.5], std=[0.25]),
                       out_dir={str(out)!r}, spec=StoreSpec(views={K}, batch_size=16), teacher_sha256="k" * 64,
                       data_fingerprint="d")
    """)
    env = {**os.environ, "DISTILL_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the generating process never reached its second batch"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs: the staging folder stays behind
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert [p.name for p in tmp_path.glob(".sl.tmp-*")] == [f".sl.tmp-{proc.pid}"]
    assert SoftLabelStore.open(out).meta == meta_a
    generate(make_teacher(), split, aug, out)  # the next generation clears what the killed one left
    assert not list(tmp_path.glob(".sl.*"))


def test_multi_shard_store_reads_across_shards(tmp_path, store_path):
    """A store written by two processes (here: the one shard split by hand at image 17) reads the same."""
    single = SoftLabelStore.open(store_path)
    two = tmp_path / "two"
    two.mkdir()
    meta = json.loads((store_path / "meta.json").read_text())
    shards = []
    for r, (lo, hi) in enumerate([(0, 17), (17, N)]):
        files = {}
        for role, rec in meta["shards"][0]["files"].items():
            name = f"shard-{r:05d}.{role}.npy"
            np.save(two / name, np.load(store_path / rec["file"])[lo:hi])
            files[role] = {**rec, "file": name, "shape": [hi - lo, *rec["shape"][1:]],
                           "bytes": (two / name).stat().st_size, "sha256": file_sha256(two / name)}
        shards.append({"index": r, "start": lo, "stop": hi, "files": files})
    (two / "meta.json").write_text(json.dumps({**meta, "shards": shards}))
    store = SoftLabelStore.open(two)
    a, b = all_content(single), all_content(store)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    i = np.array([39, 0, 16, 17, 18, 3])
    assert torch.equal(store.logits(i, i % K), single.logits(i, i % K))


def test_stored_views_replay_every_view_over_k_epochs(store_path):
    store = SoftLabelStore.open(store_path)
    views = StoredViews(store, seed=5)
    idx = np.arange(N)
    for cycle in range(2):  # epochs 0..K-1, then K..2K-1: each image sees each of its views exactly once
        seen = np.stack([views.view_ids(idx, cycle * K + e) for e in range(K)], axis=1)  # (N, K)
        assert (np.sort(seen, axis=1) == np.arange(K)).all()
    assert not (views.view_ids(idx, 0) == views.view_ids(idx, 0)[0]).all()  # not one view for all images
    assert not np.array_equal(views.view_ids(idx, 0), StoredViews(store, seed=6).view_ids(idx, 0))

    index = torch.tensor([3, 17, 3, 39])
    batch = {"image": torch.zeros(4, 1, 16, 16, dtype=torch.uint8), "index": index, "label": torch.zeros(4)}
    params, logits, mix = views(batch, StepContext(seed=0, epoch=4, step=11))
    assert mix is None  # a plain store: no mixup partners
    k = views.view_ids(index.numpy(), 4)
    assert params.shape == (4, 5) and logits.shape == (4, 4) and logits.dtype == torch.float32
    assert torch.equal(params, store.params(index, k)) and torch.equal(logits, store.logits(index, k))
    assert torch.equal(params[0], params[2])  # stateless: same image, same epoch, same view
    again, _, _ = views(batch, StepContext(seed=0, epoch=4, step=0))
    assert torch.equal(params, again)


def test_describe_store(store_path):
    d = describe_store(store_path)
    on_disk = sum(f.stat().st_size for f in store_path.iterdir())
    assert (d["num_images"], d["views"], d["num_classes"], d["shards"]) == (N, K, 4, 1)
    assert d["store_bytes"] == on_disk and d["bytes_per_image"] == pytest.approx(on_disk / N)
    assert (d["dtype"], d["topk"]) == ("float16", "all")
    assert 0 < d["bytes_per_view"] < d["bytes_per_image"]


# ------------------------------------------------------------------------------------------------ mixup views
def test_mixed_store_replays_the_mixed_image_the_teacher_saw(tmp_path, split, aug):
    teacher = make_teacher()
    inputs = []
    hook = teacher.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach().clone()))
    generate(teacher, split, aug, tmp_path / "mixed", mixup=0.4, dtype="float32")
    hook.remove()
    seen = torch.cat(inputs)  # generation order j = i*K + k
    store = SoftLabelStore.open(tmp_path / "mixed", expect={"mixup": 0.4})
    plain = generate(make_teacher(), split, aug, tmp_path / "plain")
    # Mixing adds files of its own: the crops of a mixed store are those of a plain one (same seed).
    assert torch.equal(all_content(store)[0], all_content(SoftLabelStore.open(tmp_path / "plain"))[0])
    assert plain.mixup == 0.0 and store.meta.mixup == 0.4

    views = StoredViews(store, seed=2, split=split)
    index = torch.tensor([4, 30, 4, 11])
    batch = {"image": torch.from_numpy(split.images[index.numpy()]), "index": index,
             "label": torch.from_numpy(split.labels[index.numpy()])}
    params, logits, mix = views(batch, StepContext(seed=2, epoch=7, step=0))
    k = views.view_ids(index.numpy(), 7)
    partner, rows = store.mix(index, k)
    assert mix is not None and torch.equal(mix.images, torch.from_numpy(split.images[partner]))
    assert torch.equal(mix.labels, torch.from_numpy(split.labels[partner]).long())
    assert torch.equal(mix.lam, torch.from_numpy(rows[:, 5])) and bool(((mix.lam > 0) & (mix.lam < 1)).all())
    x = aug(batch["image"], params, mix)
    for b in range(4):  # the student's input is bit-identical to the teacher's, and so are the logits
        assert torch.equal(x[b], seen[int(index[b]) * K + int(k[b])])
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher(x), rtol=1e-5, atol=1e-5)
    # lam is a real mix: the mixed input differs from the unmixed crop.
    assert not torch.equal(x, aug(batch["image"], params))


def test_mix_params_depend_only_on_seed_image_and_view(aug):
    whole = mix_params(aug, 0, N, views=K, seed=0, num_images=N, alpha=0.4)
    parts = [mix_params(aug, 0, 17, views=K, seed=0, num_images=N, alpha=0.4),
             mix_params(aug, 17, N, views=K, seed=0, num_images=N, alpha=0.4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    assert whole[0].shape == (N, K) and int(whole[0].min()) >= 0 and int(whole[0].max()) < N
    assert not torch.equal(mix_params(aug, 0, N, views=K, seed=1, num_images=N, alpha=0.4)[0], whole[0])


def test_stored_views_of_a_mixed_store_need_the_split(tmp_path, split, aug):
    generate(make_teacher(), split, aug, tmp_path / "mixed", mixup=1.0)
    with pytest.raises(ValueError, match="needs the training split"):
        StoredViews(SoftLabelStore.open(tmp_path / "mixed"), seed=0)


def test_the_store_imports_no_loop_loss_or_model():
    """The store (and its replay) needs the view protocol and the augmentation, not the training loop, the losses,
    a model or the preparation: the soft_labels stage's DVC deps stay small (tests/test_rerun_matrix.py)."""
    code = ("import sys, distill.store; print(sorted(m for m in sys.modules if m in ('distill.engine', "
            "'distill.losses', 'distill.models.deit', 'distill.teachers', 'distill.prepare', 'distill.checkpoint')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
