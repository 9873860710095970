"""Screen regimes and recipes on the VALIDATION split, over several seeds (how the default was chosen).

For every seed, in its own worker process (1 torch thread by default): prepares the data and trains the
teacher once per (data, teacher) configuration, generates the soft-label store once per store configuration,
then trains each variant with the pipeline's own stages (``distill.stages``, run by name with the params
``dvc.yaml`` declares for each). A variant named ``base...`` trains the labels-only baseline (exactly the
student's optimizer and warm-up steps, its own ``baseline.lr`` / ``baseline.weight_decay``); any other name
trains the distilled student. Each figure is the validation top-1 of the final model (eval view; a DeiT's
eval output is the mean of its two heads). The test split is never read, and seeds >= 1000 are refused: they
are kept for the held-out confirmation (``bench/distill_gain.py``).

Usage:
    python bench/recipe_screen.py --seeds 100 101 102 103 --jobs 2 --out screen.json \\
        -B data.max_per_class=15 "stu:" "stu_lr2:student.train.lr=0.002" "base:" "base_lr3:baseline.lr=0.003"

``-B key=value`` applies to every variant; a variant is ``name:k=v;k=v`` on top. The JSON written to ``--out``
after every finished seed holds each seed's figures, stage times and the resolved overrides.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from _workers import exit_with_parent  # noqa: E402  (bench/ is on sys.path)

from distill.config import Paths, apply_overrides, load_raw, parse_params  # noqa: E402
from distill.evaluation import aggregate_runs  # noqa: E402

HELD_OUT = 1000  # seeds from here on are for the confirmation only


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_seed(raw: dict, variants: list[tuple[str, str]], seed: int, base: Path) -> dict:
    """Every variant on one seed; teacher and store shared between the variants that agree on them."""
    from distill.stages.runner import run_stage, stage_view

    def run(stage: str, params: Any, paths: Paths) -> dict[str, Any]:
        return run_stage(stage, params, paths, dvc_yaml=ROOT / "dvc.yaml")

    out: dict = {"seed": seed, "variants": {}}
    for name, overrides in variants:
        params = parse_params(apply_overrides(raw, [o for o in overrides.split(";") if o] + [f"seed={seed}"]))
        dump = params.model_dump(mode="json")
        root = base / f"seed{seed}" / _key({"seed": seed, "data": dump["data"], "teacher": dump["teacher"]})
        paths = Paths(root)
        rec: dict[str, Any] = {"overrides": overrides}
        if not (root / "teacher.done").is_file():
            (root / "data" / "raw").mkdir(parents=True, exist_ok=True)
            for stage in ("data", "teacher"):
                t0 = time.perf_counter()
                run(stage, params, paths)
                rec[f"{stage}_s"] = time.perf_counter() - t0
            (root / "teacher.done").write_text("ok")
        rec["teacher_val"] = json.loads(paths.metrics("teacher").read_text())["val_acc"]
        t0 = time.perf_counter()
        if name.startswith("base"):
            summary, rec["model"] = run("baseline", params, paths), "baseline"
        else:
            if params.student.distillation != "none" and params.student.teacher_mode == "stored":
                store_key = _key(stage_view("soft_labels", params, ROOT / "dvc.yaml").declared())
                key_file = root / "store.key"
                if not key_file.is_file() or key_file.read_text() != store_key:
                    t1 = time.perf_counter()
                    run("soft_labels", params, paths)
                    rec["soft_labels_s"] = time.perf_counter() - t1
                    key_file.write_text(store_key)
            summary, rec["model"] = run("student", params, paths), "student"
        rec.update(train_s=time.perf_counter() - t0, val=summary["val_acc"], epochs=summary["epochs"],
                   steps=summary["steps"], train_loss=summary["train_loss"])
        out["variants"][name] = rec
        print(f"  seed {seed} {name}: {rec['model']} val {rec['val']:.4f} (teacher {rec['teacher_val']:.4f}) "
              f"steps {rec['steps']} {rec['train_s']:.0f} s", flush=True)
    return out


def _worker(raw: dict, variants: list[tuple[str, str]], seed: int, base: Path, threads: int, parent: int) -> dict:
    exit_with_parent(parent)
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    res = run_seed(raw, variants, seed, base)
    res["wall_s"] = time.perf_counter() - t0
    return res


def summarize(runs: list[dict], names: list[str]) -> dict[str, Any]:
    """Mean ± std of each variant's validation top-1 (and the teacher's) over the seeds."""
    per_seed = [{n: r["variants"][n]["val"] for n in names if n in r["variants"]}
                | {"teacher": next(iter(r["variants"].values()))["teacher_val"]} for r in runs]
    return {k: {m: v[m] for m in ("mean", "std", "n", "values")} for k, v in aggregate_runs(per_seed).items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("-B", "--base", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default=None, help="keep the seeds' folders here (default: a folder in /tmp)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("variants", nargs="+", metavar="NAME:K=V;K=V")
    args = ap.parse_args(argv)
    if max(args.seeds) >= HELD_OUT:
        ap.error(f"seeds >= {HELD_OUT} are reserved for the held-out confirmation (bench/distill_gain.py)")
    os.environ.setdefault("DISTILL_PROGRESS", "0")
    raw = apply_overrides(load_raw(args.params), [*args.base, "evaluate.register_model=false"])
    variants = [(v.partition(":")[0], v.partition(":")[2]) for v in args.variants]
    for _, overrides in variants:  # a bad override fails before any work
        parse_params(apply_overrides(raw, [o for o in overrides.split(";") if o]))
    names = [n for n, _ in variants]
    base = Path(args.workdir or f"/tmp/recipe-screen-{os.getpid()}")
    runs: list[dict] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    def dump() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": " ".join(["python", "bench/recipe_screen.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.platform()}, {os.cpu_count()} cores, {args.jobs} jobs x {args.threads} threads",
            "base_overrides": args.base, "variants": dict(variants), "seeds": args.seeds, "started": started,
            "summary": summarize(runs, names), "runs": sorted(runs, key=lambda r: r["seed"])}, indent=1, default=str))

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=ctx) as pool:
        futures = [pool.submit(_worker, raw, variants, s, base, args.threads, os.getpid()) for s in args.seeds]
        for fut in concurrent.futures.as_completed(futures):
            runs.append(fut.result())
            dump()
    print(f"\n{len(runs)} seeds {sorted(r['seed'] for r in runs)}, validation top-1 (%), base {args.base or 'none'}")
    for name, s in summarize(runs, names).items():
        print(f"  {name:>20}: {100 * s['mean']:.2f} ± {100 * s['std']:.2f} (n={s['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
