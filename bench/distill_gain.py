"""What distillation buys, over several seeds: teacher, labels-only baseline and distilled student.

Runs the pipeline's own stages (``distill.stages``, by name, with the params ``dvc.yaml`` declares for each)
in this process, once per seed, each seed in its own folder, with no Prefect, MLflow or DVC: the computation
``dvc repro`` performs, without the orchestration. The seed changes the split, the initialisations and every
random draw. Reports each model's top-1 and, for the distillation gain (student minus baseline) and the gap
to the teacher (teacher minus student), which are paired per seed, the per-seed values, the mean and the 95 %
Student-t confidence interval of the paired difference.

Two uses, kept apart (docs/benchmarks.md, "How the default was chosen"):

* ``--split val``: choosing. The validation split only; the evaluate stage (which reads the test split) does
  not run. Screening seeds are 100-999; seeds >= 1000 are refused.
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
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import HELD_OUT, ROOT, check_seeds, gain_and_gap, machine, run_jobs, run_stages, score  # noqa: E402

from distill.config import apply_overrides, load_raw, merge, parse_params  # noqa: E402
from distill.evaluation import aggregate_runs  # noqa: E402
from distill.report import per_seed_lines, seed_table  # noqa: E402
from distill.stages.runner import pipeline_stages  # noqa: E402

KEYS = ("teacher.top1", "baseline.top1", "student.top1", "distillation_gain", "gap_to_teacher",
        "student.top1_cls_head", "student.top1_dist_head", "student.agreement_with_teacher")


def val_top1(workdir: Path) -> dict[str, Any]:
    """Validation top-1 of the three trained models (eval view; a DeiT's two heads averaged), gain and gap."""
    scores = score(workdir, "val")
    return {**{n: {"top1": s["top1"]} for n, s in scores.items()}, **gain_and_gap(scores)}


def run_seed(raw: dict, seed: int, workdir: Path, split: str) -> tuple[dict, float]:
    """Every stage for one seed (the evaluate stage only for the test split); metrics and stage wall times."""
    t0 = time.perf_counter()
    params = parse_params({**raw, "seed": seed}, source=f"params (seed {seed})")
    stages = pipeline_stages(ROOT / "dvc.yaml")
    if split == "val":  # the trainings only: evaluate (the test split) and what follows it do not run
        stages = stages[:stages.index("evaluate")]
    times = run_stages(params, workdir, stages)
    metrics = val_top1(workdir) if split == "val" else json.loads((workdir / "metrics" / "evaluate.json").read_text())
    return {**metrics, "stage_time_s": times}, time.perf_counter() - t0


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
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once (above 1: Prefect task runs, own processes)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores / jobs)")
    args = ap.parse_args(argv)
    why = check_seeds(args.split, args.seeds)
    if why is not None and not (args.split == "test" and args.allow_screened_seeds):
        ap.error(why + (". Pass --allow-screened-seeds to reproduce an old figure." if args.split == "test" else ""))

    raw = merge(apply_overrides(load_raw(args.params), args.overrides), {"evaluate": {"register_model": False}})
    parse_params(raw)  # fail on bad overrides before any work
    runs = []
    jobs = max(1, min(args.jobs, len(args.seeds)))
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)

    def report(job: tuple, result: tuple[dict, float]) -> None:
        seed, (m, elapsed) = job[1], result
        runs.append({"seed": seed, **m})
        print(f"seed {seed} ({args.split}): teacher {m['teacher']['top1']:.4f} "
              f"baseline {m['baseline']['top1']:.4f} student {m['student']['top1']:.4f} "
              f"gain {m['distillation_gain'] * 100:+.2f} pts ({elapsed:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.workdir or tmp)
        run_jobs(run_seed, [(raw, seed, base / f"seed{seed}", args.split) for seed in args.seeds], workers=jobs,
                 threads=threads, on_result=report)
    runs.sort(key=lambda r: r["seed"])
    agg = aggregate_runs([{k: v for k, v in r.items() if k != "seed"} for r in runs])
    summary = {k: agg[k] for k in KEYS if k in agg}
    print(f"\n{len(runs)} seeds {args.seeds}, {args.split} split, overrides {args.overrides or 'none'}\n")
    print(seed_table(summary))
    print("\n" + per_seed_lines(summary))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": " ".join(["python", "bench/distill_gain.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(jobs, threads),
            "split": args.split, "overrides": args.overrides, "seeds": args.seeds, "summary": summary, "runs": runs,
        }, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
