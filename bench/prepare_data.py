"""Preparing an image folder (the data stage) against one pass of torchvision's ImageFolder through a DataLoader.

Generates a folder of JPEG images in the split layout (``train/<class>/``, ``val/<class>/``, ``unlabeled/<part>/``):
sklearn's handwritten digits upscaled to ``--src`` pixels, tinted per class, with Gaussian noise, so every file
differs. Then, on the same files, with the same number of worker processes and the same resize (shorter side to
``--size``, bilinear, antialiased) and centre crop:

* **ours**: ``distill.prepare.prepare_to`` with ``unlabeled=True``: decoding in workers, the arrays written to
  disk batch by batch, statistics and fingerprint, fsync and the atomic swap of the folder;
* **torchvision**: ``ImageFolder`` over ``train/``, ``val/`` and ``unlabeled/`` (``ConcatDataset``) with
  ``v2.Compose([PILToTensor(), Resize(size, antialias=True), CenterCrop(size)])``, one pass of a ``DataLoader``
  (default collate to a uint8 tensor, batches discarded): the least a training script that decodes on the fly
  spends per epoch.

Every measurement runs in a fresh Python process (as DVC runs the data stage) and times only the call, from
listing the files to the last batch (ours: to the swapped-in folder). The sides alternate over the rounds
(A B, B A, ...) so that drift in machine load hits both alike. Each child also reports its peak RSS (its own,
and that of its largest worker process). Our preparation is then run at half the images (a folder of hard
links to half the files of each folder) to show that its peak memory does not grow with the dataset.

Usage:
    python bench/prepare_data.py --images 20000 --workers 2 [--size 64 --src 160x120 --rounds 3]
    python bench/prepare_data.py --quick      # 2,000 images, 1 round: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

CLASSES = 10
SHARES = {"train": 0.7, "val": 0.1, "unlabeled": 0.2}


# ------------------------------------------------------------------------------------------ the folder
def _write_images(job: tuple[list[tuple[str, int]], tuple[int, int], int]) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    files, (width, height), seed = job
    digits = load_digits()
    rng = np.random.default_rng(seed)
    tints = np.random.default_rng(0).uniform(0.4, 1.0, (CLASSES, 3))
    for path, i in files:
        x = Image.fromarray(np.rint(digits.images[i % len(digits.images)] * (255 / 16)).astype(np.uint8))
        x = np.asarray(x.resize((width, height), Image.BILINEAR), dtype=np.float32)
        rgb = x[..., None] * tints[digits.target[i % len(digits.target)]] + rng.normal(0, 12, (height, width, 3))
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, quality=90)


def generate(root: Path, n: int, src: tuple[int, int], workers: int) -> dict[str, int]:
    """``n`` JPEG files under ``root`` in the split layout; returns the count per folder."""
    files: list[tuple[str, int]] = []
    counts = {}
    start = 0
    for folder, share in SHARES.items():
        count = round(n * share) if folder != "unlabeled" else n - start
        for k in range(count):
            i = start + k
            sub = root / folder / (f"class_{i % CLASSES}" if folder != "unlabeled" else f"part_{i % 8}")
            files.append((str(sub / f"{i:07d}.jpg"), i))
        counts[folder] = count
        start += count
    for path, _ in files:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    chunks = [files[k::max(1, workers * 4)] for k in range(max(1, workers * 4))]
    with Pool(max(1, workers)) as pool:
        pool.map(_write_images, [(chunk, src, k) for k, chunk in enumerate(chunks)])
    return counts


def half_folder(root: Path, dest: Path) -> int:
    """Hard links to the first half of the (sorted) files of every leaf folder of ``root``; returns the count."""
    n = 0
    for parent, _dirs, names in os.walk(root):
        names = sorted(names)[: len(names) // 2]
        if names:
            target = dest / Path(parent).relative_to(root)
            target.mkdir(parents=True, exist_ok=True)
            for name in names:
                os.link(Path(parent) / name, target / name)
            n += len(names)
    return n


# ------------------------------------------------------------------------------------------ one measurement
def _peak_rss_mib() -> tuple[float, float]:
    """Peak resident memory of this process and of its largest (finished) child, in MiB (Linux: ru_maxrss is KiB)."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def _rss_now_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def child(side: str, root: Path, out: Path, workers: int, size: int) -> dict[str, float]:
    import torch
    from torch.utils.data import ConcatDataset, DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from distill.prepare import SplitSpec, prepare_to

    torch.set_num_threads(1)  # what the data stage's main process gets to do is orchestration
    before = _rss_now_mib()
    t0 = time.perf_counter()
    if side == "ours":
        data = prepare_to(out, name="imagefolder", root=root, image_size=size, split=SplitSpec(unlabeled=True),
                          workers=workers)
        n = sum(data.meta.sizes.values())
    else:
        transform = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
        ds = ConcatDataset([ImageFolder(str(root / f), transform=transform) for f in SHARES])
        n = 0
        for images, _ in DataLoader(ds, batch_size=256, num_workers=workers):
            assert images.dtype == torch.uint8
            n += len(images)
    elapsed = time.perf_counter() - t0
    main, worker = _peak_rss_mib()
    return {"images": n, "seconds": elapsed, "rss_before_mib": before, "peak_rss_mib": main,
            "peak_worker_rss_mib": worker}


def measure(side: str, root: Path, out: Path, workers: int, size: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", side, "--root", str(root), "--out", str(out), "--workers",
           str(workers), "--size", str(size)]
    env = {**os.environ, "DISTILL_PROGRESS": "0"}
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main
def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000, help="images in the generated folder (the larger size)")
    ap.add_argument("--workers", type=int, default=2, help="decoding processes, both sides")
    ap.add_argument("--size", type=int, default=64, help="image_size: side of the stored images")
    ap.add_argument("--src", default="160x120", help="width x height of the generated JPEGs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2,000 images, 1 round")
    ap.add_argument("--tmp", default=None, help="folder for the generated images and outputs (default: system temp)")
    ap.add_argument("--child", choices=["ours", "torchvision"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.root), Path(args.out), args.workers, args.size)))
        return
    if args.quick:
        args.images, args.rounds = 2000, 1
    src = tuple(int(v) for v in args.src.split("x"))
    with tempfile.TemporaryDirectory(prefix="bench-prepare-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        counts = generate(tmp / "raw", args.images, src, args.workers)
        print(f"generated {sum(counts.values())} JPEGs {args.src} {counts} in {time.perf_counter() - t0:.0f} s; "
              f"load {_load()}", flush=True)
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "torchvision": []}
        for r in range(args.rounds):
            for side in ("ours", "torchvision") if r % 2 == 0 else ("torchvision", "ours"):
                res = measure(side, tmp / "raw", tmp / "prepared", args.workers, args.size)
                runs[side].append(res)
                print(f"round {r + 1} {side:12s} {res['images'] / res['seconds']:8.0f} img/s  {res['seconds']:6.1f} s  "
                      f"peak RSS {res['peak_rss_mib']:.0f} MiB (largest worker {res['peak_worker_rss_mib']:.0f})  "
                      f"load {_load()}", flush=True)
        half = half_folder(tmp / "raw", tmp / "half")
        small = [measure("ours", tmp / "half", tmp / "prepared_half", args.workers, args.size)
                 for _ in range(max(1, args.rounds - 1))]
        print(f"half folder ({half} images): " + ", ".join(f"peak RSS {s['peak_rss_mib']:.0f} MiB (largest worker "
                                                              f"{s['peak_worker_rss_mib']:.0f})" for s in small))

    rates = {side: [r["images"] / r["seconds"] for r in rs] for side, rs in runs.items()}
    med = {side: statistics.median(v) for side, v in rates.items()}
    ratio = med["ours"] / med["torchvision"]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; load at the end {_load()}")
    print(f"command: python bench/prepare_data.py --images {args.images} --workers {args.workers} --size {args.size} "
          f"--src {args.src} --rounds {args.rounds}\n")
    print("| side | images/s, median | min - max | rounds |")
    print("|---|---|---|---|")
    for side in ("ours", "torchvision"):
        print(f"| {side} | {med[side]:.0f} | {min(rates[side]):.0f} - {max(rates[side]):.0f} | {len(rates[side])} |")
    print(f"\nratio ours/torchvision (medians): {ratio:.3f}\n")
    big = max(r["peak_rss_mib"] for r in runs["ours"])
    big_w = max(r["peak_worker_rss_mib"] for r in runs["ours"])
    sm = max(r["peak_rss_mib"] for r in small)
    sm_w = max(r["peak_worker_rss_mib"] for r in small)
    print("| our preparation | images | peak RSS, main process (MiB) | peak RSS, largest worker (MiB) |")
    print("|---|---|---|---|")
    print(f"| half folder | {half} | {sm:.0f} | {sm_w:.0f} |")
    print(f"| full folder | {sum(counts.values())} | {big:.0f} | {big_w:.0f} |")
    print(f"\npeak RSS growth from {half} to {sum(counts.values())} images: main {100 * (big / sm - 1):+.1f} %, "
          f"largest worker {100 * (big_w / sm_w - 1):+.1f} %; RSS after imports, before preparing: "
          f"{statistics.median(r['rss_before_mib'] for r in runs['ours']):.0f} MiB")


if __name__ == "__main__":
    main()
