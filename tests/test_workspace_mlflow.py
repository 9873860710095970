"""What the pipeline command leaves in MLflow and where it points (flows/pipeline.py).

Its closing message gives the address that opens MLflow's UI on the experiment's runs
(``#/experiments/<id>/runs``: MLflow 3.17's UI otherwise opens an experiment on its GenAI traces), and a
pipeline run in which no stage ran leaves no empty parent run behind.
"""

from __future__ import annotations

import sys

import pytest
from mlflow.entities import ViewType

from helpers import copy_project, describe, mlflow_client, mlflow_runs

pytestmark = pytest.mark.slow


def test_a_pipeline_that_runs_nothing_leaves_no_run_and_says_where_the_runs_are(committed_project, run_cmd, tmp_path):
    project = copy_project(committed_project, tmp_path / "project")
    client = mlflow_client(project)
    before = {r.info.run_id for r in mlflow_runs(client)}
    proc = run_cmd([sys.executable, "-m", "flows", "pipeline", "--name", "nothing-to-do"], project, timeout=600)
    out = proc.stdout + proc.stderr
    assert "Running stage 'teacher'" not in out, describe(proc)  # everything was up to date
    experiment = client.get_experiment_by_name("distill")
    left = [r for r in client.search_runs([experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
            if r.info.run_id not in before]
    assert left == [], [(r.info.run_name, r.data.tags.get("distill.role")) for r in left]
    assert f"/#/experiments/{experiment.experiment_id}/runs" in out, describe(proc)
    assert f"mlflow ui --backend-store-uri sqlite:///{project / 'mlflow.db'}" in out, describe(proc)
