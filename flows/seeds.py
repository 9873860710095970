"""The pipeline over several seeds, as DVC experiments, summarised as mean ± std.

Each seed is one ``dvc exp run --temp -S seed=<n>`` (through :func:`flows.pipeline.pipeline_flow`, so it is
also an MLflow parent run with its stage children). ``--temp`` runs it in a temporary copy, so the workspace
keeps its own params and results. The seed changes the data split, every initialisation and every random
draw. When all seeds are done, their ``metrics/evaluate.json`` are read back from DVC (``dvc exp show``),
and ``reports/seeds.md`` / ``reports/seeds.json`` / ``reports/figures/seeds_top1.png`` give every metric as
mean ± sample std with the 95 % confidence interval of the mean (Student's t), the distillation gain (student
minus baseline top-1) and the gap to the teacher first, with their per-seed values: both are paired per seed
(same split, same teacher), so their interval is that of the paired difference.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger

from flows.pipeline import experiment_metrics, flow_run_holder, pipeline_flow
from flows.workspace import workspace_lock

HEADLINE = ("distillation_gain", "gap_to_teacher", "teacher.top1", "baseline.top1", "student.top1",
            "student.top1_cls_head", "student.top1_dist_head", "student.agreement_with_teacher", "student.ece",
            "baseline.ece")


def summarise(per_seed: dict[int, dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """Aggregate per-seed evaluate metrics; write ``seeds.json``, ``seeds.md`` and a plot. Returns the summary."""
    from distill.evaluation import aggregate_runs
    from distill.io import atomic_write_json, atomic_write_text
    from distill.plots import plot_seed_summary
    from distill.report import per_seed_lines, seed_table

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
               prefix: Optional[str] = None) -> dict[str, Any]:
    """Run the pipeline once per seed as DVC experiments and report mean ± std.

    Args:
        seeds: the seeds (default 0..4).
        overrides: ``key=value`` overrides applied to every seed (e.g. ``student.distillation=soft``).
        project_root: the DVC repository.
        prefix: experiment-name prefix (default ``seeds-<timestamp>``); experiments are ``<prefix>-s<seed>``.

    Returns:
        ``{"experiments": {seed: name}, "summary": {metric: {"mean", "std", "n", "values"}}}``.
    """
    from prefect.artifacts import create_markdown_artifact

    logger = get_run_logger()
    root = Path(project_root).resolve()
    seeds = list(seeds if seeds is not None else range(5))
    prefix = prefix or time.strftime("seeds-%Y%m%d-%H%M%S")
    names = {seed: f"{prefix}-s{seed}" for seed in seeds}
    with workspace_lock(root, flow_run_holder("distill-seeds")):  # held already when the CLI started this
        for seed, name in names.items():
            logger.info("seed %s: experiment %s", seed, name)
            pipeline_flow(overrides=[*(overrides or []), f"seed={seed}"], project_root=str(root), exp_name=name,
                          temp=True)
        found = experiment_metrics(root, list(names.values()))
        summary = summarise({seed: found[name] for seed, name in names.items()}, root / "reports")
    text = (root / "reports" / "seeds.md").read_text()
    print(text)
    create_markdown_artifact(text, key="distill-seeds", description="Teacher, baseline and student over seeds")
    return {"experiments": names, "summary": summary}
