"""What distillation buys, over several seeds: teacher, labels-only baseline and distilled student.

Runs the pipeline's own stages (``distill.stages``, by name, with the params ``dvc.yaml`` declares for each)
in this process, once per seed, each seed in its own folder, with no Prefect, MLflow or DVC: the computation
``dvc repro`` performs, without the orchestration. The seed changes the split, the initialisations and every
random draw. Reports each model's top-1 and, for the distillation gain (student minus baseline) and the gap
to the teacher (teacher minus student), which are paired per seed, the per-seed values, the mean and the 95 %
Student-t confidence interval of the paired difference.

Two uses, kept apart (docs/benchmarks.md, "How the default was chosen"):

* ``--split val``: choosing. The validation split only; the evaluate stage (which reads the test split) does
  not run. Screening seeds are 100-999.
* ``--split test`` (default): confirming a claim, once, on held-out seeds never used while choosing: 1000 and
  above. Seeds below 1000 are refused unless ``--allow-screened-seeds`` (for reproducing old figures).

Usage:
    python bench/distill_gain.py --split val --seeds 100 101 102 -S student.alpha=0.7 --jobs 2
    python bench/distill_gain.py --seeds 1000 1001 1002 1003 1004 1005 1006 1007 --jobs 2 --out gain.json

With ``--jobs N`` the seeds run in N worker processes, each with ``cores / N`` torch threads (small models use
several processes better than several threads). Results do not depend on N: each seed is its own computation.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from _workers import exit_with_parent  # noqa: E402  (bench/ is on sys.path)

from distill.checkpoint import load_model  # noqa: E402
from distill.config import Paths, apply_overrides, load_raw, merge, parse_params  # noqa: E402
from distill.data import ArrayDataset, Augmenter, AugmentSpec, load_prepared  # noqa: E402
from distill.engine import evaluate, make_accelerator  # noqa: E402
from distill.evaluation import aggregate_runs  # noqa: E402
from distill.report import per_seed_lines, seed_table  # noqa: E402
from distill.stages.runner import pipeline_stages, run_stage  # noqa: E402

KEYS = ("teacher.top1", "baseline.top1", "student.top1", "distillation_gain", "gap_to_teacher",
        "student.top1_cls_head", "student.top1_dist_head", "student.agreement_with_teacher")
HELD_OUT = 1000  # seeds from here on are never used while choosing


def val_top1(paths: Paths) -> dict[str, Any]:
    """Validation top-1 of the three trained models (eval view; a DeiT's two heads averaged), gain and gap."""
    data = load_prepared(paths.data)
    meta = data.meta
    accelerator = make_accelerator()
    aug = Augmenter(spec=AugmentSpec(), out_size=meta.image_size, mean=meta.mean, std=meta.std)
    loader = accelerator.prepare(DataLoader(ArrayDataset(data.val), batch_size=512))
    out: dict[str, Any] = {}
    for name in ("teacher", "baseline", "student"):
        model, _ = load_model(paths.model(name))
        out[name] = {"top1": evaluate(model.to(accelerator.device), loader, accelerator, aug)["acc"]}
    out["distillation_gain"] = out["student"]["top1"] - out["baseline"]["top1"]
    out["gap_to_teacher"] = out["teacher"]["top1"] - out["student"]["top1"]
    return out


def run_seed(raw: dict, seed: int, workdir: Path, split: str) -> dict:
    """Every stage for one seed (the evaluate stage only for the test split); metrics and stage wall times."""
    params = parse_params({**raw, "seed": seed}, source=f"params (seed {seed})")
    paths = Paths(workdir)
    (workdir / "data" / "raw").mkdir(parents=True, exist_ok=True)
    times, result = {}, {}
    for stage in pipeline_stages(ROOT / "dvc.yaml"):
        if stage == "evaluate" and split == "val":
            continue
        t0 = time.perf_counter()
        result = run_stage(stage, params, paths, dvc_yaml=ROOT / "dvc.yaml")
        times[stage] = time.perf_counter() - t0
    metrics = val_top1(paths) if split == "val" else result
    return {**metrics, "stage_time_s": times}


def _timed_seed(raw: dict, seed: int, workdir: Path, split: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    return run_seed(raw, seed, workdir, split), time.perf_counter() - t0


def _worker_seed(raw: dict, seed: int, workdir: Path, split: str, threads: int, parent: int) -> tuple[dict, float]:
    """One seed in a ``--jobs`` worker process."""
    exit_with_parent(parent)
    torch.set_num_threads(threads)
    return _timed_seed(raw, seed, workdir, split)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--split", choices=("val", "test"), default="test",
                    help="val: for choosing (no test figure is computed); test: to confirm a claim on held-out seeds")
    ap.add_argument("--allow-screened-seeds", action="store_true",
                    help=f"allow --split test on seeds below {HELD_OUT} (they were or may be used while choosing)")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="write all per-seed metrics and the summary as JSON")
    ap.add_argument("--workdir", default=None, help="keep each seed's outputs here (default: a temp dir)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once, in separate processes")
    args = ap.parse_args(argv)
    if args.split == "test" and min(args.seeds) < HELD_OUT and not args.allow_screened_seeds:
        ap.error(f"--split test confirms a claim on held-out seeds (>= {HELD_OUT}); seeds below are for choosing "
                 "(--split val). Pass --allow-screened-seeds to reproduce an old figure.")

    raw = merge(apply_overrides(load_raw(args.params), args.overrides), {"evaluate": {"register_model": False}})
    parse_params(raw)  # fail on bad overrides before any work
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.workdir or tmp)
        jobs = max(1, min(args.jobs, len(args.seeds)))
        threads = max(1, torch.get_num_threads() // jobs)

        def report(seed: int, m: dict, elapsed: float) -> None:
            runs.append({"seed": seed, **m})
            print(f"seed {seed} ({args.split}): teacher {m['teacher']['top1']:.4f} "
                  f"baseline {m['baseline']['top1']:.4f} student {m['student']['top1']:.4f} "
                  f"gain {m['distillation_gain'] * 100:+.2f} pts ({elapsed:.0f} s)", flush=True)

        if jobs == 1:
            for seed in args.seeds:
                report(seed, *_timed_seed(raw, seed, base / f"seed{seed}", args.split))
        else:
            ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
                futures = {seed: pool.submit(_worker_seed, raw, seed, base / f"seed{seed}", args.split, threads,
                                             os.getpid()) for seed in args.seeds}
                for seed, fut in futures.items():  # in seed order, each as soon as it is done
                    report(seed, *fut.result())
    agg = aggregate_runs([{k: v for k, v in r.items() if k != "seed"} for r in runs])
    summary = {k: agg[k] for k in KEYS if k in agg}
    print(f"\n{len(runs)} seeds {args.seeds}, {args.split} split, overrides {args.overrides or 'none'}\n")
    print(seed_table(summary))
    print("\n" + per_seed_lines(summary))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": " ".join(["python", "bench/distill_gain.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.platform()}, {os.cpu_count()} cores, {jobs} seed(s) at a time x "
                       f"{threads} torch threads, torch {torch.__version__}",
            "split": args.split, "overrides": args.overrides, "seeds": args.seeds, "summary": summary, "runs": runs,
        }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
