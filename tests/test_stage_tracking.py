"""What the stages leave in MLflow, against a real SQLite store: the stage's run opened by the product's own
``stage_run``, the stage run in process on a tiny project.

* the evaluate stage logs the servable student into the pipeline's experiment (its *Models* tab), not ``Default``;
* system metrics: off by default, on a stage's run with MLflow's own switch;
* the champion gate: a student that does not beat its own run's baseline is registered, but not ``@champion``;
* a store that cannot be used (a SQLite file another process holds locked, a tracking server on a dead port): one
  short error naming it and what to do, and nothing in it that is untrue where it is raised;
* under plain ``dvc repro`` (slow, real DVC): a stage's run carries the git commit, the stage, the dataset and the
  DVC hashes of its inputs as they are when it runs, as under ``python -m flows pipeline`` (the same ``stage_run``).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch

from distill import tracking
from distill.config import Paths
from distill.io import file_md5
from distill.stages.runner import run_stage
from distill.tracking import TrackingUnavailableError, check_tracking_server, open_experiment, stage_run

from faults import injected
from helpers import REPO, RunCmd, mlflow_client, mlflow_runs, tiny_params

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
    monkeypatch.chdir(root)  # a SQLite store's artifacts go to ./mlruns: the project's, as under DVC
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


def test_a_student_no_better_than_its_baseline_is_not_champion(project: Path,
                                                               capfd: pytest.CaptureFixture[str]) -> None:
    """The "student" is the baseline's own checkpoint: the same accuracy, so no gain."""
    shutil.copy2(project / "models" / "baseline.safetensors", project / "models" / "student.safetensors")
    run_id, result = tracked("evaluate", project, tiny_params(evaluate={"register_model": True}))
    registry = result["registry"]
    assert result["distillation_gain"] == 0.0 and registry["alias"] == "candidate"
    assert registry["champion_version"] is None and "does not beat its own labels-only baseline" in registry["reason"]
    client = client_of(project)
    assert set(client.get_registered_model(registry["name"]).aliases) == {"candidate"}
    tags = client.get_run(run_id).data.tags
    assert (tags["registry.alias"], tags["registry.reason"]) == ("candidate", registry["reason"])
    # What the DVC outputs and the terminal say (the verdict on the baseline is known before the registry).
    gate = json.loads((project / "metrics" / "evaluate.json").read_text())["champion_gate"]
    assert gate == {"passed": False, "reason": registry["reason"]}
    assert "the student will not become `@champion`" in (project / "reports" / "results.md").read_text()
    printed = capfd.readouterr().err
    assert f"version {registry['version']} registered as @candidate, not promoted: {registry['reason']}" in printed
    assert "no version is @champion" in printed


class SlowSteps:
    """A training callback that makes each of the tiny stage's steps last 0.5 s."""

    def on_step_end(self, info: Any) -> None:
        time.sleep(0.5)


def test_system_metrics_are_off_by_default_and_on_with_mlflows_switch(project: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_of(project)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    off, _ = tracked("baseline", project, tiny_params())
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # the tiny stage runs for seconds, not 10 s
    shutil.rmtree(project / ".state", ignore_errors=True)  # train again, not resume the finished run's state
    with injected(SlowSteps()):
        on, _ = tracked("baseline", project, tiny_params())  # 3 s: a few samples
    assert not [k for k in client.get_run(off).data.metrics if k.startswith("system/")]
    logged = client.get_run(on).data.metrics
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/disk_usage_percentage"):
        assert key in logged, sorted(logged)
    assert len(client.get_metric_history(on, "system/cpu_utilization_percentage")) >= 2
    assert client.get_run(on).info.status == "FINISHED"


# --------------------------------------------------------------------------------------- stores that cannot be used
LOCK_HOLDER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute(f"BEGIN {sys.argv[2]}")  # IMMEDIATE: a writer mid-transaction; EXCLUSIVE: readers shut out too
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.slow  # each lock costs MLflow's own SQLite busy timeout, 20 s
def test_a_locked_sqlite_store_is_one_short_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.delenv("DISTILL_PARENT_RUN_ID", raising=False)
    open_experiment(tmp_path)  # the store exists, with its tables and the experiment
    monkeypatch.setattr(tracking, "LOCK_ATTEMPTS", 1)  # one call: MLflow's own 20 s wait, not the retries' minute
    capfd.readouterr()
    # EXCLUSIVE: opening the experiment (a read) fails; IMMEDIATE: it reads, then creating the stage's run fails.
    for lock in ("EXCLUSIVE", "IMMEDIATE"):
        holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(db), lock], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(TrackingUnavailableError) as caught, stage_run("data", project_root=tmp_path):
                pytest.fail("the stage's run opened on a locked store")
        finally:
            holder.kill()
            holder.wait()
        message = str(caught.value)
        assert f"MLflow's SQLite store {db} is locked by another process" in message, (lock, message)
        assert f"fuser {db}" in message and "MLFLOW_TRACKING_URI" in message and "Run again" in message
        # No SQLAlchemy chain: the whole traceback is this module's frames and the one message.
        shown = "".join(traceback.format_exception(caught.value))
        assert "sqlalchemy" not in shown.lower() and len(shown.splitlines()) < 25, shown
        printed = capfd.readouterr().err  # nor MLflow's own log record of the error, with its traceback
        assert "Traceback" not in printed and "sqlalchemy" not in printed.lower(), printed[-3000:]
    # Once the lock is gone, the same store works.
    with stage_run("data", project_root=tmp_path) as tracker:
        tracker.log_metrics({"x": 1.0})


def test_the_experiments_artifacts_go_beside_its_sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not in ``./mlruns`` of whichever process created the experiment (a temporary DVC copy, a test's folder)."""
    store, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.delenv("DISTILL_PARENT_RUN_ID", raising=False)
    with stage_run("data", project_root=store) as tracker:
        tracker.log_dict({"a": 1}, "a.json")
    run = client_of(store).get_run(tracker.run_id)
    assert run.info.artifact_uri.startswith((store / "mlruns" / "distill").as_uri()), run.info.artifact_uri
    assert (store / "mlruns" / "distill" / tracker.run_id / "artifacts" / "a.json").is_file()
    assert not (elsewhere / "mlruns").exists()


def test_a_dead_tracking_server_message_is_true_wherever_it_is_raised() -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as caught:
        check_tracking_server(uri, budget=1.0)
    assert time.monotonic() - t0 < 3
    message = str(caught.value)
    assert f"MLflow tracking server {uri} is unreachable" in message and "MLFLOW_TRACKING_URI" in message
    # Raised at a stage's start, DVC has already deleted the stage's outputs: no claim about the metrics files.
    assert "unaffected" not in message and "metrics" not in message
    assert "Nothing was run and nothing was logged to MLflow by this command." in message


@pytest.mark.slow
def test_plain_dvc_repro_stage_runs_carry_the_tags_with_current_hashes(tiny_project: Path, run_cmd: RunCmd,
                                                                       tmp_path: Path) -> None:
    project = tmp_path / "project"
    run_cmd(["git", "clone", "-q", str(tiny_project), str(project)], tmp_path)
    commit = run_cmd(["git", "rev-parse", "HEAD"], project).stdout.strip()
    run_cmd(["dvc", "repro", "data"], project, timeout=600)
    source = project / "distill" / "stages" / "data.py"
    source.write_text(source.read_text() + "\n# an edit: what makes DVC rerun the stage\n")
    run_cmd(["dvc", "repro", "data"], project, timeout=600)
    runs = sorted(mlflow_runs(mlflow_client(project), "tags.`distill.stage` = 'data'"), key=lambda r: r.info.start_time)
    assert len(runs) == 2, [r.info.run_id for r in runs]
    tags = runs[-1].data.tags
    assert (tags["distill.role"], tags["distill.stage"], tags["git_commit"]) == ("stage", "data", commit)
    assert tags["mlflow.source.git.commit"] == commit and "dvc_exp_name" not in tags  # no DVC experiment: no tag
    hashed = {k[len("dvc_hash."):]: v for k, v in tags.items() if k.startswith("dvc_hash.")}
    assert "distill/stages/data.py" in hashed and "distill/data.py" in hashed, sorted(hashed)
    for path, md5 in hashed.items():  # the inputs as they were when the stage ran, not the previous run's lock
        if (project / path).is_file():
            assert md5 == file_md5(project / path), path
    assert [d.dataset.name for d in runs[-1].inputs.dataset_inputs] == ["digits"]
    parent = mlflow_client(project).get_run(tags["mlflow.parentRunId"])
    assert parent.data.tags["distill.role"] == "pipeline" and parent.data.tags["git_commit"] == commit


def test_a_borrowed_tracking_uri_leaves_the_environment_in_charge(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """After the registry borrows MLflow's process-wide URI (and after a test's ``open_experiment``, through the
    conftest's restore), a later ``MLFLOW_TRACKING_URI`` still decides where MLflow goes. Saving
    ``mlflow.get_tracking_uri()`` and setting it back pinned the process to the old store: CI loaded a model from
    another test's store."""
    first, borrowed, later = (f"sqlite:///{tmp_path / name}/mlflow.db" for name in ("first", "borrowed", "later"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first)
    state = tracking.tracking_uri_state()
    with tracking.using_tracking_uri(borrowed):
        assert mlflow.get_tracking_uri() == borrowed
    assert tracking.tracking_uri_state() == state
    monkeypatch.setenv("MLFLOW_TRACKING_URI", later)
    assert mlflow.get_tracking_uri() == later
    mlflow.set_tracking_uri(borrowed)  # what open_experiment does; the conftest puts the state back after each test
