"""The export stage (distill/stages/export.py): real stages on the tiny configuration, a real MLflow SQLite store.

In process: the stage writes the parity-checked fp32 and int8 models, metrics and report; an export that breaks
parity fails it naming the largest difference and leaves the earlier outputs as they were; the ONNX model is
registered beside the pyfunc model with the same gate and alias and loads through mlflow.onnx, pyfunc and a plain
onnxruntime session. Slow: through ``dvc repro`` (conftest's ``committed_project``) and ``mlflow models serve``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException

from distill import export as X
from distill.config import Paths
from distill.data import load_prepared
from distill.stages.export import onnx_path
from distill.stages.runner import run_stage

from helpers import REPO, background_server, copy_project, free_port, tiny_params
from test_stage_tracking import client_of, tracked

BEFORE = ("data", "teacher", "soft_labels", "student", "baseline")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every stage before evaluate, run once with the tiny params, untracked."""
    root = tmp_path_factory.mktemp("trained")
    (root / "data" / "raw").mkdir(parents=True)
    for stage in BEFORE:
        torch.manual_seed(0)
        run_stage(stage, tiny_params(), Paths(root), dvc_yaml=REPO / "dvc.yaml")
    return root


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A copy of ``trained`` after evaluate and export, untracked."""
    root = tmp_path_factory.mktemp("exported") / "p"
    shutil.copytree(trained, root)
    run_stage("evaluate", tiny_params(), Paths(root), dvc_yaml=REPO / "dvc.yaml")
    return root, run_stage("export", tiny_params(), Paths(root), dvc_yaml=REPO / "dvc.yaml")


def test_the_stage_writes_parity_checked_models_metrics_and_report(exported):
    root, result = exported
    metrics = json.loads((root / "metrics" / "export.json").read_text())
    evaluated = json.loads((root / "metrics" / "evaluate.json").read_text())
    n = len(load_prepared(root / "data" / "prepared").test.labels)
    assert metrics["num_test"] == n and metrics["opset"] == 18 and metrics["served"] == "fp32"
    fp32, int8 = metrics["fp32"], metrics["int8"]
    assert fp32["top1_disagreements"] == 0 and fp32["max_abs_prob_diff"] <= 1e-4
    assert fp32["top1"] == metrics["pytorch"]["top1"] == evaluated["student"]["top1"]  # the evaluated student
    assert 0 <= int8["agreement_with_fp32"] <= 1 and int8["top1_change_vs_fp32"] == int8["top1"] - fp32["top1"]
    assert fp32["file_bytes"] == onnx_path(Paths(root), "fp32").stat().st_size
    assert int8["file_bytes"] == onnx_path(Paths(root), "int8").stat().st_size < fp32["file_bytes"]
    for side in ("pytorch_fp32", "onnxruntime_fp32", "onnxruntime_int8"):
        assert metrics["latency"][side]["latency_ms_batch1"] > 0 and metrics["latency"][side]["images_per_sec"] > 0
    assert metrics["latency"]["threads"] == 1 and metrics["cpu"]["name"]
    report = (root / "reports" / "export.md").read_text()
    assert "| ONNX int8 (onnxruntime) |" in report and "1 threads on every side" in report
    assert ("has VNNI" in report or "has no VNNI" in report) and "AMX" in report
    assert result["champion_gate"] == metrics["champion_gate"]


def perturbing(real: Any) -> Any:
    """``export_onnx`` that writes a model whose class head differs from the student's (a broken export)."""
    def export(student: X.DeployedStudent, path: Path, **kwargs: Any) -> None:
        real(student, path, **kwargs)
        model = onnx.load(str(path))
        (head,) = [t for t in model.graph.initializer if t.name.endswith(".head.weight")]
        arr = onnx.numpy_helper.to_array(head).copy()
        arr[0] += 0.5 * np.random.default_rng(0).standard_normal(arr.shape[1]).astype(arr.dtype)
        head.CopyFrom(onnx.numpy_helper.from_array(arr, head.name))
        onnx.save(model, str(path))
    return export


def test_an_export_that_breaks_parity_fails_naming_the_difference_and_keeps_the_outputs(exported, tmp_path,
                                                                                         monkeypatch):
    root = tmp_path / "p"
    shutil.copytree(exported[0], root)
    outputs = [onnx_path(Paths(root), "fp32"), onnx_path(Paths(root), "int8"), root / "metrics" / "export.json",
               root / "reports" / "export.md"]
    before = {p: p.read_bytes() for p in outputs}
    monkeypatch.setattr(X, "export_onnx", perturbing(X.export_onnx))
    with pytest.raises(X.ParityError) as err:
        run_stage("export", tiny_params(), Paths(root), dvc_yaml=REPO / "dvc.yaml")
    msg = str(err.value)
    assert "breaks parity with the PyTorch student: largest |difference of probabilities|" in msg
    assert "at test image" in msg and "(PyTorch " in msg and "previous export is kept" in msg
    assert {p: p.read_bytes() for p in outputs} == before
    assert not list((root / "models").glob(".*.tmp"))  # no temporary file left beside the outputs


@pytest.fixture()
def store(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the trained project with its own MLflow store, as a stage process has it."""
    root = tmp_path / "project"
    shutil.copytree(trained, root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.delenv("DISTILL_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(root)
    return root


def test_the_onnx_model_is_registered_beside_the_pyfunc_one_and_serves_the_same_classes(store):
    params = tiny_params(evaluate={"register_model": True})
    _, evaluated = tracked("evaluate", store, params)
    run_id, result = tracked("export", store, params)
    pyfunc_reg, onnx_reg = evaluated["registry"], result["registry"]
    assert onnx_reg["name"] == "deit-student-onnx" and onnx_reg["alias"] == pyfunc_reg["alias"]  # the same gate
    assert onnx_reg["dataset_alias"] == pyfunc_reg["dataset_alias"] and onnx_reg["metric"] == pyfunc_reg["metric"]
    client = client_of(store)
    assert client.get_run(run_id).data.tags["registry.alias"] == onnx_reg["alias"]
    alias = onnx_reg["alias"]
    test = load_prepared(store / "data" / "prepared").test
    images = np.ascontiguousarray(np.asarray(test.images).transpose(0, 2, 3, 1))
    expected = mlflow.pyfunc.load_model(f"models:/deit-student@{alias}").predict(images).argmax(1)

    uri = f"models:/deit-student-onnx@{alias}"
    served = mlflow.pyfunc.load_model(uri)
    assert served.metadata.get_model_info().flavors["onnx"]["providers"] == ["CPUExecutionProvider"]
    assert (served.predict(images)["probabilities"].argmax(1) == expected).all()
    assert isinstance(mlflow.onnx.load_model(uri), onnx.ModelProto)
    folder = Path(mlflow.artifacts.download_artifacts(uri))
    plain = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert (plain.run(None, {"images": images})[0].argmax(1) == expected).all()
    assert (folder / "input_example.json").is_file() or list(folder.glob("*example*"))
    with pytest.raises(MlflowException, match=r"\(-1, 16, 16, 1\)"):  # a wrong size, naming the expected shape
        served.predict(np.zeros((1, 8, 8, 1), np.uint8))
    with pytest.raises(MlflowException, match=r"uint8"):
        served.predict(images[:2].astype(np.float32))


def test_serve_int8_registers_the_int8_model_with_its_own_top1(store):
    """``export.serve: int8``: the registered ONNX model is the int8 file, judged on the int8 model's top-1."""
    params = tiny_params(evaluate={"register_model": True}, export={"serve": "int8"})
    tracked("evaluate", store, params)
    _, result = tracked("export", store, params)
    reg = result["registry"]
    measured = json.loads((store / "metrics" / "export.json").read_text())
    assert reg["name"] == "deit-student-onnx" and reg["metric"] == pytest.approx(measured["int8"]["top1"])
    uri = f"models:/deit-student-onnx/{reg['version']}"
    folder = Path(mlflow.artifacts.download_artifacts(uri))
    assert (folder / "model.onnx").read_bytes() == onnx_path(Paths(store), "int8").read_bytes()
    assert (folder / "model.onnx").read_bytes() != onnx_path(Paths(store), "fp32").read_bytes()
    test = load_prepared(store / "data" / "prepared").test
    images = np.ascontiguousarray(np.asarray(test.images).transpose(0, 2, 3, 1))
    top1 = float((mlflow.pyfunc.load_model(uri).predict(images)["probabilities"].argmax(1) == test.labels).mean())
    assert top1 == pytest.approx(measured["int8"]["top1"])


@pytest.mark.slow
def test_dvc_runs_export_and_mlflow_serves_the_onnx_champion(committed_project, base_env, run_cmd, tmp_path):
    project = copy_project(committed_project, tmp_path / "project")
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert "export" in lock["stages"] and {o["path"] for o in lock["stages"]["export"]["outs"]} >= {
        "models/student.onnx", "models/student.int8.onnx"}
    metrics = json.loads((project / "metrics" / "export.json").read_text())
    assert metrics["fp32"]["top1_disagreements"] == 0 and metrics["fp32"]["max_abs_prob_diff"] <= 1e-4
    assert "up to date" in run_cmd(["dvc", "status", "export"], project).stdout
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    alias = "champion" if "champion" in client.get_registered_model("deit-student").aliases else "candidate"
    assert client.get_model_version_by_alias("deit-student-onnx", alias)
    test = load_prepared(project / "data" / "prepared").test
    image = np.asarray(test.images[:3]).transpose(0, 2, 3, 1)
    env = {**base_env, "MLFLOW_TRACKING_URI": uri}
    reference = subprocess.run(
        [sys.executable, "-c", "import sys, json, numpy as np, mlflow; m = mlflow.pyfunc.load_model(sys.argv[1]); "
         "print(json.dumps(m.predict(np.array(json.loads(sys.argv[2]), dtype=np.uint8)).argmax(1).tolist()))",
         f"models:/deit-student@{alias}", json.dumps(image.tolist())],
        env=env, capture_output=True, text=True, check=True, cwd=project).stdout.strip().splitlines()[-1]
    port = free_port()
    with background_server(["mlflow", "models", "serve", "-m", f"models:/deit-student-onnx@{alias}", "--env-manager",
                            "local", "--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}/ping",
                           env=env, log=tmp_path / "serve.log", timeout=180):
        answer = post(port, {"inputs": image.tolist()})
        probs = np.array(answer["predictions"]["probabilities"] if isinstance(answer["predictions"], dict)
                         else answer["predictions"])
        assert probs.argmax(1).tolist() == json.loads(reference)
        bad = post(port, {"inputs": np.zeros((1, 8, 8, 1), np.uint8).tolist()}, expect=400)
        assert "(-1, 16, 16, 1)" in json.dumps(bad)


def post(port: int, body: dict[str, Any], expect: int = 200) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == expect
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        assert err.code == expect, err.read()
        return json.loads(err.read())
