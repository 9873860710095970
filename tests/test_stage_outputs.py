"""A training stage's outputs: identical training gives identical files, and they are replaced as one set.

In process, on the tiny configuration (seconds): the stages run as ``python -m flows stage`` runs them, through
:func:`distill.stages.runner.run_stage`, into their own project folders.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.config import Paths
from distill.stages.runner import run_stage

from conftest import REPO, tiny_params


def run(stage: str, root: Path, params: Any = None, **kwargs: Any) -> dict[str, Any]:
    return run_stage(stage, params or tiny_params(), Paths(root), dvc_yaml=REPO / "dvc.yaml", **kwargs)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage_files(root: Path, stage: str) -> dict[str, Path]:
    paths = Paths(root)
    return {"checkpoint": paths.model(stage), "metrics": paths.metrics(stage), "curves": paths.curves(stage)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with the prepared data only."""
    root = tmp_path_factory.mktemp("prepared")
    run("data", root)
    return root


@pytest.fixture()
def project(prepared: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "project"
    shutil.copytree(prepared, dst)
    return dst


@pytest.mark.parametrize("stage", ["teacher", "baseline"])
def test_the_same_training_twice_gives_byte_identical_checkpoint_and_curves(prepared, tmp_path, stage):
    """Wall-clock timings live in metrics/<stage>.json only: a checkpoint or curve that embedded them would change
    its md5 on every run, and DVC would rerun everything downstream of identical weights."""
    runs = []
    for name in ("first", "second"):
        root = tmp_path / name
        shutil.copytree(prepared, root)
        torch.manual_seed(hash(name) % 1000)  # another global RNG state: the stage must not depend on it
        runs.append(stage_files(root, stage))
        run(stage, root)
    first, second = runs
    assert sha256(first["checkpoint"]) == sha256(second["checkpoint"])
    assert sha256(first["curves"]) == sha256(second["curves"])
    assert "time" not in first["curves"].read_text().splitlines()[0]  # no timing column in the curves
    import json

    metrics = json.loads(first["metrics"].read_text())
    assert metrics["train_time_s"] > 0 and metrics["train_images_per_sec"] > 0  # the timings are in the metrics


def tracked_runs(root: Path, stages: list[str], params: Any) -> dict[str, Any]:
    """Run ``stages`` in ``root``, each into its own run of a real MLflow store (SQLite); returns the runs."""
    import mlflow

    from distill.tracking import MlflowTracker

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("stages")
    runs = {}
    for stage in stages:
        run_id = client.create_run(experiment, run_name=stage).info.run_id
        tracker = MlflowTracker(run_id, uri=uri, stage=stage)
        run(stage, root, params, tracker=tracker)
        tracker.flush()
        runs[stage] = client.get_run(run_id)
    return runs


def test_mlflow_names_an_image_folder_after_its_folder(tmp_path):
    """Every own dataset was called 'imagefolder' in MLflow's dataset list; the name now says which data it is."""
    from test_data import _make_folder

    _make_folder(tmp_path / "data" / "raw" / "flowers", {".": {"rose": 15, "tulip": 15}})
    params = tiny_params(data={"name": "imagefolder", "root": "data/raw/flowers", "max_per_class": None})
    for stage, logged in tracked_runs(tmp_path, ["data", "teacher"], params).items():
        assert [i.dataset.name for i in logged.inputs.dataset_inputs] == ["flowers"], stage


def test_every_training_run_records_process_count_precision_and_device(prepared, tmp_path):
    """They change the steps and the learning rate (scale_lr) and are in no params.yaml: the run records them."""
    root = tmp_path / "project"
    shutil.copytree(prepared, root)
    from distill.engine import make_accelerator

    device = str(make_accelerator().device)  # this machine's: cpu here, cuda on a GPU
    runs = tracked_runs(root, ["teacher", "soft_labels", "baseline"], tiny_params())
    for stage, logged in runs.items():
        params = logged.data.params
        assert {k: params.get(f"runtime.{k}") for k in ("num_processes", "mixed_precision", "device")} == \
            {"num_processes": "1", "mixed_precision": "no", "device": device}, stage
