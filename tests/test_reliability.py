"""Reliability, in process: bad input fails clearly before it destroys anything; faults keep what was done.

Every test does the fault for real (truncates the file, deletes it, makes the loss NaN, points at a
closed port) and checks that no earlier output changed: not its bytes, not its inode, not its mtime.
The slow, multi-process half (SIGKILL, ``dvc repro``, Prefect retries, a real ``mlflow server``, two
pipelines at once) is ``tests/test_reliability_e2e.py``; the fault matrix is ``docs/reliability.md``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from distill.checkpoint import CheckpointError, save_model
from distill.config import Paths
from distill.data import DatasetNotFoundError
from distill.engine import NonFiniteLossError
from distill.stages._training import build_seeded
from distill.stages.runner import run_stage
from distill.store import SoftLabelStoreError
from distill.teachers import build_teacher
from distill.tracking import MlflowTracker, TrackingUnavailableError, _retry_locked, check_tracking_server, tracking_uri
from distill.weights import load_weights_file

from faults import injected
from helpers import REPO, tiny_params


def run(stage: str, params: Any, root: Path) -> dict[str, Any]:
    """One stage, in process, with the parameters dvc.yaml declares for it."""
    return run_stage(stage, params, Paths(root), dvc_yaml=REPO / "dvc.yaml")


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every file under ``root``: inode, mtime, size and sha256 (a rewrite with equal bytes still shows)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_mtime_ns, st.st_size,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data -> teacher -> soft_labels -> student, run once with the tiny params (global RNG seeded)."""
    root = tmp_path_factory.mktemp("built")
    params = tiny_params()
    for stage in ("data", "teacher", "soft_labels", "student"):
        torch.manual_seed(0)
        run(stage, params, root)
    return root


@pytest.fixture()
def project(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built project, to break (without the finished resume states its stages kept, as once
    DVC has recorded their outputs)."""
    dst = tmp_path / "project"
    shutil.copytree(built, dst, ignore=shutil.ignore_patterns(".state"))
    return dst


# ------------------------------------------------------------------------------------------ params
@pytest.mark.parametrize("argv, change, key", [
    (["stage", "student", "--no-prefect"], {"student": {"alpah": 0.3}}, "student.alpah: unknown key"),
    (["stage", "teacher", "--no-prefect"], {"teacher": {"train": {"epochs": "many"}}}, "teacher.train.epochs"),
    (["stage", "student", "--no-prefect"], {"student": {"alpha": 1.5}}, "student.alpha = 1.5"),
    (["stage", "baseline", "--no-prefect"], {"baseline": {"lr": None, "weight_decay": None, "budget": "no"}},
     "baseline.budget = 'no'"),
    (["pipeline", "-S", "student.tua=2"], {}, "student.tua: unknown key"),
    (["pipeline", "-S", "soft_labels.views=0"], {}, "soft_labels.views = 0"),
])
def test_bad_params_name_the_key_before_any_work(project, monkeypatch, capsys, argv, change, key):
    from distill.config import merge
    from flows.__main__ import main

    from helpers import project_raw

    (project / "params.yaml").write_text(yaml.safe_dump(merge(project_raw(), change)))
    before = snapshot(project)
    monkeypatch.chdir(project)
    assert main(argv) == 2
    assert key in capsys.readouterr().err
    assert snapshot(project) == before


def test_patch_size_that_does_not_divide_image_size(project):
    before = snapshot(project)
    params = tiny_params(student={"model": {"preset": "deit_nano", "patch_size": 5}})
    for stage in ("student", "baseline"):
        with pytest.raises(ValueError, match=r"student\.model: image size 16 is not divisible by patch size 5"):
            run(stage, params, project)
    assert snapshot(project) == before


# ------------------------------------------------------------------------------------------ inputs
def test_teacher_with_other_number_of_classes(project):
    teacher = build_teacher("resnet_small", num_classes=5, in_chans=1, width=4, blocks=1)
    save_model(Paths(project).model("teacher"), teacher, kind="teacher",
               config={"arch": "resnet_small", "num_classes": 5, "in_chans": 1, "width": 4, "blocks": 1})
    before = snapshot(project)
    with pytest.raises(ValueError, match=r"teacher\.safetensors has 5 classes but dataset 'digits' has 10: retrain"):
        run("soft_labels", tiny_params(), project)
    with pytest.raises(ValueError, match=r"has 5 classes but dataset 'digits' has 10"):
        run("student", tiny_params(student={"teacher_mode": "online"}), project)
    assert snapshot(project) == before


def test_missing_prepared_dataset_file(project):
    (project / "data" / "prepared" / "train_labels.npy").unlink()
    before = snapshot(project)
    with pytest.raises(DatasetNotFoundError, match=r"train_labels\.npy.*rerun the data stage: `dvc repro -f data`"):
        run("teacher", tiny_params(), project)
    assert snapshot(project) == before


def test_missing_source_dataset(project, tmp_path):
    before = snapshot(project)
    params = tiny_params(data={"name": "imagefolder", "root": str(tmp_path / "nowhere")})
    with pytest.raises(DatasetNotFoundError, match=r"nowhere does not exist; set data\.root"):
        run("data", params, project)
    assert snapshot(project) == before


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_teacher_checkpoint(project, damage):
    ckpt = Paths(project).model("teacher")
    data = ckpt.read_bytes()
    ckpt.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    before = snapshot(project)
    refused = rf"{re.escape(str(ckpt))}.*(corrupt or truncated|not a distill checkpoint)"
    with pytest.raises(CheckpointError, match=refused):
        run("soft_labels", tiny_params(), project)
    assert snapshot(project) == before


def flip_a_byte_inside_a_tensor(path: Path) -> None:
    """Damage a safetensors file where its format cannot notice: one byte in the middle of the tensor data."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # the data follows the 8-byte length and the JSON header
    data[(start + len(data)) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_inside_the_teacher_weights_is_refused_naming_the_file(project):
    """safetensors has no checksum: without the recorded sha256 the store would be built from a damaged teacher."""
    ckpt = Paths(project).model("teacher")
    flip_a_byte_inside_a_tensor(ckpt)
    before = snapshot(project)
    refused = rf"checkpoint {re.escape(str(ckpt))} is corrupt: its weights do not match the sha256.*repro -f teacher"
    with pytest.raises(CheckpointError, match=refused):
        run("soft_labels", tiny_params(), project)
    with pytest.raises(CheckpointError, match=refused):
        run("student", tiny_params(student={"teacher_mode": "online"}), project)
    assert snapshot(project) == before


def test_truncated_soft_label_store(project):
    logits = sorted((project / "soft_labels").rglob("*logits*.npy"))[0]
    logits.write_bytes(logits.read_bytes()[:-100])
    before = snapshot(project)
    with pytest.raises(SoftLabelStoreError, match=rf"file {logits.name} has \d+ bytes.*truncated"):
        run("student", tiny_params(), project)
    assert snapshot(project) == before


def test_pickle_payload_in_teacher_weights_is_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "weights.pt"
    torch.save({"fc.weight": Payload()}, evil)  # what a hostile "state dict" file looks like
    with pytest.raises(ValueError, match=rf"cannot read weights from {re.escape(str(evil))}"):
        load_weights_file(evil)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ NaN / resume
class PoisonWeights:
    """A training callback that writes NaN into the model's weights once ``at`` optimizer steps are done."""

    def __init__(self, at: int) -> None:
        self.at, self.fired = at, False

    def on_step_end(self, info: Any) -> None:
        if not self.fired and info.global_step == self.at:
            self.fired = True
            with torch.no_grad():
                for p in info.model.parameters():
                    p.fill_(float("nan"))


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good_state(project, built, caplog):
    from safetensors.torch import load_file

    from distill.data import load_prepared
    from distill.engine import steps_per_epoch

    before = snapshot(project)
    per_epoch = steps_per_epoch(len(load_prepared(Paths(project).data).train), 32)
    torch.manual_seed(0)
    with pytest.raises(NonFiniteLossError, match=r"at epoch 2, step 2; training stopped\. The last good training "
                                                 r"state \(end of epoch 1\) is kept in .*epoch_00000"):
        with injected(PoisonWeights(per_epoch + 1)):
            run("teacher", tiny_params(), project)
    assert snapshot(project).items() >= before.items()  # nothing rewritten; only the resume state is new
    (state,) = (project / ".state" / "teacher").glob("*/epoch_00000")

    torch.manual_seed(1)  # another global RNG state: the result must come from the saved state, not from it
    with caplog.at_level("INFO"):
        run("teacher", tiny_params(), project)
    assert f"resuming from {state}" in caplog.text
    assert not state.exists()  # the finished stage drops its resume state
    resumed, reference = load_file(Paths(project).model("teacher")), load_file(Paths(built).model("teacher"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_a_code_change_does_not_resume_state_the_old_code_made(project, monkeypatch):
    """The resume key fingerprints the library's code, the process count and the precision."""
    from distill.stages import _training

    class Interrupt:
        def on_step_end(self, info: Any) -> None:
            if info.global_step == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), injected(Interrupt()):
        run("teacher", tiny_params(), project)
    (first,) = (project / ".state" / "teacher").iterdir()
    monkeypatch.setattr(_training, "code_fingerprint", lambda: "another version of the code")
    with pytest.raises(KeyboardInterrupt), injected(Interrupt()):
        run("teacher", tiny_params(), project)
    assert len(list((project / ".state" / "teacher").iterdir())) == 2  # a new key: started fresh, not resumed
    assert first.exists()


# ---------------------------------------------------------------------------------------- tracking
def _closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_tracking_server_fails_fast_naming_it():
    uri = _closed_port_uri()
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=rf"MLflow tracking server {uri} is unreachable"):
        check_tracking_server(uri, budget=2.0)
    assert time.monotonic() - t0 < 4


def test_tracker_warns_once_and_goes_offline_when_server_is_gone(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = _closed_port_uri()
    tracker = MlflowTracker("0123456789abcdef", uri=uri, stage="student")
    tracker.log_metrics({"val_acc": 0.5}, step=1)
    tracker.flush()  # the first call finds the server gone
    t0 = time.monotonic()
    tracker.log_metrics({"val_acc": 0.6}, step=2)
    tracker.terminate("FINISHED")
    assert time.monotonic() - t0 < 0.1 and tracker.offline
    err = capsys.readouterr().err
    assert err.count(f"MLflow tracking server {uri} is unreachable") == 1
    assert "metrics/student.json and plots/student.csv" in err


def test_busy_sqlite_store_is_retried():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert _retry_locked(flaky, delay=0.01) == "ok" and len(calls) == 3
    with pytest.raises(RuntimeError, match="no such table"):
        _retry_locked(lambda: (_ for _ in ()).throw(RuntimeError("no such table")))


def test_temp_experiment_workspace_tracks_into_the_repository_store(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    temp = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "standalone" / "tmpab12"
    assert tracking_uri(temp) == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"


# ------------------------------------------------------------------------------------ pretrained weights
def test_a_link_in_the_pretrained_folder_is_accepted_and_a_path_outside_refused(project, tmp_path):
    """DVC tracks models/pretrained/<role>/ and hashes what a link in it points to; the error says "link the file
    into" that folder, so a link there must be accepted. A path outside it stays refused."""
    from safetensors.torch import save_file

    cfg = {"arch": "resnet_small", "num_classes": 10, "in_chans": 1, "width": 4, "blocks": 1}
    elsewhere = tmp_path / "elsewhere" / "teacher.safetensors"
    elsewhere.parent.mkdir()
    save_file(build_seeded(lambda: build_teacher(**cfg), seed=3).state_dict(), elsewhere)
    link = project / "models" / "pretrained" / "teacher" / "linked.safetensors"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(elsewhere)
    run("teacher", tiny_params(teacher={"pretrained_path": "models/pretrained/teacher/linked.safetensors"}), project)

    before = snapshot(project)
    for outside in (str(elsewhere), "models/pretrained/teacher/../../../elsewhere.safetensors"):
        with pytest.raises(ValueError, match=r"teacher\.pretrained_path = .* lies outside .*pretrained/teacher/"):
            run("teacher", tiny_params(teacher={"pretrained_path": outside}), project)
    (project / "models" / "pretrained" / "teacher" / "dangling.safetensors").symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="no such file"):
        run("teacher", tiny_params(teacher={"pretrained_path": "models/pretrained/teacher/dangling.safetensors"}),
            project)
    assert snapshot(project) == before
