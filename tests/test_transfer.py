"""The unlabeled transfer set, mixed views and the step-matched baseline, through the real stages (seconds on a CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distill.config import ParamsView, Paths, declared_params
from distill.data import UNLABELED, load_prepared
from distill.engine import steps_per_epoch
from distill.stages.runner import run_stage
from distill.store import SoftLabelStore, SoftLabelStoreError

from helpers import REPO, tiny_params

STAGES = ("data", "teacher", "soft_labels", "student", "baseline", "evaluate")


def run(stage: str, params: Any, root: Path) -> dict[str, Any]:
    return run_stage(stage, params, Paths(root), dvc_yaml=REPO / "dvc.yaml")


@pytest.fixture(scope="module")
def transfer_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    params = tiny_params(data={"max_per_class": 6, "unlabeled": True},
                         student={"train": {"epochs": 2, "warmup_epochs": 1, "batch_size": 32, "mixup": 0.4}})
    for stage in STAGES:
        torch.manual_seed(0)
        run(stage, params, root)
    return root, params


def test_the_store_covers_the_unlabeled_images_and_mixes_views(transfer_project):
    root, _ = transfer_project
    data = load_prepared(root / "data" / "prepared")
    assert len(data.train) == 60 and len(data.unlabeled) > 500 and (data.unlabeled.labels == UNLABELED).all()
    store = SoftLabelStore.open(root / "soft_labels")
    assert store.num_images == len(data.train) + len(data.unlabeled) and store.meta.mixup == 0.4
    # a partner can be an unlabeled image: the teacher labelled the mix all the same
    partner, _ = store.mix(np.arange(store.num_images), np.zeros(store.num_images, dtype=np.int64))
    assert (partner >= len(data.train)).any()
    metrics = json.loads((root / "metrics" / "data.json").read_text())
    assert metrics["num_unlabeled"] == len(data.unlabeled)
    for model in ("student", "baseline"):
        assert np.isfinite(json.loads((root / "metrics" / f"{model}.json").read_text())["train_loss"])


def test_the_baseline_gets_exactly_the_students_steps_and_the_report_says_so(transfer_project):
    root, _ = transfer_project
    data = load_prepared(root / "data" / "prepared")
    student = json.loads((root / "metrics" / "student.json").read_text())
    baseline = json.loads((root / "metrics" / "baseline.json").read_text())
    n_student = len(data.train) + len(data.unlabeled)
    per_epoch = steps_per_epoch(n_student, 32)  # drop_last: floor(n / 32)
    assert student["steps"] == 2 * per_epoch and student["warmup_steps"] == per_epoch
    assert (baseline["steps"], baseline["warmup_steps"]) == (student["steps"], student["warmup_steps"])
    # the same epochs: each of the baseline's draws as many samples from its 60 labeled images as the student's holds
    assert baseline["epochs"] == student["epochs"] == 2
    report = (root / "reports" / "results.md").read_text()
    assert (f"- student: 2 epochs, {student['steps']:,} optimizer steps ({student['warmup_steps']:,} of warm-up) on "
            f"{n_student:,} images (60 labeled, {len(data.unlabeled):,} unlabeled") in report
    assert (f"- baseline: 2 epochs, {baseline['steps']:,} optimizer steps ({baseline['warmup_steps']:,} of warm-up) "
            f"on 60 images, each epoch drawing {n_student:,} samples from them") in report
    assert (f"The baseline's budget is the student's optimizer steps (`baseline.budget: steps`): {baseline['steps']:,} "
            f"and {student['steps']:,}, warm-up {baseline['warmup_steps']:,} and "
            f"{student['warmup_steps']:,}.") in report


@pytest.mark.parametrize("batch, accum", [(64, 1), (50, 3), (30, 2)])  # ragged batches, accumulation
def test_the_baseline_takes_exactly_the_students_steps_whatever_batch_and_accumulation(transfer_project, tmp_path,
                                                                                       batch, accum):
    """Both really train (1 epoch, tiny models): the step counts come from the engine, not from a formula."""
    root, _ = transfer_project
    project = tmp_path / "p"
    shutil.copytree(root, project, ignore=shutil.ignore_patterns(".state"))
    params = tiny_params(data={"max_per_class": 6, "unlabeled": True},
                         student={"train": {"batch_size": batch, "grad_accum": accum, "epochs": 1,
                                            "warmup_epochs": 0, "mixup": 0.4}})  # the fixture's store
    student, baseline = run("student", params, project), run("baseline", params, project)
    assert student["steps"] > 0 and (baseline["steps"], baseline["warmup_steps"]) == (
        student["steps"], student["warmup_steps"])
    data = load_prepared(project / "data" / "prepared")
    n = len(data.train) + len(data.unlabeled)
    assert student["steps"] == steps_per_epoch(n, batch, grad_accum=accum)  # ceil(batches / accum)


def test_the_baseline_of_a_labels_only_student_draws_only_the_labeled_images(transfer_project):
    from distill.stages.baseline import student_epoch

    root, _ = transfer_project
    data = load_prepared(root / "data" / "prepared")
    declared = declared_params("baseline", REPO / "dvc.yaml")
    soft = ParamsView(tiny_params(data={"unlabeled": True}), stage="baseline", declared=declared)
    none = ParamsView(tiny_params(student={"distillation": "none"}), stage="baseline", declared=declared)
    assert student_epoch(soft, data) == len(data.train) + len(data.unlabeled)
    assert student_epoch(none, data) == len(data.train)


def test_a_store_without_the_unlabeled_images_is_refused(transfer_project, tmp_path):
    root, _ = transfer_project
    project = tmp_path / "p"
    shutil.copytree(root, project)
    plain = tiny_params(data={"max_per_class": 6, "unlabeled": False},
                        student={"train": {"epochs": 2, "warmup_epochs": 1, "batch_size": 32, "mixup": 0.4}})
    run("data", plain, project)  # the data now has no unlabeled split: the old store no longer fits
    with pytest.raises(SoftLabelStoreError, match="num_images: stored"):
        run("student", plain, project)
