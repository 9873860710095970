"""The README's Prefect section, for real: work pool, ``prefect deploy --all``, a process worker, deployment runs.

It uses the session's ``prefect server start`` and reuses ``built_project`` (conftest.py), where the
pipeline has already run, committed as a user would before deploying: the ``default`` deployment's run is
then a quick no-op, and the ``experiment`` deployment's run with ``overrides=["student.alpha=0.6"]`` reruns
``student`` and ``evaluate`` as a DVC experiment in a temporary copy, on the worker. The workspace stays as
committed, so a second ``default`` run has nothing to do either (before, the experiment's values stayed in
``params.yaml`` and the ``default`` run recorded them).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import PipelineRun, describe, dvc_experiments, mlflow_client, mlflow_runs, stop_process_group

pytestmark = pytest.mark.slow

POOL = "distill-process"
WATCH_TIMEOUT_S = 600


@pytest.fixture
def deployed(built_project: PipelineRun, run_cmd: Any) -> dict[str, str]:
    """The work pool and the deployments of prefect.yaml, registered on the session's server."""
    assert built_project.proc.returncode == 0, describe(built_project.proc)
    env = {"DISTILL_PROJECT_DIR": str(built_project.project)}
    run_cmd(["git", "add", "-A"], built_project.project)
    run_cmd(["git", "commit", "-qm", "the state to deploy", "--allow-empty"], built_project.project)
    run_cmd(["prefect", "work-pool", "create", POOL, "--type", "process"], built_project.project, env=env, timeout=120)
    run_cmd(["prefect", "deploy", "--all", "--no-prompt"], built_project.project, env=env, timeout=300)
    return env


@pytest.fixture
def worker(deployed: dict[str, str], built_project: PipelineRun, sub_env: dict[str, str],
           tmp_path: Path) -> Iterator[Path]:
    """A real ``prefect worker start --pool distill-process``; yields its log file. Always stopped."""
    log = tmp_path / "worker.log"
    env = {**sub_env, **deployed, "PREFECT_WORKER_QUERY_SECONDS": "2"}  # poll often: shorter test
    with open(log, "w") as out:
        proc = subprocess.Popen(["prefect", "worker", "start", "--pool", POOL, "--limit", "1"],
                                cwd=built_project.project, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield log
    finally:
        stop_process_group(proc)


def run_deployment(run_cmd: Any, project: Path, worker_log: Path, name: str, *params: str) -> dict[str, Any]:
    """``prefect deployment run <name> --watch``; returns the flow run as the API reports it (``inspect -o json``)."""
    args = ["prefect", "deployment", "run", name, "--watch", "--watch-timeout", str(WATCH_TIMEOUT_S)]
    for p in params:
        args += ["-p", p]
    proc = run_cmd(args, project, timeout=WATCH_TIMEOUT_S + 60, check=False)
    context = f"{describe(proc)}\n--- worker log ---\n{worker_log.read_text()[-8000:]}"
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout)
    assert match, context
    inspected = run_cmd(["prefect", "flow-run", "inspect", match.group(1), "-o", "json"], project, timeout=120)
    flow_run = json.loads(inspected.stdout)
    assert flow_run["state"]["type"] == "COMPLETED", f"{flow_run['state']}\n{context}"
    assert proc.returncode == 0, context
    return flow_run


def parent_runs_of(project: Path, flow_run: dict[str, Any]) -> list[Any]:
    """The MLflow parent runs (not deleted) that the pipeline flow run opened (tagged with its id)."""
    from mlflow.entities import ViewType

    client = mlflow_client(project)
    experiment = client.get_experiment_by_name("distill")
    return client.search_runs([experiment.experiment_id], f"tags.prefect_flow_run_id = '{flow_run['id']}'",
                              run_view_type=ViewType.ACTIVE_ONLY)


def stage_runs_of(project: Path, flow_run: dict[str, Any]) -> list[Any]:
    """The MLflow child runs under the parent run the pipeline flow run opened."""
    parents = parent_runs_of(project, flow_run)
    assert len(parents) == 1, parents
    assert parents[0].info.status == "FINISHED"
    return mlflow_runs(mlflow_client(project), f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")


def student_alpha_in_lock(project: Path) -> Any:
    import yaml

    return yaml.safe_load((project / "dvc.lock").read_text())["stages"]["student"]["params"]["params.yaml"][
        "student"]["alpha"]


def test_deployments_run_on_a_worker(built_project: PipelineRun, run_cmd: Any, worker: Path) -> None:
    project = built_project.project
    committed = (project / "params.yaml").read_bytes()
    alpha = student_alpha_in_lock(project)
    default = run_deployment(run_cmd, project, worker, "distill-pipeline/default")
    assert default["parameters"]["overrides"] == [] and default["parameters"]["committed"] is True
    assert parent_runs_of(project, default) == []  # an up-to-date project runs no stage: no empty run is left

    experiments_before = dvc_experiments(project, run_cmd)
    experiment = run_deployment(run_cmd, project, worker, "distill-pipeline/experiment",
                                'overrides=["student.alpha=0.6"]')
    assert experiment["parameters"]["overrides"] == ["student.alpha=0.6"]
    new = {name: p for name, p in dvc_experiments(project, run_cmd).items() if name not in experiments_before}
    assert [p["student"]["alpha"] for p in new.values()] == [0.6], new  # the override ran as a DVC experiment
    children = stage_runs_of(project, experiment)
    stages = {r.data.tags["distill.stage"] for r in children}  # the student and what follows it, nothing before
    assert {"student", "evaluate"} <= stages and not stages & {"data", "teacher", "soft_labels", "baseline"}, stages
    assert {r.data.tags["dvc_exp_name"] for r in children} == set(new)
    assert (project / "params.yaml").read_bytes() == committed  # the variant left the workspace as it was

    again = run_deployment(run_cmd, project, worker, "distill-pipeline/default")
    assert parent_runs_of(project, again) == []  # the committed params, still up to date: nothing ran
    assert student_alpha_in_lock(project) == alpha != 0.6
