"""A training stage's outputs: identical training gives identical files, and they are replaced as one set.

In process, on the tiny configuration (seconds): the stages run as ``python -m flows stage`` runs them, through
:func:`distill.stages.runner.run_stage`, into their own project folders.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import distill.checkpoint
from distill.config import Paths
from distill.io import file_md5
from distill.stages.runner import FINISHED, discard_recorded_states, run_stage
from distill.tracking import NO_TRACKING

from faults import injected
from helpers import REPO, tiny_params


def run(stage: str, root: Path, params: Any = None, tracker: Any = NO_TRACKING) -> dict[str, Any]:
    return run_stage(stage, params or tiny_params(), Paths(root), tracker, dvc_yaml=REPO / "dvc.yaml")


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
    from distill.runtime import make_accelerator

    device = str(make_accelerator().device)  # this machine's: cpu here, cuda on a GPU
    runs = tracked_runs(root, ["teacher", "soft_labels", "baseline"], tiny_params())
    for stage, logged in runs.items():
        params = logged.data.params
        assert {k: params.get(f"runtime.{k}") for k in ("num_processes", "mixed_precision", "device")} == \
            {"num_processes": "1", "mixed_precision": "no", "device": device}, stage


# ------------------------------------------------------------------------------------ outputs as one set
def snapshot(root: Path, stage: str) -> dict[str, tuple[int, int, str]]:
    """Inode, mtime and sha256 of the stage's outputs, and every file in their folders (temporaries included)."""
    files = stage_files(root, stage)
    folders = {p.parent for p in files.values()}
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, sha256(p))
            for folder in folders for p in sorted(folder.iterdir())}


class Steps:
    """A training callback that counts the optimizer steps a run does."""

    def __init__(self) -> None:
        self.done = 0

    def on_step_end(self, info: Any) -> None:
        self.done += 1


def test_a_full_disk_at_the_checkpoint_leaves_all_three_outputs_as_they_were(project, monkeypatch):
    """The disk fills up while the new checkpoint is written (after the new curves were, in the old order): the old
    checkpoint must not end up beside the new plots/<stage>.csv. All three are swapped in as one set, or none is."""
    run("baseline", project)
    before = snapshot(project, "baseline")

    def disk_full(tmp: str, data: bytes) -> None:
        Path(tmp).write_bytes(data[: len(data) // 3])
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    monkeypatch.setattr(distill.checkpoint, "_write_canonical", disk_full)
    params = tiny_params(baseline={"lr": 0.001})  # another training: other outputs would be written
    with pytest.raises(OSError, match="No space left on device"):
        run("baseline", project, params)
    assert snapshot(project, "baseline") == before  # old checkpoint, curves, metrics; no temporary file left


def test_a_finished_training_keeps_its_state_and_a_rerun_writes_the_outputs_without_training(project):
    """The stage's work is safe only once DVC has recorded it: a failure after the outputs (a dead Prefect API, an
    input deleted meanwhile) makes DVC delete them and run the stage again. That rerun must not train again."""
    run("teacher", project)
    outputs = {name: sha256(p) for name, p in stage_files(project, "teacher").items()}
    (marker,) = (project / ".state" / "teacher").glob(f"*/{FINISHED}")
    assert sorted(marker.parent.glob("epoch_*"))  # the last epoch's state is kept, marked finished
    for p in stage_files(project, "teacher").values():
        p.unlink()  # what DVC does before it runs a stage again

    steps = Steps()
    with injected(steps):
        run("teacher", project)
    assert steps.done == 0  # no optimizer step: written from the finished state
    assert {name: sha256(p) for name, p in stage_files(project, "teacher").items()} == outputs

    assert discard_recorded_states(Paths(project)) == [] and marker.exists()  # no dvc.lock records them yet
    lock = {"schema": "2.0", "stages": {"teacher": {"cmd": "python -m flows stage teacher", "outs": [
        {"path": "models/teacher.safetensors", "hash": "md5", "md5": "0" * 32}]}}}
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert discard_recorded_states(Paths(project)) == [] and marker.exists()  # the lock records other outputs
    lock["stages"]["teacher"]["outs"] = [{"path": str(p.relative_to(project)), "hash": "md5", "md5": file_md5(p)}
                                         for p in stage_files(project, "teacher").values()]
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    run("soft_labels", project)  # the next stage process sweeps what DVC has recorded
    assert not marker.parent.exists()
