"""The unlabeled transfer set and mixed views, through the real stages (tiny models, seconds on a CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.config import parse_params
from distill.data import UNLABELED, load_prepared
from distill.soft_labels import SoftLabelStore, SoftLabelStoreError
from distill.stages import Paths, run_baseline, run_data, run_evaluate, run_soft_labels, run_student, run_teacher
from test_reliability import tiny_params


@pytest.fixture(scope="module")
def transfer_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    params = tiny_params(data={"max_per_class": 6, "unlabeled": True},
                         student={"train": {"epochs": 2, "warmup_epochs": 1, "batch_size": 32, "mixup": 0.4}},
                         evaluate={"throughput_iters": 2, "register_model": False})
    for run in (run_data, run_teacher, run_soft_labels, run_student, run_baseline, run_evaluate):
        torch.manual_seed(0)
        run(params, Paths(root))
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
    report = (root / "reports" / "results.md").read_text()
    assert f"Training data: 60 labeled images; the distilled student also learned from {len(data.unlabeled)} " \
           "unlabeled images" in report
    # the baseline got as many optimizer steps as the student: 2 epochs scaled by (60 + unlabeled) / 60
    epochs = round(2 * (60 + len(data.unlabeled)) / 60)
    assert json.loads((root / "metrics" / "baseline.json").read_text())["epochs"] == epochs
    assert f"The baseline trained {epochs} epochs to the student's 2" in report


def test_a_store_without_the_unlabeled_images_is_refused(transfer_project, tmp_path):
    import shutil

    root, params = transfer_project
    project = tmp_path / "p"
    shutil.copytree(root, project)
    plain = params.model_copy(update={"data": params.data.model_copy(update={"unlabeled": False})})
    run_data(plain, Paths(project))  # the data now has no unlabeled split: the old store no longer fits
    with pytest.raises(SoftLabelStoreError, match="num_images: stored"):
        run_student(plain, Paths(project))


@pytest.mark.parametrize("overrides, epochs, warmup", [
    ({}, 350, 12),  # 150 epochs x 1168 / 500 = 350.4; warm-up 5 x 2.336 = 11.7
    ({"baseline": {"budget": "epochs"}}, 150, 5),
    ({"student": {"distillation": "none"}}, 150, 5),  # a labels-only student does not use the unlabeled set
])
def test_baseline_recipe_matches_the_students_steps(overrides, epochs, warmup):
    from distill.stages import baseline_recipe

    raw = {"student": {"distillation": "soft", "train": {"epochs": 150, "warmup_epochs": 5}}}
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    recipe = baseline_recipe(parse_params(raw), 500, 1168)
    assert (recipe.epochs, recipe.warmup_epochs) == (epochs, warmup)
    assert baseline_recipe(parse_params(raw), 500, 500).epochs == 150  # no unlabeled images: nothing to match
