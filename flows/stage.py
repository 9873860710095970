"""One generic Prefect flow that runs any stage: ``python -m flows stage <name>`` is what ``dvc.yaml`` runs.

The flow runs one task, which validates ``params.yaml``, opens the stage's child MLflow run under the
pipeline's parent run, and calls :func:`distill.stages.runner.run_stage`. A failure fails the flow run (and the
DVC stage). Only a fault that can pass is retried, once, in the same process: the task's retry condition
(:func:`retryable`) turns the retry down for bad input (params, images, files), the library's refusals and
programming errors, which would fail the same way again. The retry resumes training from the state saved at the
last finished epoch.

Inside a pipeline (``python -m flows pipeline``), the pipeline's flow run id comes in the environment
(``DISTILL_PREFECT_PARENT``): the stage's flow run is then created as a subflow of it, through a task run in
the pipeline's run that stands for the stage (what Prefect itself does for a subflow called in-process), so
the Prefect UI shows the stage under its pipeline run (:func:`linked_flow_run`). Each stage flow run is tagged
with its stage and what identifies its pipeline run (:func:`stage_tags`), under DVC alone too.

Logs: the per-epoch lines of the engine go to the flow run's log in the Prefect UI (logger ``distill``,
registered with Prefect as an extra logger), not to the terminal, which shows the stage's progress bar and a
line when it ends.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distill.config import Paths, load_params
from distill.stages.runner import run_stage, stage_view
from distill.tracking import NullTracker, TrackingUnavailableError, log_headline, stage_run
from flows.launch import is_main_process, world_size

__all__ = ["stage_flow", "run_stage_flow", "is_main_process", "run_tracked", "retryable", "COMPLETED", "stage_tags",
           "linked_flow_run"]

PARENT_ENV = "DISTILL_PREFECT_PARENT"  # the pipeline's flow run id, set by flows/pipeline.py

#: Faults that a retry in the same process cannot mend: bad input (ParamsError, BadImageError, CheckpointError,
#: SoftLabelStoreError and LaunchError are ValueErrors; DatasetNotFoundError a FileNotFoundError), a tracking
#: server that is down, and programming errors; and (:func:`retryable`) a loss that a resume would make NaN again.
DETERMINISTIC = (ValueError, LookupError, TypeError, AttributeError, NameError, AssertionError, NotImplementedError,
                 ImportError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                 TrackingUnavailableError)


#: The stages whose work this process finished (outputs written, MLflow run closed), with their results: a
#: bookkeeping failure after that (the Prefect API gone) must not fail them (flows/__main__.py).
COMPLETED: dict[str, dict[str, Any]] = {}


def retryable(err: BaseException) -> bool:
    """True for a fault that can pass (an I/O or network error, a crashed collective, memory), false for the rest."""
    # imported here: torch comes with it, which a stage's process has loaded and a sweep's process never needs
    from distill.engine import NonFiniteLossError

    return isinstance(err, Exception) and not isinstance(err, (*DETERMINISTIC, NonFiniteLossError))


def _can_pass(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect's retry condition (``retry_condition_fn``): retry only a :func:`retryable` exception."""
    err = state.result(raise_on_failure=False)
    return isinstance(err, BaseException) and retryable(err)


def run_tracked(stage: str, *, params_path: str = "params.yaml", project_root: str = ".",
                track: bool = True) -> dict[str, Any]:
    """Validate params, open the MLflow child run (main process only) and run ``stage``."""
    root = Path(project_root).resolve()
    params = load_params(root / params_path)
    paths = Paths(root)
    view = stage_view(stage, params, root / "dvc.yaml")
    if not (track and is_main_process()):
        return run_stage(stage, view, paths, NullTracker())
    with stage_run(stage, project_root=root, params=view.declared()) as tracker:
        tracker.log_artifact(root / params_path, "params")
        result = run_stage(stage, view, paths, tracker)
        COMPLETED[stage] = result
        if stage == "evaluate" and tracker.parent is not None:
            log_headline(tracker.parent, result)
    return result


@task(name="run stage", task_run_name="{stage}", retries=1, retry_delay_seconds=2, retry_condition_fn=_can_pass,
      persist_result=False, cache_policy=NO_CACHE)
def stage_task(stage: str, params_path: str, project_root: str) -> dict[str, Any]:
    """The stage's work, retried once when the fault can pass (:func:`retryable`)."""
    return run_tracked(stage, params_path=params_path, project_root=project_root)


@flow(name="stage", flow_run_name="{stage}", persist_result=False, validate_parameters=True)
def stage_flow(stage: str, params_path: str = "params.yaml", project_root: str = ".") -> dict[str, Any]:
    """Run one pipeline stage (``distill/stages/<stage>.py``) as a Prefect flow run."""
    logger = get_run_logger()
    logger.info("stage %s (params %s, project %s)", stage, params_path, Path(project_root).resolve())
    # In a launched group one rank cannot retry alone: the launcher retries the whole group (flows/launch.py).
    run = stage_task if world_size() == 1 else stage_task.with_options(retries=0)
    result = run(stage, params_path, project_root)
    logger.info("stage %s done: %s", stage, {k: v for k, v in result.items() if isinstance(v, (int, float, str))})
    if stage == "evaluate" and is_main_process():
        try:
            publish_report(Path(project_root))
        except Exception as err:  # noqa: BLE001 - the report is in reports/results.md; the UI's copy is extra
            logger.warning("the result table was not attached to the flow run: %s", err)
    return result


def publish_report(project_root: Path) -> None:
    """Attach the result table to the flow run as a Markdown artifact (Prefect UI: Artifacts)."""
    from prefect.artifacts import create_markdown_artifact

    report = Paths(project_root).reports / "results.md"
    if report.is_file():
        create_markdown_artifact(report.read_text(), key="distill-results",
                                 description="Teacher vs baseline vs distilled student")


def stage_tags(stage: str, project_root: str | Path = ".", environ: Optional[dict[str, str]] = None) -> list[str]:
    """The Prefect tags of a stage's flow run: ``distill``, ``stage:<name>``, and what identifies its pipeline run.

    ``pipeline:<id>``: the pipeline's flow run (its first 8 characters) under ``python -m flows pipeline``, else
    the key that the stages of one plain ``dvc repro`` share (its MLflow parent's ``distill.pipeline_key``);
    ``dvc_exp:<name>`` under ``dvc exp run``.
    """
    from distill.tracking import pipeline_key

    environ = os.environ if environ is None else environ
    parent = environ.get(PARENT_ENV)
    tags = ["distill", f"stage:{stage}", f"pipeline:{parent[:8] if parent else pipeline_key(Path(project_root))[:8]}"]
    if environ.get("DVC_EXP_NAME"):
        tags.append(f"dvc_exp:{environ['DVC_EXP_NAME']}")
    return tags


def linked_flow_run(flow_: Any, *, name: str, parameters: dict[str, Any], parent: str, tags: list[str]) -> Any:
    """A flow run of ``flow_`` created as a subflow of the flow run ``parent``, which runs in another process.

    Prefect has no public way to make a flow run the child of a flow run in another process (PrefectHQ/prefect
    #9527, "Attach a flow to existing parent flow", closed without one). A subflow called in-process is linked
    by a task run in its parent that stands for it; this creates the same, with the client's ``create_task_run``
    (a stand-in task) and ``create_flow_run(parent_task_run_id=...)``. :func:`run_stage_flow` then runs it with
    ``prefect.flow_engine.run_flow(flow, flow_run=...)``, which Prefect's own runners use for a flow run made
    beforehand; no public call does that either. Pinned by tests/test_prefect_api.py (``..._linked_as_a_subflow``
    and the signature test): a Prefect upgrade that breaks either call fails them.
    """
    from uuid import UUID

    from prefect import Task
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        stand_in = Task(name=f"{flow_.name} {name}", fn=lambda: None)
        task_run = client.create_task_run(stand_in, flow_run_id=UUID(parent),
                                          dynamic_key=f"{name}-{os.getpid()}-{time.time_ns()}", name=name,
                                          extra_tags=tags)
        return client.create_flow_run(flow_, name=name, parameters=parameters, tags=tags,
                                      parent_task_run_id=task_run.id)


def run_stage_flow(stage: str, *, params_path: str = "params.yaml", project_root: str = ".") -> None:
    """Run the stage flow, linked to the pipeline's flow run when there is one."""
    from prefect import tags

    parameters = {"stage": stage, "params_path": params_path, "project_root": project_root}
    parent: Optional[str] = os.environ.get(PARENT_ENV)
    if parent:
        from prefect.flow_engine import run_flow

        flow_run = linked_flow_run(stage_flow, name=stage, parameters=parameters, parent=parent,
                                   tags=stage_tags(stage, project_root))
        run_flow(stage_flow, flow_run=flow_run, parameters=parameters)
    else:
        with tags(*stage_tags(stage, project_root)):
            stage_flow(**parameters)
