"""What a sweep costs over running its work directly (issue 20), both sides in one run, one Prefect server.

1. **Fixed cost per variant.** In one fresh project whose teacher, store and baseline are already in DVC's run-cache
   (a warm-up variant computed them), each round runs one variant alone, ``dvc exp run --temp -S student.alpha=a
   -S seed=S student baseline`` (the stages' own processes, Prefect flow runs and MLflow runs included), and the same
   work as a sweep of one variant, ``python -m flows sweep -S student.alpha=b --seeds S``; every round takes new
   alphas, so both train a student. The sides alternate which goes first. Goal: the sweep's extra time, median over
   rounds, at most 10 s.
2. **A sweep of 4 alpha variants against the distinct stages it needs**, each side in a fresh project of its own
   (no cache shared): ``python -m flows sweep -S student.alpha=a,b,c,d --seeds S --jobs J`` for each ``--jobs``
   value J (default 1 and 2: one variant at a time, and two side by side with a core each) against ``dvc repro
   soft_labels baseline`` (data, teacher, store, baseline) and then ``dvc repro student`` once per alpha
   (``params.yaml`` edited in place; one workspace runs one stage at a time). A sweep's variant stops at the
   student and the baseline (no variant reads the test split), so neither side evaluates. Goal: at most 1.15x.

Params: ``--config tiny`` (the default) is the tests' tiny configuration, where the fixed costs weigh the most: the
worst case for both figures. ``--config default`` is the shipped ``params.yaml`` (the 4-minute digits pipeline):
what a sweep of the default costs. Say the machine's load with the figures (``uptime`` before and after are
printed).

Usage:
    python bench/sweep_overhead.py [--rounds 2] [--config tiny|default] [--jobs 1 2]
                                   [--out bench/results/sweep_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_overhead import QUICK, _env, make_project, prefect_server, run  # noqa: E402

from flows.workspace import apply_to_params_file  # noqa: E402

#: The tests' smaller models (tests/test_sweep_e2e.py), on top of pipeline_overhead's 2-epoch QUICK params.
SMALLER = {"data.max_per_class": 12, "data.unlabeled": False, "teacher.width": 4, "teacher.blocks": 1,
           "teacher.train.batch_size": 32, "student.model.preset": "deit_nano", "student.train.batch_size": 32}
SEED = 100


def set_params(project: Path, values: dict[str, object], env: dict[str, str]) -> None:
    """``params.yaml`` edited in place (flows.workspace, as ``--apply`` does) and committed."""
    apply_to_params_file(project / "params.yaml", [f"{k}={json.dumps(v)}" for k, v in values.items()])
    subprocess.run(["git", "commit", "-qam", "params"], cwd=project, env=env, check=True, capture_output=True)


def new_project(here: Path, env: dict[str, str], tiny: bool) -> Path:
    """A fresh project: the tests' tiny configuration (QUICK and SMALLER), or ``params.yaml`` as shipped."""
    here.mkdir(parents=True)
    project = make_project(here, tiny, env)
    if tiny:
        set_params(project, SMALLER, env)
    return project


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows", "sweep", *args]


def fixed_cost(tmp: Path, env: dict[str, str], rounds: int, tiny: bool) -> list[dict[str, float]]:
    """Part 1: per round, one variant alone and one sweep of one variant, in a project with warm shared stages."""
    project = new_project(tmp / "fixed", env, tiny)
    run(sweep_cmd("-S", "student.alpha=0.55", "--seeds", str(SEED), "--id", "warm"), project, env, tmp / "warm.log")
    out = []
    for r in range(rounds):
        alone_alpha, sweep_alpha = f"0.{60 + 2 * r}", f"0.{61 + 2 * r}"
        sides = {
            "alone": ["dvc", "exp", "run", "--temp", "--name", f"alone-{r}", "-S", f"student.alpha={alone_alpha}",
                      "-S", f"seed={SEED}", "student", "baseline"],
            "sweep": sweep_cmd("-S", f"student.alpha={sweep_alpha}", "--seeds", str(SEED), "--id", f"one-{r}"),
        }
        order = ("alone", "sweep") if r % 2 == 0 else ("sweep", "alone")
        times = {side: run(sides[side], project, env, tmp / f"fixed-{side}-{r}.log")[0] for side in order}
        outside = times["sweep"] - variant_flow_s((tmp / f"fixed-sweep-{r}.log").read_text())
        out.append({**times, "fixed_cost_s": times["sweep"] - times["alone"], "outside_variant_flow_s": outside})
        print(f"round {r + 1}: alone {times['alone']:.1f} s, sweep of one {times['sweep']:.1f} s, "
              f"fixed cost {out[-1]['fixed_cost_s']:+.1f} s; the sweep outside its variant's flow {outside:.1f} s",
              flush=True)
    return out


def variant_flow_s(log: str) -> float:
    """From a sweep's log: its variant's pipeline flow, from the DVC command's start to the flow's end (Prefect's
    ``HH:MM:SS.fff`` log times; the flow's own MLflow bookkeeping after DVC included)."""
    def at(line: str) -> float:
        h, m, sec = line.split(" ", 1)[0].split(":")
        return 3600 * int(h) + 60 * int(m) + float(sec)

    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if "DVC experiment" in line)
    end = next(line for line in lines[start:] if "Finished in state" in line)
    return at(end) - at(lines[start])


def four_variants(tmp: Path, env: dict[str, str], sweep_first: bool, tiny: bool,
                  jobs: list[int]) -> dict[str, float]:
    """Part 2: sweeps of 4 alphas (one per ``jobs`` value) against their distinct stages run directly, each in a
    fresh project."""
    alphas = ["0.5", "0.6", "0.7", "0.8"]

    def sweep(n: int) -> float:
        project = new_project(tmp / f"sweep4-j{n}", env, tiny)
        return run(sweep_cmd("-S", f"student.alpha={','.join(alphas)}", "--seeds", str(SEED), "--jobs", str(n)),
                   project, env, tmp / f"sweep4-j{n}.log")[0]

    def direct() -> float:
        project = new_project(tmp / "direct", env, tiny)
        set_params(project, {"seed": SEED}, env)
        total = run(["dvc", "repro", "soft_labels", "baseline"], project, env, tmp / "direct-shared.log")[0]
        for alpha in alphas:
            t0 = time.perf_counter()
            set_params(project, {"student.alpha": float(alpha)}, env)
            run(["dvc", "repro", "student"], project, env, tmp / f"direct-{alpha}.log")
            total += time.perf_counter() - t0
        return total

    sweeps = [(f"sweep_jobs{n}", lambda n=n: sweep(n)) for n in jobs]
    times = {}
    for name, side in ([*sweeps, ("direct", direct)] if sweep_first else [("direct", direct), *sweeps]):
        times[name] = side()
        print(f"4 variants, {name}: {times[name]:.1f} s", flush=True)
    return {**times, **{f"ratio_jobs{n}": times[f"sweep_jobs{n}"] / times["direct"] for n in jobs}}


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of part 1 (the sides alternate)")
    ap.add_argument("--out", default=None, help="also write the figures as JSON")
    ap.add_argument("--only", choices=("fixed", "four"), default=None, help="run one part only")
    ap.add_argument("--config", choices=("tiny", "default"), default="tiny",
                    help="tiny: the tests' configuration (the worst case); default: params.yaml as shipped")
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="part 2: one sweep per --jobs value")
    args = ap.parse_args(argv)
    tiny = args.config == "tiny"
    env = _env()
    before = load()
    print(f"load before: {before}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        server, api = prefect_server(tmp, env)
        env = {**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp / "prefect-client")}
        try:
            t0 = time.perf_counter()
            fixed = fixed_cost(tmp, env, args.rounds, tiny) if args.only != "four" else []
            four = four_variants(tmp, env, args.rounds % 2 == 1, tiny, args.jobs) if args.only != "fixed" else {}
            wall = time.perf_counter() - t0
        finally:
            server.terminate()
            server.wait(timeout=30)
    after = load()
    median = statistics.median(r["fixed_cost_s"] for r in fixed) if fixed else None
    if fixed:
        outside = statistics.median(r["outside_variant_flow_s"] for r in fixed)
        print(f"\nfixed cost a sweep adds per variant: median {median:+.1f} s over {len(fixed)} round(s) "
              f"(goal <= 10 s); the sweep outside its variant's flow: median {outside:.1f} s")
    for n in args.jobs if four else []:
        print(f"4 alpha variants: sweep --jobs {n} {four[f'sweep_jobs{n}']:.1f} s, distinct stages directly "
              f"{four['direct']:.1f} s, {four[f'ratio_jobs{n}']:.3f}x (goal <= 1.15x)")
    print(f"load after: {after}; wall {wall:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": " ".join(["python", "bench/sweep_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "load_before": before, "load_after": after, "config": args.config,
            "params": {**QUICK, **SMALLER, "seed": SEED} if tiny else {"seed": SEED},
            "fixed_cost_rounds": fixed, "fixed_cost_median_s": median, "four_variants": four}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
