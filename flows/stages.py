"""One Prefect flow per pipeline stage.

Each flow loads and validates ``params.yaml``, opens the stage's child MLflow run, and calls the
stage function from :mod:`distill.stages`. A failure fails the flow run (and the DVC stage). Stage
flows retry once; the retry resumes training from the state saved at the last finished epoch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from distill.config import Paths, load_params
from distill.tracking import NullTracker, stage_run

# distill.stages (torch) is imported where a stage runs, not here: the pipeline flow's process, which
# only runs `dvc repro`, never needs torch.


def is_main_process() -> bool:
    """True unless this is a non-zero rank started by ``accelerate launch`` / torchrun."""
    return os.environ.get("RANK", "0") == "0"


def run_stage(stage: str, *, params_path: str = "params.yaml", project_root: str = ".", track: bool = True) -> dict[str, Any]:
    """Validate params, open the MLflow child run (main process only) and run ``stage``."""
    from distill import stages as S

    root = Path(project_root).resolve()
    params = load_params(root / params_path if not Path(params_path).is_absolute() else params_path)
    paths = Paths(root)
    runner = getattr(S, f"run_{stage}")
    if not (track and is_main_process()):
        return runner(params, paths, NullTracker())
    with stage_run(stage, project_root=root, params=S.stage_params(params, stage)) as tracker:
        tracker.log_artifact(root / params_path, "params")
        result = runner(params, paths, tracker)
    return result


def publish_report(project_root: Path) -> None:
    """Print the result table into the flow run's log and attach it to the flow run as a Markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    report = Paths(project_root).reports / "results.md"
    if report.is_file() and is_main_process():
        text = report.read_text()
        print(text)
        create_markdown_artifact(text, key="distill-results", description="Teacher vs baseline vs distilled student")


def _make_flow(stage: str) -> Any:
    @flow(name=f"stage-{stage.replace('_', '-')}", retries=1, retry_delay_seconds=2, log_prints=True,
          persist_result=False, validate_parameters=True)
    def _stage_flow(params_path: str = "params.yaml", project_root: str = ".") -> dict[str, Any]:
        logger = get_run_logger()
        logger.info("running stage %s (params %s, root %s)", stage, params_path, Path(project_root).resolve())
        result = run_stage(stage, params_path=params_path, project_root=project_root)
        logger.info("stage %s done: %s", stage, {k: v for k, v in result.items() if isinstance(v, (int, float, str))})
        if stage == "evaluate":
            publish_report(Path(project_root))
        return result

    _stage_flow.__name__ = f"{stage}_flow"
    return _stage_flow


data_flow = _make_flow("data")
teacher_flow = _make_flow("teacher")
soft_labels_flow = _make_flow("soft_labels")
student_flow = _make_flow("student")
baseline_flow = _make_flow("baseline")
evaluate_flow = _make_flow("evaluate")

STAGE_FLOWS = {"data": data_flow, "teacher": teacher_flow, "soft_labels": soft_labels_flow, "student": student_flow,
               "baseline": baseline_flow, "evaluate": evaluate_flow}
