"""End to end: your own image folder, a teacher trained elsewhere and a pretrained DeiT file, to a served student.

What docs/own_model.md tells a user to do, done for real in a clone of the tiny project (real DVC, Prefect and
MLflow):

1. the folder: scikit-learn's digits as 16-px grey PNG files in the split layout (``train/<class>/``,
   ``val/<class>/``, ``test/<class>/``) plus ``unlabeled/`` (images without their class, in sub-folders),
   versioned with ``dvc add``;
2. the teacher: timm's ``resnet10t`` (``pretrained=False``), trained here at 32 px with ImageNet's normalisation,
   saved as safetensors in ``models/pretrained/teacher/`` and used as it is (``teacher.train.epochs: 0``,
   ``teacher.mean``/``std``/``input_size``);
3. the student: a timm DeiT file in the official layout (224 px, patch 16, 1000 classes) at ``deit_nano``'s
   width and depth, in ``models/pretrained/student/``; the pipeline resamples it to 16 px and patch 4 and gives
   it new 10-class heads;
4. ``python -m flows pipeline``; then the registered champion through ``mlflow.pyfunc`` and through
   ``mlflow models serve`` on the raw PNG files; last, a new image marks the data stage in ``dvc status``.

The tests share one project and run in file order. Every subprocess runs with one thread: on a busy machine
torch's default threads stall each other (the teacher trained 10 times slower with two threads than with one).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.transforms.v2 import functional as TF

from distill.checkpoint import read_metadata

from helpers import (
    ONE_THREAD,
    VENV_BIN,
    background_server,
    describe,
    free_port,
    gated_alias,
    mlflow_client,
    mlflow_runs,
    set_param,
)

pytestmark = pytest.mark.slow

FOLDER = "data/raw/digits-png"
TEACHER_FILE = "models/pretrained/teacher/resnet10t-digits.safetensors"
STUDENT_FILE = "models/pretrained/student/deit-nano-timm.safetensors"
PER_CLASS = {"train": 20, "val": 10, "test": 20, "unlabeled": 20}  # images of each digit in each folder
SIZE = 16  # the PNG files' side and data.image_size (the student's input)
TEACHER_SIZE = 32  # the teacher's own input size: resnet10t downsamples 32 times
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
STAGES = ("data", "teacher", "soft_labels", "student", "baseline", "evaluate", "export")


@dataclass(frozen=True)
class OwnRun:
    """The project after ``python -m flows pipeline`` ran once on the folder."""

    project: Path
    proc: Any  # the pipeline's CompletedProcess
    pipeline_s: float
    teacher_val_acc: float  # the teacher's accuracy on val/, measured here before the pipeline ran
    test_files: list[tuple[Path, int]]  # (PNG file, its class)
    spare: Path  # a digit written nowhere yet (the last test adds it to the folder)


def write_digits(root: Path) -> tuple[dict[str, list[tuple[Path, int]]], np.ndarray]:
    """Digits as grey PNG files in ``root``'s split layout; returns the files per folder and one spare image."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    files: dict[str, list[tuple[Path, int]]] = {name: [] for name in PER_CLASS}
    images = (digits.images * (255 / 16)).round().astype(np.uint8)  # 8x8, values 0..16 -> 0..255
    upscaled = [np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BILINEAR)) for im in images]
    spare = None
    for digit in range(10):
        order = rng.permutation(np.flatnonzero(digits.target == digit))
        start = 0
        for split, count in PER_CLASS.items():
            for i in order[start:start + count]:
                # unlabeled/: sub-folders that say nothing about the class, as a real dump of images would
                folder = root / split / (f"batch{i % 3}" if split == "unlabeled" else str(digit))
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"digit{i:04d}.png"
                Image.fromarray(upscaled[i], mode="L").save(path)
                files[split].append((path, digit))
            start += count
        if digit == 3:
            spare = upscaled[order[start]]  # a 3 in no folder
    assert spare is not None
    return files, spare


def read_rgb(path: Path) -> np.ndarray:
    """A PNG file as the served model takes it: RGB uint8 ``(H, W, 3)`` (the data stage decodes to RGB)."""
    return np.asarray(Image.open(path).convert("RGB"))


def teacher_inputs(files: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's own preprocessing: resize to 32 px, ImageNet's mean and std."""
    x = torch.from_numpy(np.stack([read_rgb(p) for p, _ in files])).permute(0, 3, 1, 2).float() / 255
    x = TF.resize(x, [TEACHER_SIZE, TEACHER_SIZE], antialias=True)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x, torch.tensor([c for _, c in files])


def train_teacher(train: list[tuple[Path, int]], val: list[tuple[Path, int]], *,
                  epochs: int = 10) -> tuple[nn.Module, float]:
    """A timm resnet10t trained from scratch on ``train`` (the user's teacher, "trained elsewhere").

    Returns:
        The model (eval mode) and its accuracy on ``val``.
    """
    import timm  # only this slow test needs timm: collecting the suite stays fast

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    x, y = teacher_inputs(train)
    x_val, y_val = teacher_inputs(val)
    batch = 32
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * -(-len(x) // batch))
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch):
                idx = order[start:start + batch]
                dy, dx = torch.randint(-2, 3, (2,), generator=gen).tolist()  # shift by up to 2 px
                loss = F.cross_entropy(model(torch.roll(x[idx], (dy, dx), dims=(2, 3))), y[idx], label_smoothing=0.1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    return model, accuracy


def save_student_checkpoint(path: Path) -> None:
    """A timm DeiT file in the layout of the official ``deit_tiny_distilled_patch16_224`` (224 px, patch 16,
    1000 classes, class and distillation tokens), at deit_nano's width, depth and heads (48, 3, 2)."""
    import timm

    torch.manual_seed(1)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, embed_dim=48, depth=3,
                              num_heads=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def own(tiny_project: Path, run_cmd: Any, tmp_path_factory: pytest.TempPathFactory) -> OwnRun:
    """A clone of the tiny project with the folder, the two weights files and the params; the pipeline run once."""
    project = tmp_path_factory.mktemp("own") / "project"
    run_cmd(["git", "clone", "-q", str(tiny_project), str(project)], tiny_project.parent)
    files, spare = write_digits(project / FOLDER)
    spare_path = project.parent / "spare.png"
    Image.fromarray(spare, mode="L").save(spare_path)

    teacher, teacher_val_acc = train_teacher(files["train"], files["val"])
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(project / TEACHER_FILE))
    save_student_checkpoint(project / STUDENT_FILE)

    for key, value in {
        "data.name": "imagefolder", "data.root": FOLDER, "data.image_size": SIZE, "data.max_per_class": None,
        "data.unlabeled": True,
        "teacher.arch": "timm/resnet10t", "teacher.pretrained_path": TEACHER_FILE, "teacher.train.epochs": 0,
        "teacher.mean": IMAGENET_MEAN, "teacher.std": IMAGENET_STD, "teacher.input_size": TEACHER_SIZE,
        "soft_labels.views": 8,
        "student.model.preset": "deit_nano", "student.model.pretrained_path": STUDENT_FILE,
        "student.train.epochs": 60, "student.train.batch_size": 32, "student.train.warmup_epochs": 1,
        "evaluate.register_model": True,
    }.items():
        set_param(project, key, value)
    run_cmd(["dvc", "add", FOLDER, TEACHER_FILE, STUDENT_FILE], project)
    run_cmd(["git", "add", "params.yaml", f"{FOLDER}.dvc", "data/raw/.gitignore", f"{TEACHER_FILE}.dvc",
             "models/pretrained/teacher/.gitignore", f"{STUDENT_FILE}.dvc", "models/pretrained/student/.gitignore"],
            project)
    run_cmd(["git", "commit", "-q", "-m", "digits as PNG files, a timm teacher, a timm DeiT"], project)

    started = time.perf_counter()
    proc = run_cmd([sys.executable, "-m", "flows", "pipeline"], project, timeout=1800, check=False, env=ONE_THREAD)
    seconds = time.perf_counter() - started
    print(f"\npython -m flows pipeline: {seconds:.0f} s", file=sys.stderr)
    return OwnRun(project, proc, seconds, teacher_val_acc, files["test"], spare_path)


@pytest.fixture(scope="module")
def children(own: OwnRun) -> dict[str, Any]:
    """The pipeline's child MLflow run of each stage."""
    client = mlflow_client(own.project)
    (parent,) = [r for r in mlflow_runs(client) if r.data.tags.get("distill.role") == "pipeline"]
    runs = mlflow_runs(client, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["distill.stage"] for r in runs) == sorted(STAGES)
    return {r.data.tags["distill.stage"]: r for r in runs}


def artifact_json(project: Path, run: Any, name: str, tmp_path: Path) -> dict[str, Any]:
    local = mlflow_client(project).download_artifacts(run.info.run_id, name, str(tmp_path))
    return json.loads(Path(local).read_text())


def metrics(project: Path, stage: str) -> dict[str, Any]:
    return json.loads((project / "metrics" / f"{stage}.json").read_text())


def test_the_teacher_trained_here_is_a_real_teacher(own: OwnRun) -> None:
    assert own.teacher_val_acc >= 0.85, own.teacher_val_acc


def test_the_pipeline_prepares_the_folder(own: OwnRun) -> None:
    assert own.proc.returncode == 0, describe(own.proc)
    data = metrics(own.project, "data")
    n = PER_CLASS
    assert {k: data[k] for k in ("num_train", "num_val", "num_test", "num_unlabeled", "num_classes", "image_size")} == {
        "num_train": 10 * n["train"], "num_val": 10 * n["val"], "num_test": 10 * n["test"],
        "num_unlabeled": 10 * n["unlabeled"], "num_classes": 10, "image_size": SIZE}
    meta = json.loads((own.project / "data" / "prepared" / "meta.json").read_text())
    assert meta["name"] == "imagefolder" and meta["class_names"] == [str(d) for d in range(10)]
    assert meta["channels"] == 3  # grey files are decoded to RGB, as torchvision's ImageFolder does
    assert meta["source"] == FOLDER
    assert meta["id_sources"]["unlabeled"] == [["unlabeled", 10 * n["unlabeled"]]]


def test_the_teacher_is_used_as_it_is(own: OwnRun, children: dict[str, Any], tmp_path: Path) -> None:
    summary = metrics(own.project, "teacher")
    assert (summary["epochs"], summary["steps"], summary["train_time_s"]) == (0, 0, 0.0)
    # The stage measured it on val/ through its input adapter (16 px -> 32 px, ImageNet's statistics): the same
    # accuracy as here, within one image (float rounding of the two normalisations).
    assert summary["val_acc"] == pytest.approx(own.teacher_val_acc, abs=1.01 / (10 * PER_CLASS["val"]))
    info = read_metadata(own.project / "models" / "teacher.safetensors")
    assert info["extra"]["used_as_is"] is True
    assert info["config"]["arch"] == "timm/resnet10t"
    assert info["config"]["input"]["mean"] == IMAGENET_MEAN and info["config"]["input"]["size"] == TEACHER_SIZE
    given = load_file(str(own.project / TEACHER_FILE))
    saved = load_file(str(own.project / "models" / "teacher.safetensors"))
    assert sorted(saved) == sorted(f"model.{k}" for k in given)  # the adapter wraps the timm model as `model`
    assert all(torch.equal(saved[f"model.{k}"], v) for k, v in given.items())
    report = artifact_json(own.project, children["teacher"], "pretrained_load.json", tmp_path)
    assert report["mode"] == "as_is" and report["path"].endswith(TEACHER_FILE)
    assert (report["loaded"], report["missing"], report["skipped"]) == (len(given), [], [])


def test_student_and_baseline_start_from_the_deit_file(own: OwnRun, children: dict[str, Any], tmp_path: Path) -> None:
    for stage in ("student", "baseline"):
        report = artifact_json(own.project, children[stage], "pretrained_load.json", tmp_path / stage)
        assert report["source"].endswith(STUDENT_FILE), (stage, report)
        assert report["resampled"] == {"patch_embed.proj.weight": "[48, 3, 16, 16] -> [48, 3, 4, 4]",
                                       "pos_embed": "[1, 198, 48] -> [1, 18, 48]"}, (stage, report)
        assert "head.weight" in report["reinitialised"], (stage, report)  # 1000 classes -> 10
        info = read_metadata(own.project / "models" / f"{stage}.safetensors")
        assert info["extra"]["params"]["student"]["model"]["pretrained_path"] == STUDENT_FILE, stage
        assert (info["config"]["img_size"], info["config"]["patch_size"], info["config"]["embed_dim"]) == (SIZE, 4, 48)
    baseline = artifact_json(own.project, children["baseline"], "pretrained_load.json", tmp_path / "again")
    assert {"dist_token", "pos_embed[:, 1]"} <= set(baseline["dropped"]), baseline  # class token only


@pytest.fixture(scope="module")
def champion_probs(own: OwnRun) -> np.ndarray:
    """The registered student's probabilities for the raw test PNG files, through ``mlflow.pyfunc``: the champion,
    or the candidate when the gate kept the tiny run's student from champion (it did not beat its baseline)."""
    import mlflow.pyfunc

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{own.project / 'mlflow.db'}")
        model = mlflow.pyfunc.load_model(f"models:/deit-student@{gated_alias(own.project)}")
    return model.predict(np.stack([read_rgb(p) for p, _ in own.test_files]))


def test_the_champion_classifies_the_png_files(own: OwnRun, champion_probs: np.ndarray) -> None:
    labels = np.array([c for _, c in own.test_files])
    assert champion_probs.shape == (len(labels), 10) and champion_probs.dtype == np.float32
    assert np.allclose(champion_probs.sum(1), 1, atol=1e-5)
    accuracy = float((champion_probs.argmax(1) == labels).mean())
    print(f"\nchampion on the {len(labels)} test PNG files: {accuracy:.3f}", file=sys.stderr)
    assert accuracy >= 0.5, accuracy  # chance is 0.1
    # The files are the test split the evaluate stage scored: the served preprocessing is the pipeline's own.
    assert accuracy == pytest.approx(metrics(own.project, "evaluate")["student"]["top1"], abs=1e-6)


def test_mlflow_models_serve_answers_with_the_right_class(own: OwnRun, champion_probs: np.ndarray,
                                                          sub_env: dict[str, str], tmp_path: Path) -> None:
    labels = np.array([c for _, c in own.test_files])
    right = np.flatnonzero(champion_probs.argmax(1) == labels)
    chosen = [int(right[labels[right] == d][0]) for d in range(10) if (labels[right] == d).any()][:4]
    assert len(chosen) >= 2, "the champion classifies test images of fewer than two classes correctly"
    images = np.stack([read_rgb(own.test_files[i][0]) for i in chosen])
    port = free_port()
    env = {**sub_env, **ONE_THREAD, "MLFLOW_TRACKING_URI": f"sqlite:///{own.project / 'mlflow.db'}"}
    args = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/deit-student@{gated_alias(own.project)}",
            "--env-manager",
            "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with background_server(args, f"http://127.0.0.1:{port}/ping", env=env, log=tmp_path / "serve.log", timeout=300):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            served = np.asarray(json.loads(resp.read())["predictions"], dtype=np.float32)
    assert served.shape == (len(chosen), 10)
    assert served.argmax(1).tolist() == labels[chosen].tolist()
    np.testing.assert_allclose(served, champion_probs[chosen], rtol=0, atol=1e-6)


def test_a_new_image_marks_the_data_stage(own: OwnRun, run_cmd: Any) -> None:
    assert "changed" not in run_cmd(["dvc", "status"], own.project).stdout
    new = own.project / FOLDER / "train" / "3" / "new-digit.png"
    new.write_bytes(own.spare.read_bytes())
    status = json.loads(run_cmd(["dvc", "status", "--json"], own.project).stdout)
    assert {"changed deps": {FOLDER: "modified"}} in status["data"], status
