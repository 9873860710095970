"""The pipeline over several seeds, as a sweep over seeds, summarised as mean ± std on the test split.

Each seed is one variant of a sweep (:mod:`flows.sweep`): one ``dvc exp run --temp -S seed=<n>`` through
:func:`flows.pipeline.pipeline_flow` (an MLflow parent run with its stage children, tagged with the sweep's id),
here (``--jobs`` at a time) or on a work pool (``--pool``). ``--temp`` runs it in a temporary copy, so the
workspace keeps its own params and results; the same command again runs only the seeds that did not finish. The
seed changes the data split, every initialisation and every random draw, so no stage is shared between seeds.
When all seeds are done, their ``metrics/evaluate.json`` are read back from DVC (``dvc exp show``), and
``reports/seeds.md`` / ``reports/seeds.json`` / ``reports/figures/seeds_top1.png`` give every metric as mean ±
sample std with the 95 % confidence interval of the mean (Student's t), the distillation gain (student minus
baseline top-1) and the gap to the teacher first, with their per-seed values: both are paired per seed (same
split, same teacher), so their interval is that of the paired difference.

``python -m flows seeds --confirm`` is the confirmation of a sweep: the best grid point of ``reports/sweep.json``
(ranked on validation) on held-out seeds >= 1000, the one place the test split is reported for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger

from flows.pipeline import experiment_metrics, flow_run_holder
from flows.workspace import workspace_lock

HEADLINE = ("distillation_gain", "gap_to_teacher", "teacher.top1", "baseline.top1", "student.top1",
            "student.top1_cls_head", "student.top1_dist_head", "student.agreement_with_teacher", "student.ece",
            "baseline.ece")


def summarise(per_seed: dict[int, dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Aggregate per-seed evaluate metrics; write ``seeds.json``, ``seeds.md`` and a plot. Returns the summary."""
    from distill.io import atomic_write_json, atomic_write_text
    from distill.plots import plot_seed_summary
    from distill.report import per_seed_lines, seed_table
    from distill.stats import aggregate_runs

    agg = aggregate_runs(list(per_seed.values()))
    keys = [k for k in HEADLINE if k in agg] + sorted(k for k in agg if k not in HEADLINE)
    summary = {k: agg[k] for k in keys}
    atomic_write_json(out_dir / "seeds.json", {"seeds": sorted(per_seed), "summary": summary,
                                               "per_seed": {str(s): m for s, m in per_seed.items()}})
    plot_seed_summary(agg, out_dir / "figures" / "seeds_top1.png", metric="top1",
                      models=["teacher", "baseline", "student"])
    text = (f"# Over {len(per_seed)} seeds ({', '.join(map(str, sorted(per_seed)))})\n\n"
            + seed_table(summary, [k for k in HEADLINE if k in summary]) + "\n\n" + per_seed_lines(summary) + "\n")
    atomic_write_text(out_dir / "seeds.md", text)
    return summary


@flow(name="distill-seeds", log_prints=True, persist_result=False)
def seeds_flow(seeds: Optional[list[int]] = None, overrides: Optional[list[str]] = None, project_root: str = ".",
               prefix: Optional[str] = None, jobs: int = 1, pool: Optional[str] = None) -> dict[str, Any]:
    """Run the whole pipeline once per seed, as a sweep over seeds (:mod:`flows.sweep`), and report mean ± std.

    Args:
        seeds: the seeds (default 0..4).
        overrides: ``key=value`` overrides applied to every seed (e.g. ``student.distillation=soft``).
        project_root: the DVC repository.
        prefix: the sweep's id (default: ``sweep-<hash>`` of the seeds, the overrides, the commit and params.yaml,
            so the same command again runs only the seeds that did not finish).
        jobs: seeds run at once here; pool: a work pool to run them on instead (the variant deployment).

    Returns:
        ``{"experiments": {seed: name}, "summary": {metric: {"mean", "std", "n", "values"}}}``.
    """
    from prefect.artifacts import create_markdown_artifact

    from flows.sweep import make_plan, run_sweep

    logger = get_run_logger()
    root = Path(project_root).resolve()
    seeds = list(seeds if seeds is not None else range(5))
    with workspace_lock(root, flow_run_holder("distill-seeds"), shared=True):  # held already under the CLI
        plan = make_plan(root, [], seeds, list(overrides or []), sweep_id=prefix, targets=())
        done = run_sweep(plan, project_root=str(root), jobs=jobs, pool=pool)["variants"]
        names = {v.seed: done[v.name]["experiment"] for v in plan.variants if v.name in done}
        missing = sorted(set(seeds) - set(names))
        if missing:
            logger.warning("seeds without a finished run, left out of the summary: %s", missing)
        found = experiment_metrics(root, list(names.values()))
        summary = summarise({seed: found[name] for seed, name in names.items()}, root / "reports")
    text = (root / "reports" / "seeds.md").read_text()
    print(text)
    create_markdown_artifact(text, key="distill-seeds", description="Teacher, baseline and student over seeds")
    return {"experiments": names, "summary": summary}


def confirmation(report: Path, seeds: list[int], overrides: list[str]) -> list[str]:
    """The overrides of a confirmation run: the best grid point of the sweep ``report``, then ``overrides``.

    Raises:
        SweepError: a seed below :data:`flows.sweep.CONFIRM_SEEDS` (a sweep's seeds are there: the confirmation
            must be held out), or no report to confirm.
    """
    from flows.sweep import CONFIRM_SEEDS, SweepError, best_overrides

    low = [s for s in seeds if s < CONFIRM_SEEDS]
    if low:
        raise SweepError(f"a confirmation runs on held-out seeds >= {CONFIRM_SEEDS}; got {low} (the sweep chose on "
                         f"seeds below {CONFIRM_SEEDS}): pass e.g. --seeds {CONFIRM_SEEDS}-{CONFIRM_SEEDS + 4}")
    return [*best_overrides(report), *overrides]
