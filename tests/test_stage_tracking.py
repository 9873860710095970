"""What the stages leave in MLflow, against a real SQLite store: the stage's run opened by the product's own
``stage_run``, the stage run in process on a tiny project.

* the evaluate stage logs the servable student into the pipeline's experiment (its *Models* tab), not ``Default``;
* system metrics: off by default, on a stage's run with MLflow's own switch;
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch

from distill.config import Paths
from distill.stages.runner import run_stage
from distill.tracking import stage_run

from conftest import REPO, tiny_params

TRAINING = ("data", "teacher", "soft_labels", "student", "baseline")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every stage before evaluate, run once with the tiny params, untracked."""
    root = tmp_path_factory.mktemp("trained")
    params = tiny_params()
    for stage in TRAINING:
        torch.manual_seed(0)
        run_stage(stage, params, Paths(root), dvc_yaml=REPO / "dvc.yaml")
    return root


@pytest.fixture()
def project(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the trained project with its own MLflow store (``MLFLOW_TRACKING_URI``), no parent given."""
    root = tmp_path / "project"
    shutil.copytree(trained, root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.delenv("DISTILL_PARENT_RUN_ID", raising=False)
    return root


def tracked(stage: str, root: Path, params: Any) -> tuple[str, dict[str, Any]]:
    """Run ``stage`` inside its MLflow run, as ``python -m flows stage`` does; returns the run id and the summary."""
    with stage_run(stage, project_root=root) as tracker:
        result = run_stage(stage, params, Paths(root), tracker, dvc_yaml=REPO / "dvc.yaml")
    return tracker.run_id, result


def client_of(root: Path) -> mlflow.MlflowClient:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_evaluate_logs_the_student_into_the_pipelines_experiment(project: Path) -> None:
    run_id, result = tracked("evaluate", project, tiny_params(evaluate={"register_model": True}))
    client = client_of(project)
    experiment = client.get_experiment_by_name("distill")
    models = list(client.search_logged_models([experiment.experiment_id]))
    assert [(m.name, m.source_run_id, m.status) for m in models] == [("student", run_id, "READY")]
    assert list(client.search_logged_models(["0"])) == []  # nothing in `Default`
    version = client.get_model_version(result["registry"]["name"], result["registry"]["version"])
    assert version.source == f"models:/{models[0].model_id}"


def test_system_metrics_are_off_by_default_and_on_with_mlflows_switch(project: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_of(project)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    off, _ = tracked("baseline", project, tiny_params())
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # the tiny stage runs for seconds, not 10 s
    on, _ = tracked("baseline", project, tiny_params())
    assert not [k for k in client.get_run(off).data.metrics if k.startswith("system/")]
    logged = client.get_run(on).data.metrics
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/disk_usage_percentage"):
        assert key in logged, sorted(logged)
    assert len(client.get_metric_history(on, "system/cpu_utilization_percentage")) >= 2
    assert client.get_run(on).info.status == "FINISHED"
