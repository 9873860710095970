"""Where users look in MLflow's UI: the address that opens the pipeline's experiment on its training runs.

MLflow 3.17's UI opens an experiment on GenAI traces (with a "Detect Issues in Your Traces" pop-up) unless its
GenAI / model-training switch, ``workflowType``, says ``machine_learning``; :func:`distill.tracking.runs_url`
names the runs tab and that switch. The slow test opens it in headless Chromium on a real ``mlflow server``.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distill.tracking import LOCAL_UI, create_pipeline_run, log_headline, open_experiment, runs_url, stage_run

from helpers import background_server, free_port


@pytest.mark.parametrize(("uri", "ui"), [
    ("http://mlflow.example:8080", "http://mlflow.example:8080"),
    ("https://mlflow.example/prefix/", "https://mlflow.example/prefix"),  # a server behind a proxy path
    ("sqlite:////work/project/mlflow.db", LOCAL_UI),  # a local store: `mlflow ui`'s default address
    ("file:///work/project/mlruns", LOCAL_UI),
    ("postgresql://user@db/mlflow", LOCAL_UI),
])
def test_runs_url_opens_the_runs_tab_in_model_training_mode(uri: str, ui: str) -> None:
    assert runs_url("7", uri) == f"{ui}/#/experiments/7/runs?workflowType=machine_learning"


def test_runs_url_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    assert runs_url("3") == "http://10.0.0.5:5000/#/experiments/3/runs?workflowType=machine_learning"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert runs_url("3").startswith(f"{LOCAL_UI}/#/experiments/3/runs")


# --- a real browser on a real `mlflow server` -------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Debian's Chromium as this machine runs it: no sandbox (root), and no calls home (the network is closed).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1400,900",
                  "--virtual-time-budget=30000")
#: ``DISTILL_UI_SCREENSHOT=docs/figures/mlflow_runs.png pytest tests/test_mlflow_ui.py -m slow`` rewrites the README's
#: screenshot from the same run.
SCREENSHOT_ENV = "DISTILL_UI_SCREENSHOT"
PARENT_NAME = "run-20250101-120000"


def _browse(url: str, profile: Path, *, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (``--dump-dom``), or a screenshot of it; a fresh browser profile each time.

    A fresh profile: the UI remembers its GenAI / model-training switch in the browser's storage.
    """
    shutil.rmtree(profile, ignore_errors=True)
    what = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *what, url], capture_output=True,
                          text=True, timeout=240, check=False)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-3000:]}"
    return proc.stdout


def _page_text(dom: str) -> str:
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text))).strip()


def _pipeline_like_store(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A SQLite store with one pipeline's parent run and its six stage runs, made by the product's own calls."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.chdir(root)  # its artifacts (./mlruns) go there too
    client, experiment_id = open_experiment(root)
    parent = create_pipeline_run(client, experiment_id, root, run_name=PARENT_NAME, params={"student": {"alpha": 0.5}})
    monkeypatch.setenv("DISTILL_PARENT_RUN_ID", parent)
    for stage in ("data", "teacher", "soft_labels", "student", "baseline", "evaluate"):
        with stage_run(stage, project_root=root, params={"seed": 0}) as tracker:
            tracker.log_metrics({"val_acc": 0.9}, step=1)
            if stage == "evaluate":
                log_headline(tracker.parent, {"teacher": {"top1": 0.95}, "baseline": {"top1": 0.92},
                                              "student": {"top1": 0.94}})
    client.set_terminated(parent)
    return experiment_id


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's Chromium (`apt-get install chromium`) for a headless "
                                             "browser")
def test_runs_url_opens_the_training_runs_in_a_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       base_env: dict[str, str]) -> None:
    """The printed address opens the runs table in model-training mode; the bare experiment page does not."""
    store = tmp_path / "project"
    store.mkdir()
    experiment_id = _pipeline_like_store(store, monkeypatch)
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    args = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**base_env, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with background_server(args, f"{server}/health", env=env, log=tmp_path / "server.log", timeout=180):
        url = runs_url(experiment_id, server)
        page = _page_text(_browse(url, tmp_path / "profile"))
        home = _page_text(_browse(f"{server}/#/experiments/{experiment_id}", tmp_path / "profile"))
        if os.environ.get(SCREENSHOT_ENV):
            _browse(url, tmp_path / "profile", screenshot=Path(os.environ[SCREENSHOT_ENV]).resolve())
    # The runs table of the experiment, the pipeline's parent run in it, and its six stage runs counted.
    assert page.startswith(f"Runs - Experiment {experiment_id} - MLflow"), page[:400]
    assert PARENT_NAME in page and "7 matching runs" in page, page[:2000]
    # Model-training mode: the experiment's side bar has Runs and Models, not the GenAI pages; no traces pop-up.
    assert " distill Runs Models Traces " in page, page[:600]
    for genai in ("Overview", "Sessions", "Judges", "Detect Issues"):
        assert genai not in page, (genai, page[:2000])
    # What users met before: the experiment's own page opens on GenAI traces, with the pop-up's button.
    assert home.startswith(f"Overview - Experiment {experiment_id}") and "Detect Issues" in home, home[:600]
