"""The whole pipeline as one Prefect flow, run *through DVC*.

The stage graph is written down once, in ``dvc.yaml``. This flow runs ``dvc exp run`` (in the workspace, or
with ``temp`` in a temporary copy), so DVC alone decides which stages are out of date, and every execution is
a named DVC experiment (``dvc exp show``). Every stage DVC runs is itself a Prefect flow run
(``python -m flows stage <name>``), created as a subflow of this one.

It also opens the MLflow *parent* run of this execution, named after the DVC experiment and carrying the full
resolved params, and hands its id, the tracking URI and this flow's Prefect API to the stage processes through
their environment. DVC's own output (``Running stage ...``) and each stage's progress bar go straight to the
terminal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger
from prefect.runtime import deployment, flow_run

from distill.config import apply_overrides, load_raw, parse_params
from distill.tracking import MlflowTracker, create_pipeline_run, open_experiment, tracking_uri
from flows.stage import PARENT_ENV, publish_report
from flows.workspace import workspace_lock

__all__ = ["pipeline_flow", "StageFailed", "run_dvc", "experiment_name", "flow_run_holder"]


class StageFailed(RuntimeError):
    """A DVC command run by the pipeline exited non-zero."""


def experiment_name() -> str:
    """A new DVC experiment name: ``run-<date>-<time>``."""
    return time.strftime("run-%Y%m%d-%H%M%S")


def run_dvc(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> None:
    """Run a DVC command on this terminal; if this process is stopped, DVC is interrupted first (it cleans up).

    DVC runs in a process group of its own, with the stage it starts. Stopping this process (Ctrl-C, SIGTERM,
    SIGHUP) sends SIGINT to that whole group, as Ctrl-C in a terminal does: DVC ignores SIGINT while a stage
    runs and relies on the stage receiving it too, then records the failure and releases its lock.

    Raises:
        StageFailed: the command exited non-zero.
    """
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, **group)
    try:
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # this process is being stopped: interrupt DVC and its stage as Ctrl-C would
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
    if rc != 0:
        raise StageFailed(f"`{' '.join(cmd)}` exited with status {rc}; the failing stage's error is above")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def flow_run_holder(what: str) -> str:
    """How a flow run of ``what`` names itself as the workspace lock's holder (a deployment's run has no CLI)."""
    name = f"Prefect flow run {flow_run.name or flow_run.id} of {what}"
    return f"{name} (deployment {deployment.name})" if deployment.name else name


def _api_url() -> Optional[str]:
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@flow(name="distill-pipeline", log_prints=True, persist_result=False)
def pipeline_flow(overrides: Optional[list[str]] = None, project_root: str = ".", exp_name: Optional[str] = None,
                  force: bool = False, temp: bool = False) -> dict[str, Any]:
    """Run the pipeline as a DVC experiment, with ``key=value`` overrides (DVC's ``-S``).

    Args:
        overrides: e.g. ``["student.alpha=0.7"]``; validated before anything runs.
        project_root: the DVC repository.
        exp_name: the DVC experiment's name, also the MLflow parent run's (default: a new ``run-<time>``).
        force: rerun every stage.
        temp: run in a temporary copy of the workspace (``dvc exp run --temp``), leaving the workspace as it is.

    Returns:
        ``{"experiment", "mlflow_parent_run_id"}`` and, in the workspace, ``"evaluate"``: the evaluate metrics.
    """
    root = Path(project_root).resolve()
    with workspace_lock(root, flow_run_holder("distill-pipeline")):  # held already when the CLI started this
        return _pipeline(root, list(overrides or []), exp_name=exp_name, force=force, temp=temp)


def _pipeline(root: Path, overrides: list[str], *, exp_name: Optional[str], force: bool,
              temp: bool) -> dict[str, Any]:
    logger = get_run_logger()
    resolved = apply_overrides(load_raw(root / "params.yaml"), overrides)
    parse_params(resolved, source="params.yaml with the overrides")  # bad overrides fail before any work
    name = exp_name or experiment_name()
    client, experiment_id = open_experiment(root)
    parent = create_pipeline_run(client, experiment_id, root, run_name=name, params=resolved,
                                 tags={"dvc_exp_name": name, "overrides": " ".join(overrides),
                                       "prefect_flow_run_id": str(flow_run.id or "")})
    env = {**os.environ, "DISTILL_PARENT_RUN_ID": parent,
           "MLFLOW_TRACKING_URI": tracking_uri(root)}  # the repository's store, also from a temporary copy
    api = _api_url()
    if api:
        env["PREFECT_API_URL"] = api
    if flow_run.id:
        env[PARENT_ENV] = str(flow_run.id)
    cmd = (["dvc", "exp", "run", "--name", name] + (["--temp"] if temp else [])
           + [a for o in overrides for a in ("-S", o)] + (["-f"] if force else []))
    logger.info("DVC experiment %s: %s (MLflow parent run %s)", name, " ".join(cmd), parent)
    parent_run = MlflowTracker(parent, uri=tracking_uri(root))  # an outage must not fail finished stages
    status = "FAILED"
    try:
        run_dvc(cmd, cwd=root, env=env)
        status = "FINISHED"
    finally:
        parent_run.terminate(status)
    result: dict[str, Any] = {"experiment": name, "mlflow_parent_run_id": parent}
    metrics_file = root / "metrics" / "evaluate.json"
    if not temp and metrics_file.is_file():
        result["evaluate"] = json.loads(metrics_file.read_text())
        report = root / "reports" / "results.md"
        if report.is_file():
            print(report.read_text())
            publish_report(root)
    return result
