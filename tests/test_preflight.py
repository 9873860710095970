"""Pre-flight (distill/preflight.py): every value a stage would reject is found before DVC runs any stage.

In process and seconds-fast: each case is a real params mapping, a real project folder and, for the tracking
server, a real closed port. ``tests/test_reliability_e2e.py`` runs the same checks through DVC and the pipeline
command, and proves that no output is touched.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from distill.config import merge
from distill.preflight import PreflightError, preflight

from helpers import REPO, project_raw, tiny_params


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A project folder as the pipeline needs it before the data stage: the raw data and pretrained folders."""
    for folder in ("data/raw", "models/pretrained/teacher", "models/pretrained/student"):
        (tmp_path / folder).mkdir(parents=True)
    return tmp_path


def refused(params: Any, root: Path, **kwargs: Any) -> str:
    with pytest.raises(PreflightError) as err:
        preflight(params, root, **kwargs)
    return str(err.value)


def test_the_project_params_pass(project):
    preflight(tiny_params(), project)
    preflight(parse(project_raw()), project)


def parse(raw: dict[str, Any]) -> Any:
    from distill.config import parse_params

    return parse_params(raw)


@pytest.mark.parametrize("change, expected", [
    ({"student": {"model": {"preset": "deit_micr"}}},
     r"student\.model\.preset 'deit_micr' is unknown; choose one of deit_tiny, .*\(did you mean 'deit_micro'\?\)"),
    ({"student": {"model": {"patch_size": 5}}},
     r"student\.model: image size 16 is not divisible by patch size 5.*\(data\.image_size=16\)"),
    ({"student": {"model": {"num_heads": 5}}}, r"student\.model: embed_dim 48 is not divisible by num_heads 5"),
    ({"teacher": {"arch": "resnet_smal"}}, r"teacher\.arch = 'resnet_smal': unknown teacher arch 'resnet_smal' "
                                           r"\(did you mean 'resnet_small'"),
    ({"teacher": {"arch": "timm/resnet_smal"}}, r"teacher\.arch = 'timm/resnet_smal': unknown timm model"),
    ({"teacher": {"arch": "vit_b_16"}},
     r"teacher\.arch = 'vit_b_16': teacher arch 'vit_b_16' cannot take 16-px images \(Wrong image height! Expected "
     r"224 but got 16!\); set teacher\.input_size"),
    ({"data": {"root": "data/rw"}}, r"data\.root = 'data/rw': no such folder .*data/rw\. dvc\.yaml lists it as a "
                                    r"dependency of the data stage.*\(digits does not read it"),
    ({"data": {"name": "imagefolder", "root": "data/raw"}}, r"data \(imagefolder at data/raw\): no images found"),
    ({"data": {"name": "fashion_mnist", "root": "data/raw"}},
     r"data \(fashion_mnist at data/raw\): fashion_mnist: the official files .* are not in"),
    ({"teacher": {"pretrained_path": "models/pretrained/teacher/missing.safetensors"}},
     r"teacher\.pretrained_path = 'models/pretrained/teacher/missing\.safetensors': no such file"),
    ({"student": {"model": {"pretrained_path": "/elsewhere/deit.pth"}}},
     r"student\.model\.pretrained_path = '/elsewhere/deit\.pth' lies outside .*models/pretrained/student/"),
])
def test_each_value_a_stage_would_reject_is_named(project, change, expected):
    message = refused(tiny_params(**change), project)
    assert re.search(expected, message), message
    assert message.startswith("params.yaml asks for what a stage would reject") and message.count("\n  - ") == 1


def test_a_name_only_timm_has_points_at_timm(project):
    pytest.importorskip("timm")
    message = refused(tiny_params(teacher={"arch": "resnet10t"}), project)
    assert "unknown teacher arch 'resnet10t' (timm has a model of that name: teacher.arch: timm/resnet10t)" in message
    preflight(tiny_params(teacher={"arch": "timm/resnet10t"}), project)  # ... and that one passes


def test_teachers_that_take_the_size_pass_and_every_problem_is_listed(project):
    preflight(tiny_params(teacher={"arch": "resnet18"}), project)  # a torchvision convnet takes 16 px
    preflight(tiny_params(teacher={"arch": "vit_b_16", "input_size": 224}), project)  # resized for it
    message = refused(tiny_params(student={"model": {"preset": "deit_micr"}}, teacher={"arch": "resnet_smal"},
                                  data={"root": "nowhere"}), project)
    assert message.count("\n  - ") == 3


def _closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_configured_tracking_server_that_does_not_answer_is_named(project, monkeypatch):
    uri = _closed_port_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert f"MLflow tracking server {uri} is unreachable" in refused(tiny_params(), project)
    preflight(tiny_params(), project, tracking=False)


def test_the_check_params_command_exits_2_naming_the_key_and_writes_no_stamp(project):
    """What dvc.yaml's check_params stage runs: ``python -m distill.preflight params.yaml --stamp FILE``."""
    raw = merge(project_raw(), {"student": {"model": {"preset": "deit_micr"}}})
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "distill.preflight", "params.yaml", "--stamp", ".dvc-params-ok"]
    proc = subprocess.run(cmd, cwd=project, capture_output=True, text=True, check=False,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "student.model.preset 'deit_micr' is unknown" in proc.stderr, proc.stderr
    assert not (project / ".dvc-params-ok").exists()  # (a valid run writes it: every dvc repro of the e2e tests)
