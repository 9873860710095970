"""Variants of a recipe over several seeds, side by side: screens (validation) and controls (held-out test).

A grid file (``bench/grids/<name>.yaml``, committed before its runs, so that a search cannot move after it is
seen) names a recipe (``bench/recipes/*.yaml``) at one label count, the seeds, the split, and the variants, each a
list of overrides (DVC's ``-S`` syntax). A variant whose name starts with ``base`` trains the labels-only
baseline, one that starts with ``teacher`` only the teacher; any other trains the distilled student.

For every seed the pipeline's own stages run in folders of their own, and what variants agree on is computed once
(:func:`folders`): the teacher once per distinct teacher and labeled-data params (a variant without the unlabeled
set shares it), the prepared data once per distinct data params, the soft-label store once per distinct store
params on top of those. Each model is then scored on the split (top-1, ECE, NLL; a DeiT's two heads too). Reported per
variant: the mean top-1 with its 95 % Student-t interval over seeds, and the paired difference to the grid's
``reference`` variant (the same seeds) with its interval; the teacher of every (data, teacher) group with its ECE.

Resumable: a finished variant (its ``result.json``) or stage (its ``<stage>.done``) is not run again. Seeds follow
``bench/_bench.py``'s policy: ``split: val`` refuses seeds >= 1000, ``split: test`` seeds below.

Usage:
    python bench/variants.py bench/grids/fmnist_L100_student.yaml --jobs 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, check_seeds, machine, run_jobs, run_stages, score, write_json  # noqa: E402

from distill.config import apply_overrides, load_raw, parse_params  # noqa: E402
from distill.evaluation import aggregate_runs, t_interval  # noqa: E402


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def load_grid(path: Path) -> dict[str, Any]:
    grid = yaml.safe_load(path.read_text())
    missing = [k for k in ("recipe", "labels_per_class", "seeds", "split", "variants") if k not in grid]
    if missing:
        raise SystemExit(f"{path}: the grid lacks {', '.join(missing)}")
    if (why := check_seeds(grid["split"], grid["seeds"])) is not None:
        raise SystemExit(f"{path}: {why}")
    return grid


def base_overrides(grid: dict[str, Any]) -> list[str]:
    """The recipe's overrides at the grid's label count, then the grid's own."""
    recipe = yaml.safe_load((ROOT / grid["recipe"]).read_text())
    labels = grid["labels_per_class"]
    return [*recipe["overrides"], *(recipe.get("per_labels") or {}).get(labels, []),
            f"data.max_per_class={labels}", "evaluate.register_model=false", *(grid.get("overrides") or [])]


def role(name: str) -> str:
    return "baseline" if name.startswith("base") else "teacher" if name.startswith("teacher") else "student"


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(target.resolve())


def _teacher_score(group: Path, split: str) -> dict[str, float]:
    """The scores of a group's teacher on ``split``, computed once."""
    cached = group / f"teacher_{split}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    result = score(group, split, models=("teacher",))["teacher"]
    write_json(cached, result)
    return result


def _params(overrides: list[str], seed: int, source: str) -> Any:
    return parse_params(apply_overrides(load_raw(ROOT / "params.yaml"), [*overrides, f"seed={seed}"]), source=source)


def folders(name: str, overrides: list[str], seed: int, base: Path) -> dict[str, Path]:
    """Where one variant's parts live, shared with every variant that agrees on them:

    ``seed<s>/T<teacher>``: the teacher, trained on the labeled images (the data stage runs there without the
    unlabeled split, which the teacher never reads, so variants that differ only in ``data.unlabeled`` share it);
    ``T.../D<data>``: the variant's prepared data; ``D.../S<store>``: its soft-label store; ``D.../V<name>``: its own
    model.
    """
    from distill.stages.runner import stage_view

    params = _params(overrides, seed, f"variant {name}")
    dump = params.model_dump(mode="json")
    labeled = {k: v for k, v in dump["data"].items() if k != "unlabeled"}
    teacher = base / f"seed{seed}" / f"T{_key({'data': labeled, 'teacher': dump['teacher']})}"
    data = teacher / f"D{_key(dump['data'])}"
    store = data / f"S{_key(stage_view('soft_labels', params, ROOT / 'dvc.yaml').declared())}"
    return {"teacher": teacher, "data": data, "store": store, "variant": data / f"V{name}"}


def run_variant(name: str, overrides: list[str], seed: int, base: Path, split: str) -> dict[str, Any]:
    """One variant on one seed, in folders that share the teacher, data and store it agrees on (:func:`folders`)."""
    where = folders(name, overrides, seed, base)
    params = _params(overrides, seed, f"variant {name}")
    params_key = _key(params.model_dump(mode="json"))
    result_file = where["variant"] / "result.json"
    if result_file.is_file():
        done = json.loads(result_file.read_text())
        if done.get("params_key") != params_key:
            raise SystemExit(f"{where['variant']} holds a variant {name!r} made with other params: name this variant "
                             "differently, or use another --workdir")
        return done
    t0 = time.perf_counter()
    times = run_stages(_params([*overrides, "data.unlabeled=false"], seed, f"variant {name}'s teacher"),
                       where["teacher"], ("data", "teacher"))
    teacher = _teacher_score(where["teacher"], split)
    _link(where["teacher"] / "models/teacher.safetensors", where["data"] / "models/teacher.safetensors")
    times.update({f"variant_{k}": v for k, v in run_stages(params, where["data"], ("data",)).items()})
    folder = where["variant"]
    for rel in ("data/prepared", "models/teacher.safetensors"):
        _link(where["data"] / rel, folder / rel)
    if role(name) == "student" and params.student.distillation != "none" and params.student.teacher_mode == "stored":
        for rel in ("data/prepared", "models/teacher.safetensors"):
            _link(where["data"] / rel, where["store"] / rel)
        times.update({f"store_{k}": v for k, v in run_stages(params, where["store"], ("soft_labels",)).items()})
        _link(where["store"] / "soft_labels", folder / "soft_labels")
    if role(name) != "teacher":
        times.update(run_stages(params, folder, (role(name),)))
    own = teacher if role(name) == "teacher" else score(folder, split, models=(role(name),))[role(name)]
    result = {"variant": name, "seed": seed, "model": role(name), **own, "teacher": teacher, "stage_time_s": times,
              "wall_s": time.perf_counter() - t0, "overrides": overrides, "params_key": params_key}
    write_json(result_file, result)
    return result


def run_seed(variants: dict[str, list[str]], seed: int, base: Path, split: str) -> list[dict[str, Any]]:
    """Every variant on one seed, in the grid's order (what they share is computed by the first that needs it)."""
    return [run_variant(n, over, seed, base, split) for n, over in variants.items()]


def summarise(runs: list[dict[str, Any]], names: list[str], reference: str | None) -> dict[str, Any]:
    """Per variant: mean top-1 (and ECE) over seeds with its interval; the paired difference to ``reference``."""
    by = {n: {r["seed"]: r for r in runs if r["variant"] == n} for n in names}
    out: dict[str, Any] = {}
    for name in names:
        seeds = sorted(by[name])
        if not seeds:
            continue
        agg = aggregate_runs([{k: by[name][s][k] for k in ("top1", "ece")} | {"teacher": by[name][s]["teacher"]}
                              for s in seeds])
        row = {"model": by[name][seeds[0]]["model"], "seeds": seeds, **agg}
        if reference and name != reference:
            common = [s for s in seeds if s in by.get(reference, {})]
            if common:
                diffs = [by[name][s]["top1"] - by[reference][s]["top1"] for s in common]
                mean, low, high = t_interval(diffs)
                row[f"minus_{reference}"] = {"mean": mean, "ci95": [low, high], "values": diffs, "n": len(diffs)}
        out[name] = row
    return out


def print_table(summary: dict[str, Any], split: str, reference: str | None) -> None:
    print(f"\n{split} top-1 (%): mean over seeds [95 % CI]" + (f"; paired difference to {reference}" if reference
                                                                 else ""))
    ranked = sorted(summary.items(), key=lambda kv: -kv[1]["top1"]["mean"])
    for name, row in ranked:
        t, line = row["top1"], ""
        if f"minus_{reference}" in row:
            d = row[f"minus_{reference}"]
            line = f"  vs {reference} {100 * d['mean']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"
        print(f"  {name:>24} ({row['model']}): {100 * t['mean']:.2f} [{100 * t['ci95'][0]:.2f}, "
              f"{100 * t['ci95'][1]:.2f}] n={t['n']}  teacher {100 * row['teacher.top1']['mean']:.2f} "
              f"(ECE {100 * row['teacher.ece']['mean']:.1f}){line}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", type=Path)
    ap.add_argument("--jobs", type=int, default=2, help="seeds at once (above 1: Prefect task runs, own processes)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores / jobs)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: bench/work/variants/<grid name>")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results/<grid name>.json")
    args = ap.parse_args(argv)
    grid = load_grid(args.grid)
    name = args.grid.stem
    workdir = args.workdir or ROOT / "bench" / "work" / "variants" / name
    out = args.out or ROOT / "bench" / "results" / f"{name}.json"
    base = base_overrides(grid)
    variants = {n: [*base, *(v or [])] for n, v in grid["variants"].items()}
    for n, over in variants.items():  # a bad override fails before any work
        parse_params(apply_overrides(load_raw(ROOT / "params.yaml"), over), source=f"variant {n}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    reference = grid.get("reference")
    runs: list[dict[str, Any]] = []
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()

    def on_result(job: tuple, results: list[dict[str, Any]]) -> None:
        runs.extend(results)
        for r in results:
            print(f"  seed {r['seed']} {r['variant']}: {r['model']} {grid['split']} {100 * r['top1']:.2f} "
                  f"(teacher {100 * r['teacher']['top1']:.2f}) {r['wall_s']:.0f} s", flush=True)
        write_json(out, {"command": " ".join(["python", "bench/variants.py", str(args.grid), *sys.argv[2:]]),
                         "grid_file": str(args.grid), "grid": grid, "machine": machine(args.jobs, threads),
                         "started": started, "wall_s_this_invocation": time.perf_counter() - t0,
                         "summary": summarise(runs, list(variants), reference),
                         "runs": sorted(runs, key=lambda r: (r["variant"], r["seed"]))})

    run_jobs(run_seed, [(variants, s, workdir, grid["split"]) for s in grid["seeds"]],
             workers=min(args.jobs, len(grid["seeds"])), threads=threads, on_result=on_result)
    print_table(summarise(runs, list(variants), reference), grid["split"], reference)
    print(f"\n{len(runs)} runs in {time.perf_counter() - t0:.0f} s; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
