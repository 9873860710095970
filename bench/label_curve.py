"""A label-count curve: teacher, labels-only baseline and distilled student at several labels per class.

For each dataset's recipe (``bench/recipes/curve_<dataset>.yaml``), each number of labels per class and each
seed, the pipeline's own stages run in a folder of their own (data, teacher, soft_labels, student, baseline:
``distill.stages`` by name, the params ``dvc.yaml`` declares for each), from a fixed training pool per class
(``data.pool_per_class``): the labeled images are drawn from the pool (fewer labels are a subset of more), the
rest of the pool is the unlabeled transfer set that only the teacher labels, and at the largest point every pool
image is labeled. Then the three models are scored on the split asked for. The seed changes the pool, the labeled
images, every initialisation and every random draw; on Fashion-MNIST the official test set stays the same.

For every point it reports each model's mean top-1 with the 95 % Student-t interval over seeds, and for the
distillation gain (student minus baseline) and the gap to the teacher (teacher minus student), which are paired per
seed, the mean and the 95 % interval of the paired difference. It writes ``bench/results/label_curve.json`` and
the plot ``docs/figures/label_curve.png`` (top-1 against labels per class, one line per model, interval bands).

Each point is the variants ``base`` and ``student`` of ``bench/variants.py`` in ``--workdir/<split>/<dataset>/L<n>``:
a controls grid at the same recipe, label count and seeds, pointed at that folder, reuses their teacher, store and
models. Resumable: a finished model is not trained again (its ``result.json``), a finished stage neither, and an
interrupted training resumes from its last finished epoch. Seeds follow the
policy of ``bench/_bench.py``: ``--split val`` (for choosing) refuses seeds >= 1000, ``--split test`` (to confirm
a claim, once) refuses seeds below.

Usage:
    python bench/label_curve.py                                    # both recipes, held-out seeds 1000-1004, test
    python bench/label_curve.py --recipes bench/recipes/curve_fashion_mnist.yaml --split val --seeds 100 101
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, check_seeds, gain_and_gap, machine, run_jobs, write_json  # noqa: E402
from variants import run_variant  # noqa: E402

from distill.config import apply_overrides, load_raw, parse_params  # noqa: E402
from distill.evaluation import aggregate_runs  # noqa: E402

RECIPES = [ROOT / "bench" / "recipes" / "curve_fashion_mnist.yaml", ROOT / "bench" / "recipes" / "curve_digits.yaml"]
SCORE_KEYS = ("top1", "ece", "nll", "top1_cls_head", "top1_dist_head")
MODELS = ("teacher", "baseline", "student")
KEYS = ("teacher.top1", "baseline.top1", "student.top1", "distillation_gain", "gap_to_teacher", "teacher.ece",
        "student.top1_cls_head", "student.top1_dist_head")


def load_recipe(path: Path) -> dict[str, Any]:
    """A curve recipe: ``dataset``, ``labels_per_class``, ``overrides`` (every point) and ``per_labels``."""
    recipe = yaml.safe_load(Path(path).read_text())
    missing = [k for k in ("dataset", "labels_per_class", "overrides") if k not in recipe]
    if missing:
        raise SystemExit(f"{path}: the recipe lacks {', '.join(missing)}")
    return recipe


def point_overrides(recipe: dict[str, Any], labels: int) -> list[str]:
    """Every override of one point: the recipe's, the label count's own, the labels (what
    ``variants.base_overrides`` gives a grid at that count). The largest point labels the whole pool, which leaves
    no unlabeled images."""
    over = [*recipe["overrides"], *(recipe.get("per_labels") or {}).get(labels, []), f"data.max_per_class={labels}",
            "evaluate.register_model=false"]
    pool = parse_params(apply_overrides(load_raw(ROOT / "params.yaml"), over)).data.pool_per_class
    if pool is not None and labels >= pool:
        over.append("data.unlabeled=false")
    return over


def run_point(overrides: list[str], workdir: Path, split: str, seed: int) -> dict[str, Any]:
    """One point on one seed: the labels-only baseline and the distilled student, as the variants ``base`` and
    ``student`` of :mod:`variants` (so a controls grid at the same recipe, label count and seeds, run with the same
    folder, shares their teacher, store and models), each resumed where it stopped; then their scores."""
    runs = {name: run_variant(name, overrides, seed, workdir, split) for name in ("base", "student")}
    scores = {"teacher": runs["student"]["teacher"],
              "baseline": {k: v for k, v in runs["base"].items() if k in SCORE_KEYS},
              "student": {k: v for k, v in runs["student"].items() if k in SCORE_KEYS}}
    return {**scores, **gain_and_gap(scores), "wall_s": sum(r["wall_s"] for r in runs.values()),
            "stage_time_s": {f"{n}.{k}": v for n, r in runs.items() for k, v in r["stage_time_s"].items()}}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dataset and label count: each key's mean, std, n, per-seed values and 95 % interval over seeds."""
    out: dict[str, Any] = {}
    for run in runs:
        out.setdefault(run["dataset"], {}).setdefault(str(run["labels_per_class"]), []).append(run["metrics"])
    return {ds: {lab: {k: v for k, v in aggregate_runs(ms).items() if k in KEYS} for lab, ms in by_labels.items()}
            for ds, by_labels in out.items()}


def plot(summary: dict[str, Any], path: Path, split: str) -> None:
    """Top-1 against labels per class, one panel per dataset, one line per model with its 95 % interval band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 4.0), squeeze=False)
    styles = {"teacher": ("CNN teacher", "tab:gray", "s"), "baseline": ("DeiT, labels only", "tab:blue", "o"),
              "student": ("DeiT, distilled", "tab:red", "D")}
    for ax, (dataset, by_labels) in zip(axes[0], summary.items()):
        xs = sorted(by_labels, key=int)
        for model, (label, color, marker) in styles.items():
            stats = [by_labels[x][f"{model}.top1"] for x in xs]
            mean = [100 * s["mean"] for s in stats]
            ax.plot([int(x) for x in xs], mean, marker=marker, color=color, label=label)
            if all(s["n"] > 1 for s in stats):
                ax.errorbar([int(x) for x in xs], mean, yerr=[[m - 100 * s["ci95"][0] for m, s in zip(mean, stats)],
                                                               [100 * s["ci95"][1] - m for m, s in zip(mean, stats)]],
                            fmt="none", ecolor=color, capsize=4)
                ax.fill_between([int(x) for x in xs], [100 * s["ci95"][0] for s in stats],
                                [100 * s["ci95"][1] for s in stats], color=color, alpha=0.18, linewidth=0)
        n = by_labels[xs[0]]["student.top1"]["n"]
        ax.set(xscale="log", xlabel="labeled images per class (rest of the pool unlabeled)",
               ylabel=f"{split} top-1 (%)", title=f"{dataset}: mean of {n} seeds, 95 % intervals")
        ax.set_xticks([int(x) for x in xs], labels=xs)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(v: dict[str, Any], signed: bool = False) -> str:
    """``mean [low, high]`` in points, of a fraction's aggregate."""
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return f"{fmt.format(100 * v['mean'])} [{fmt.format(100 * v['ci95'][0])}, {fmt.format(100 * v['ci95'][1])}]"


def print_table(summary: dict[str, Any]) -> None:
    for dataset, by_labels in summary.items():
        print(f"\n{dataset}: top-1 % (mean over seeds [95 % CI]); gain and gap in points, paired per seed")
        for lab in sorted(by_labels, key=int):
            s = by_labels[lab]

            def cell(key: str, signed: bool = False, s: dict[str, Any] = s) -> str:
                return _cell(s[key], signed)
            print(f"  {int(lab):>5}/class  teacher {cell('teacher.top1')}  baseline {cell('baseline.top1')}  "
                  f"student {cell('student.top1')}  gain {cell('distillation_gain', True)}  "
                  f"gap {cell('gap_to_teacher', True)}  (n={s['student.top1']['n']})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", type=Path, default=RECIPES)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001, 1002, 1003, 1004])
    ap.add_argument("--labels", type=int, nargs="+", default=None, help="only these labels per class")
    ap.add_argument("--split", choices=("val", "test"), default="test")
    ap.add_argument("--jobs", type=int, default=2, help="points at once (above 1: Prefect task runs, own processes)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores / jobs)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work" / "label_curve")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "label_curve.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "figures" / "label_curve.png")
    args = ap.parse_args(argv)
    if (why := check_seeds(args.split, args.seeds)) is not None:
        ap.error(why)
    import os

    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    jobs, recipes = [], {}
    for path in args.recipes:
        recipe = load_recipe(path)
        recipes[recipe["dataset"]] = {"file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
                                      **recipe}
        for labels in recipe["labels_per_class"]:
            if args.labels and labels not in args.labels:
                continue
            for seed in args.seeds:
                workdir = args.workdir / args.split / recipe["dataset"] / f"L{labels}"
                jobs.append((point_overrides(recipe, labels), workdir, args.split, seed))
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")

    def on_result(job: tuple, result: dict[str, Any]) -> None:
        workdir, seed = job[1], job[3]
        dataset, labels = workdir.parts[-2], int(workdir.parts[-1][1:])
        metrics = {k: result[k] for k in (*MODELS, "distillation_gain", "gap_to_teacher")}
        runs.append({"dataset": dataset, "labels_per_class": labels, "seed": seed, "metrics": metrics,
                     "stage_time_s": result["stage_time_s"], "wall_s": result["wall_s"]})
        print(f"{dataset} {labels}/class seed {seed}: teacher {100 * result['teacher']['top1']:.2f} "
              f"baseline {100 * result['baseline']['top1']:.2f} student {100 * result['student']['top1']:.2f} "
              f"gain {100 * result['distillation_gain']:+.2f} ({result['wall_s']:.0f} s)", flush=True)
        write_json(args.out, {
            "command": " ".join(["python", "bench/label_curve.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(args.jobs, threads), "started": started, "split": args.split, "seeds": args.seeds,
            "recipes": recipes, "wall_s_this_invocation": time.perf_counter() - t0,
            "summary": summarise(runs), "runs": sorted(runs, key=lambda r: (r["dataset"], r["labels_per_class"],
                                                                            r["seed"]))})

    run_jobs(run_point, jobs, workers=args.jobs, threads=threads, on_result=on_result)
    summary = summarise(runs)
    print_table(summary)
    plot(summary, args.plot, args.split)
    print(f"\n{len(runs)} points in {time.perf_counter() - t0:.0f} s; {args.out}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
