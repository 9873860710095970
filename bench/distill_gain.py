"""What distillation buys, over several seeds: teacher, labels-only baseline and distilled student.

Runs the pipeline's own stage functions (``distill.stages``: data, teacher, soft_labels, baseline, student,
evaluate) directly in this process, once per seed, each seed in its own folder, with no Prefect, MLflow or
DVC: the same computation ``dvc repro`` performs, without the orchestration. The seed changes the split,
the initialisations and every random draw. Reports every model's test top-1 and the distillation gain
(student minus baseline) as mean ± sample std over the seeds.

Usage:
    python bench/distill_gain.py --seeds 0 1 2 3 4                       # params.yaml as it is
    python bench/distill_gain.py --seeds 0 1 2 -S student.distillation=soft -S student.tau=3
    python bench/distill_gain.py --seeds 0 1 2 --out reports/gain.json
    python bench/distill_gain.py --seeds 0 1 2 3 4 --jobs 2             # 2 seeds at a time, 1 torch thread each

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

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from distill import stages as S  # noqa: E402
from distill.config import apply_overrides, parse_params  # noqa: E402
from distill.evaluation import aggregate_runs  # noqa: E402
from distill.report import seed_table  # noqa: E402

KEYS = ("teacher.top1", "baseline.top1", "student.top1", "distillation_gain", "gap_to_teacher",
        "student.top1_cls_head", "student.top1_dist_head", "student.agreement_with_teacher")


def run_seed(raw: dict, seed: int, workdir: Path) -> dict:
    """Run every stage for one seed; return the evaluate metrics plus per-stage wall times."""
    params = parse_params({**raw, "seed": seed}, source=f"params (seed {seed})")
    paths = S.Paths(workdir)
    times = {}
    for stage in ("data", "teacher", "soft_labels", "baseline", "student", "evaluate"):
        t0 = time.perf_counter()
        result = getattr(S, f"run_{stage}")(params, paths)
        times[stage] = time.perf_counter() - t0
    return {**result, "stage_time_s": times}


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent is gone (killed: no executor shutdown) stops instead of training on."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _timed_seed(raw: dict, seed: int, workdir: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    return run_seed(raw, seed, workdir), time.perf_counter() - t0


def _worker_seed(raw: dict, seed: int, workdir: Path, threads: int, parent: int) -> tuple[dict, float]:
    """One seed in a ``--jobs`` worker process."""
    _exit_with_parent(parent)
    torch.set_num_threads(threads)
    return _timed_seed(raw, seed, workdir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="write all per-seed metrics and the summary as JSON")
    ap.add_argument("--workdir", default=None, help="keep each seed's outputs here (default: a temp dir)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once, in separate processes")
    args = ap.parse_args(argv)

    raw = apply_overrides(yaml.safe_load(Path(args.params).read_text()) or {}, args.overrides)
    raw["evaluate"] = {**raw.get("evaluate", {}), "register_model": False}
    parse_params(raw)  # fail on bad overrides before any work
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.workdir or tmp)
        jobs = max(1, min(args.jobs, len(args.seeds)))
        threads = max(1, torch.get_num_threads() // jobs)

        def report(seed: int, m: dict, elapsed: float) -> None:
            runs.append({"seed": seed, **m})
            print(f"seed {seed}: teacher {m['teacher']['top1']:.4f} baseline {m['baseline']['top1']:.4f} "
                  f"student {m['student']['top1']:.4f} gain {m['distillation_gain'] * 100:+.2f} pts "
                  f"({elapsed:.0f} s)", flush=True)

        if jobs == 1:
            for seed in args.seeds:
                report(seed, *_timed_seed(raw, seed, base / f"seed{seed}"))
        else:
            ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
                futures = {seed: pool.submit(_worker_seed, raw, seed, base / f"seed{seed}", threads, os.getpid())
                           for seed in args.seeds}
                for seed, fut in futures.items():  # in seed order, each as soon as it is done
                    report(seed, *fut.result())
    agg = aggregate_runs([{k: v for k, v in r.items() if k not in ("seed",)} for r in runs])
    summary = {k: agg[k] for k in KEYS if k in agg}
    print(f"\n{len(runs)} seeds {args.seeds}, overrides {args.overrides or 'none'}\n")
    print(seed_table(summary))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": " ".join(["python", "bench/distill_gain.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.platform()}, {os.cpu_count()} cores, {jobs} seed(s) at a time x "
                       f"{threads} torch threads, torch {torch.__version__}",
            "overrides": args.overrides, "seeds": args.seeds, "summary": summary, "runs": runs,
        }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
