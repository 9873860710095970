"""The stage flow (flows/stage.py, ``python -m flows stage <name>``): what it retries and what it prints.

Real stage processes on a real ``prefect server start`` (the session's), real MLflow SQLite stores.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import describe, mlflow_client, mlflow_runs, set_param


def test_only_faults_that_can_pass_are_retried() -> None:
    from distill.checkpoint import CheckpointError
    from distill.config import ParamsError
    from distill.data import BadImageError, DatasetNotFoundError
    from distill.engine import NonFiniteLossError
    from distill.tracking import TrackingUnavailableError
    from flows.stage import retryable

    for err in (ParamsError("bad"), BadImageError("bad image"), CheckpointError("corrupt"), KeyError("x"),
                DatasetNotFoundError("missing"), NonFiniteLossError("nan"), TrackingUnavailableError("down"),
                TypeError("bug"), PermissionError(errno.EACCES, "denied")):
        assert not retryable(err), err
    for err in (RuntimeError("a crashed collective"), OSError(errno.EIO, "I/O error"), ConnectionError("reset"),
                MemoryError(), TimeoutError()):
        assert retryable(err), err


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
