"""Where users look in MLflow's UI: the address that opens the pipeline's experiment on its training runs.

MLflow 3.17's UI opens an experiment on GenAI traces (with a "Detect Issues in Your Traces" pop-up) unless its
GenAI / model-training switch, ``workflowType``, says ``machine_learning``; :func:`distill.tracking.runs_url`
names the runs tab and that switch.
"""

from __future__ import annotations

import pytest

from distill.tracking import LOCAL_UI, runs_url


@pytest.mark.parametrize(("uri", "ui"), [
    ("http://mlflow.example:8080", "http://mlflow.example:8080"),
    ("https://mlflow.example/prefix/", "https://mlflow.example/prefix"),  # a server behind a proxy path
    ("sqlite:////work/project/mlflow.db", LOCAL_UI),  # a local store: `mlflow ui`'s default address
    ("file:///work/project/mlruns", LOCAL_UI),
    ("postgresql://user@db/mlflow", LOCAL_UI),
])
def test_runs_url_opens_the_runs_tab_in_model_training_mode(uri: str, ui: str) -> None:
    assert runs_url("7", uri) == f"{ui}/#/experiments/7/runs?workflowType=machine_learning"


def test_runs_url_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    assert runs_url("3") == "http://10.0.0.5:5000/#/experiments/3/runs?workflowType=machine_learning"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert runs_url("3").startswith(f"{LOCAL_UI}/#/experiments/3/runs")
