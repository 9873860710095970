"""The stage flow (flows/stage.py, ``python -m flows stage <name>``): what it retries, what it prints, its tags,
and a stage whose outputs are complete when the Prefect API dies.

Real stage processes on a real ``prefect server start`` (the session's, or one of the test's own that the test
stops), a real DVC repository, real MLflow SQLite stores.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    background_server,
    copy_project,
    describe,
    free_port,
    mlflow_client,
    mlflow_runs,
    set_param,
    stop_process_group,
)


def test_only_faults_that_can_pass_are_retried() -> None:
    from distill.checkpoint import CheckpointError
    from distill.config import ParamsError
    from distill.data import DatasetNotFoundError
    from distill.engine import NonFiniteLossError
    from distill.prepare import BadImageError
    from distill.tracking import TrackingUnavailableError
    from flows.stage import retryable

    for err in (ParamsError("bad"), BadImageError("bad image"), CheckpointError("corrupt"), KeyError("x"),
                DatasetNotFoundError("missing"), NonFiniteLossError("nan"), TrackingUnavailableError("down"),
                TypeError("bug"), PermissionError(errno.EACCES, "denied")):
        assert not retryable(err), err
    for err in (RuntimeError("a crashed collective"), OSError(errno.EIO, "I/O error"), ConnectionError("reset"),
                MemoryError(), TimeoutError()):
        assert retryable(err), err


def _flow_runs_named(api: str, name: str, since: float) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    return [r for r in runs if r.created and r.created.timestamp() >= since]


def _write_digits(root: Path, classes: int = 3, per_class: int = 8) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    images = np.rint(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    for c in range(classes):
        for k in range(per_class):
            path = root / "train" / f"class{c}" / f"{k:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.kron(images[c + 10 * k], np.ones((2, 2), dtype=np.uint8))).save(path)


@pytest.fixture(scope="module")
def data_project(tiny_project: Path, run_cmd: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("stage-flow") / "project"
    run_cmd(["git", "clone", "-q", str(tiny_project), str(project)], project.parent)
    return project


@pytest.mark.slow
def test_a_stage_run_outside_the_pipeline_is_tagged(data_project, run_cmd, sub_env):
    since = time.time() - 1
    run_cmd([sys.executable, "-m", "flows", "stage", "data"], data_project, timeout=300,
            env={"DVC_EXP_NAME": "tagged"})
    (run,) = _flow_runs_named(sub_env["PREFECT_API_URL"], "data", since)
    assert {"distill", "stage:data", "dvc_exp:tagged"} <= set(run.tags), run.tags
    assert any(t.startswith("pipeline:") for t in run.tags), run.tags


def _data_runs(project: Path) -> int:
    """How many MLflow runs the data stage opened in the project's store."""
    client = mlflow_client(project)
    if client.get_experiment_by_name("distill") is None:
        return 0
    return len(mlflow_runs(client, "tags.`distill.stage` = 'data'"))


@pytest.mark.slow
def test_a_bad_image_is_reported_once_and_not_retried(data_project, run_cmd):
    _write_digits(data_project / "raw")
    bad = data_project / "raw" / "train" / "class1" / "003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    for key, value in {"data.name": "imagefolder", "data.root": "raw", "data.max_per_class": None,
                       "data.unlabeled": False}.items():
        set_param(data_project, key, value)
    runs_before = _data_runs(data_project)
    proc = run_cmd([sys.executable, "-m", "flows", "stage", "data"], data_project, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, describe(proc)
    assert out.count(f"cannot read image {bad}") == 1, out  # once: not retried, not repeated by each layer
    assert "Traceback" not in out, out
    # one attempt: one MLflow run (a retry opens another)
    assert _data_runs(data_project) == runs_before + 1


def _teacher_steps(project: Path) -> int:
    import yaml

    from distill import engine
    from distill.data import load_prepared

    batch = yaml.safe_load((project / "params.yaml").read_text())["teacher"]["train"]["batch_size"]
    return engine.steps_per_epoch(len(load_prepared(project / "data" / "prepared").train), batch)


@pytest.mark.slow
def test_a_stage_whose_outputs_are_complete_survives_the_prefect_api_dying(committed_project, sub_env, fault_plugin,
                                                                           run_cmd, tmp_path):
    """The Prefect server stops while the teacher is at its last step: the stage writes its outputs, warns that
    Prefect could not record the run, and exits 0, so DVC records it (before: a failure, and a rerun from scratch)."""
    project = copy_project(committed_project, tmp_path / "project")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    release, log = tmp_path / "release", tmp_path / "stage.log"
    last = 2 * _teacher_steps(project)
    server_env = {**sub_env, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_UI_ENABLED": "false"}
    with background_server(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                           api + "/health", env=server_env, log=tmp_path / "server.log") as server:
        env = {**sub_env, **fault_plugin, "PREFECT_API_URL": api, "DISTILL_TEST_FAULT": f"teacher:wait@{last}",
               "DISTILL_TEST_FAULT_FILE": str(release)}
        with open(log, "w") as out:
            proc = subprocess.Popen(["dvc", "repro", "-s", "-f", "teacher"], cwd=project, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while not Path(f"{release}.waiting").exists():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-6000:]
                time.sleep(0.2)
            stop_process_group(server)
            release.touch()
            t0 = time.monotonic()
            assert proc.wait(timeout=600) == 0, log.read_text()[-6000:]
            elapsed = time.monotonic() - t0
        finally:
            stop_process_group(proc)
    print(f"\nthe stage's end after the Prefect server stopped: {elapsed:.0f} s")
    assert elapsed < 60, f"a dead Prefect API held the finished stage {elapsed:.0f} s"
    text = log.read_text()
    assert "[teacher] WARNING: the stage's outputs are complete" in text, text[-4000:]
    assert "Updating lock file 'dvc.lock'" in text, text[-4000:]
    assert "up to date" in run_cmd(["dvc", "status", "teacher"], project).stdout  # DVC recorded the stage
