"""What the soft-label store buys: distillation at the cost of plain training, at online-teacher accuracy.

For each seed, in one process, with the pipeline's own stages (``distill.stages``, run by name): prepare the data,
train the teacher, generate the soft-label store (timed), then train the *same* student (same preset, recipe,
epochs and seed) three ways:

* ``none``: labels only (``student.distillation: none``): no teacher at all;
* ``stored``: DeiT distillation replaying the store (``teacher_mode: stored``): no teacher in the loop;
* ``online``: DeiT distillation with the teacher run on every batch (``teacher_mode: online``), DeiT's way.

Reported: top-1 of each on the validation split (``--split test``: the test split, for a claim, on held-out
seeds >= 1000 only; goal: stored within 0.5 points of online, or better) as mean ± std over the seeds; store
bytes per image and generation views/s; and training images/s of each mode with the ratios stored/none
(goal >= 0.95) and online/none. Throughput comes from a separate phase that interleaves short trainings of
the three modes (none, stored, online, none, stored, ...) for ``--speed-rounds`` rounds on the last seed's
data and store, so that changes in machine load hit every mode alike; each figure is the engine's own
images/s (training loop only, validation excluded), and the median over rounds is reported.

Usage:
    python bench/teacher_modes.py --seeds 100 101 102 [-S key=value ...] [--out bench.json]
    python bench/teacher_modes.py --split test --seeds 1000 1001 1002 --out claim.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from distill.augment import eval_augmenter  # noqa: E402
from distill.config import Paths, apply_overrides, parse_params  # noqa: E402
from distill.data import ArrayDataset, load_prepared  # noqa: E402
from distill.evaluation import mean_std  # noqa: E402
from distill.inference import evaluate  # noqa: E402
from distill.models.deit import load_deit  # noqa: E402
from distill.runtime import make_accelerator  # noqa: E402
from distill.stages.runner import run_stage  # noqa: E402

MODES = {"none": ["student.distillation=none"], "stored": ["student.teacher_mode=stored"],
         "online": ["student.teacher_mode=online"]}


def run(stage: str, params: Any, paths: Paths) -> dict[str, Any]:
    """One stage, in this process, with the params dvc.yaml declares for it."""
    (paths.root / "data" / "raw").mkdir(parents=True, exist_ok=True)
    return run_stage(stage, params, paths, dvc_yaml=ROOT / "dvc.yaml")


def top1(paths: Paths, name: str, split: str = "val") -> float:
    """Top-1 of a trained student on a split (the engine's evaluation: eval mode, its two heads averaged)."""
    data = load_prepared(paths.data)
    model, _ = load_deit(paths.model(name))  # a student
    meta = data.meta
    accelerator = make_accelerator()
    aug = eval_augmenter(meta.image_size, meta.mean, meta.std)
    loader = accelerator.prepare(DataLoader(ArrayDataset(data.split(split)), batch_size=512))
    return evaluate(model.to(accelerator.device), loader, accelerator, aug)["acc"]


def run_seed(raw: dict, seed: int, work: Path, split: str) -> dict:
    paths = Paths(work)
    base = parse_params({**raw, "seed": seed})
    run("data", base, paths)
    run("teacher", base, paths)
    store = run("soft_labels", base, paths)
    out = {"seed": seed, "views_per_sec": store["views_per_sec"], "bytes_per_image": store["bytes_per_image"]}
    for mode, overrides in MODES.items():
        params = parse_params(apply_overrides({**raw, "seed": seed}, overrides))
        summary = run("student", params, paths)
        out[mode] = {"images_per_sec": summary["train_images_per_sec"], "top1": top1(paths, "student", split)}
        print(f"seed {seed} {mode:>6}: {summary['train_images_per_sec']:.0f} img/s, {split} top-1 "
              f"{out[mode]['top1']:.4f}", flush=True)
    return out


def speed(raw: dict, seed: int, work: Path, rounds: int, epochs: int) -> dict[str, list[float]]:
    """Images/s of each mode from interleaved short trainings (data, teacher and store already in ``work``)."""
    paths = Paths(work)
    short = [f"student.train.epochs={epochs}", "student.train.warmup_epochs=1"]
    out: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        for mode, overrides in MODES.items():
            params = parse_params(apply_overrides({**raw, "seed": seed}, overrides + short))
            out[mode].append(run("student", params, paths)["train_images_per_sec"])
        speeds = ", ".join(f"{m} {v[-1]:.0f} img/s" for m, v in out.items())
        print(f"speed round {r + 1}/{rounds}: {speeds}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    ap.add_argument("--split", choices=("val", "test"), default="val",
                    help="val: for choosing; test: for a claim, on held-out seeds (>= 1000) only")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--speed-rounds", type=int, default=5, help="interleaved rounds of the throughput phase")
    ap.add_argument("--speed-epochs", type=int, default=3, help="epochs of each throughput-phase training")
    ap.add_argument("--speed-only", action="store_true", help="skip the accuracy runs: one seed's data, teacher "
                    "and store, then the throughput phase")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.split == "test" and min(args.seeds) < 1000:
        ap.error("--split test is for a claim on held-out seeds (>= 1000), never used while choosing")
    raw = apply_overrides(yaml.safe_load(Path(args.params).read_text()) or {}, args.overrides)
    parse_params(raw)
    with tempfile.TemporaryDirectory() as tmp:
        if args.speed_only:
            work = Path(tmp) / "speed"
            base = parse_params({**raw, "seed": args.seeds[0]})
            for stage in ("data", "teacher", "soft_labels"):
                run(stage, base, Paths(work))
            runs = []
        else:
            runs = [run_seed(raw, seed, Path(tmp) / f"seed{seed}", args.split) for seed in args.seeds]
            work = Path(tmp) / f"seed{args.seeds[-1]}"
        rates = speed(raw, args.seeds[-1], work, args.speed_rounds, args.speed_epochs)

    def stat(values: list[float], pct: bool = False) -> str:
        m, s = mean_std([v * (100 if pct else 1) for v in values])
        return f"{m:.2f} ± {s:.2f}"

    med = {mode: statistics.median(v) for mode, v in rates.items()}
    lines = [
        f"seeds {args.seeds}; overrides {args.overrides or 'none'}; {platform.platform()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
        f"training images/s (median of {args.speed_rounds} interleaved rounds of {args.speed_epochs} epochs): "
        + ", ".join(f"{m} {v:.0f}" for m, v in med.items()),
        f"ratio stored/none {med['stored'] / med['none']:.3f}, online/none {med['online'] / med['none']:.3f}",
    ]
    if runs:
        diff = [r["stored"]["top1"] - r["online"]["top1"] for r in runs]
        lines += [
            f"{args.split} top-1 (%)      "
            + ", ".join(f"{m} {stat([r[m]['top1'] for r in runs], True)}" for m in MODES),
            f"stored - online    {stat(diff, True)} points (per seed "
            + ", ".join(f"{100 * d:+.2f}" for d in diff) + ")",
            f"store              {statistics.mean(r['bytes_per_image'] for r in runs):.0f} bytes per image, "
            f"generation {stat([r['views_per_sec'] for r in runs])} views/s",
        ]
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python bench/teacher_modes.py " + " ".join(sys.argv[1:]),
                                              "summary": lines, "runs": runs, "speed": rates}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
