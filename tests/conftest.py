"""The fixtures the tests share (the helpers they share are in ``tests/helpers.py``, a module they import).

They run the real thing: a throw-away copy of the project as its own git + DVC repository, the real
MLflow SQLite store inside it, and one real ``prefect server start`` for the whole session (it also
spares every stage process a temporary Prefect server of its own).

* ``sub_env``: the environment of every subprocess: the project's virtualenv first on ``PATH``,
  Prefect isolated in a temporary ``PREFECT_HOME`` and pointed at the session's server, no
  inherited ``MLFLOW_*``/``DISTILL_*``/``DVC_*`` variables (so the project's own
  ``sqlite:///<project>/mlflow.db`` is used), and a git identity that works on a bare CI machine.
* ``tiny_project``: the copy, with a tiny ``params.yaml`` (2 epochs, 2 soft-label views), committed.
  A pristine template: nothing runs in it; ``git clone`` it for a project of your own.
* ``built_project``: a clone of ``tiny_project`` after ``python -m flows pipeline`` ran in it once.
  Both test files share it, so the deployment test's default run is a quick no-op ``dvc repro``.
* ``run_cmd``: ``subprocess.run`` in the project with ``sub_env``; failures show the captured output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest

from distill.tracking import restore_tracking_uri, tracking_uri_state

from helpers import (
    GIT_IDENTITY,
    REPO,
    TINY_PARAMS,
    VENV_BIN,
    PipelineRun,
    RunCmd,
    background_server,
    describe,
    free_port,
    now_ms,
    set_param,
)

# In-process DVC (tests/test_lineage.py) and MLflow: no usage reports over the network from the test process.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_DROPPED_PREFIXES = ("PREFECT_", "MLFLOW_", "DISTILL_", "DVC_", "GIT_")


@pytest.fixture(scope="session")
def base_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The subprocess environment without a Prefect API URL (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_PREFIXES)}
    state = tmp_path_factory.mktemp("tool-state")
    env.update(GIT_IDENTITY)
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(VENV_BIN.parent),
        "DISTILL_PROGRESS": "0",
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(state / "dvc-site-cache"),
        "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture(scope="session")
def prefect_server(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``prefect server start`` for the session; yields its API URL."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**base_env, "PREFECT_UI_ENABLED": "false"}  # the API only: no UI build at start-up
    with background_server(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                           api + "/health", env=env, log=tmp_path_factory.mktemp("prefect-server") / "server.log"):
        yield api


@pytest.fixture(scope="session")
def sub_env(base_env: dict[str, str], prefect_server: str) -> dict[str, str]:
    """``base_env`` pointed at the session's Prefect server."""
    return {**base_env, "PREFECT_API_URL": prefect_server}


@pytest.fixture(scope="session")
def run_cmd(sub_env: dict[str, str]) -> RunCmd:
    """``run_cmd(args, cwd, timeout=..., check=True, env=None)``: run a command with ``sub_env`` (plus ``env``).

    With ``check`` a non-zero exit fails the test with the command's captured output.
    """
    def run(args: list[str], cwd: Path, *, timeout: float = 600, check: bool = True,
            env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, cwd=cwd, env={**sub_env, **(env or {})}, check=False, capture_output=True,
                              text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, describe(proc)
        return proc

    return run


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory, base_env: dict[str, str]) -> Path:
    """A committed copy of the project (tracked + untracked-not-ignored files) with tiny params."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    project = tmp_path_factory.mktemp("project")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # a file deleted in the working tree is still listed by git
            (project / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, project / rel)
    assert (project / ".dvc" / "config").is_file(), "the copy lacks .dvc/config: is .dvc/ tracked in git?"
    for dotted, value in TINY_PARAMS.items():
        set_param(project, dotted, value)
    for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "tiny project"]):
        subprocess.run(args, cwd=project, env=base_env, check=True, capture_output=True, text=True)
    return project


@pytest.fixture(scope="session")
def built_project(tiny_project: Path, run_cmd: RunCmd, tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """A clone of ``tiny_project`` after one ``python -m flows pipeline`` (a Prefect flow running ``dvc repro``).

    The tests that use it change it further, in order (see test_pipeline_e2e.py).
    """
    project = tmp_path_factory.mktemp("built") / "project"
    run_cmd(["git", "clone", "-q", str(tiny_project), str(project)], tiny_project.parent)
    started = now_ms()
    proc = run_cmd([sys.executable, "-m", "flows", "pipeline"], project, timeout=900, check=False)
    ended = now_ms()
    commit = run_cmd(["git", "rev-parse", "HEAD"], project).stdout.strip()
    return PipelineRun(project, proc, started, ended, commit)


@pytest.fixture(scope="session")
def fault_plugin() -> dict[str, str]:
    """Environment that injects the test's fault (``DISTILL_TEST_FAULT``, tests/faults.py) into every subprocess.

    ``tests/plugins/`` on ``PYTHONPATH``: Python loads its ``sitecustomize.py`` at start-up in every process, which
    adds the fault to the product's training. Test code only: the product carries no test hook of its own.
    """
    return {"PYTHONPATH": str(REPO / "tests" / "plugins")}


@pytest.fixture(scope="session", autouse=True)
def _test_process_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """MLflow calls of the test process that name no store go to a temporary one, never to ./mlruns of the checkout."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow-default') / 'mlflow.db'}"
    yield
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(autouse=True)
def _mlflow_uri_restored() -> Iterator[None]:
    """Each test leaves MLflow's process-wide tracking URI as it found it: the product's ``open_experiment`` sets it
    in code, and a URI set in code overrides every later test's ``MLFLOW_TRACKING_URI`` (CI ran the whole suite in
    one process and a model load went to another test's store)."""
    state = tracking_uri_state()
    yield
    restore_tracking_uri(state)


@pytest.fixture(scope="module", autouse=True)
def _mlflow_uri_restored_per_module() -> Iterator[None]:
    """The same for a module's own fixtures (a module-scoped store stays set for its tests, and goes with them)."""
    state = tracking_uri_state()
    yield
    restore_tracking_uri(state)


@pytest.fixture(scope="session")
def committed_project(tiny_project: Path, run_cmd: RunCmd, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of ``tiny_project`` after one ``dvc repro`` (on the session's Prefect server), its results committed:
    every stage is up to date and git has nothing to commit. A template: copy it (:func:`copy_project`) to use it."""
    project = tmp_path_factory.mktemp("committed") / "project"
    run_cmd(["git", "clone", "-q", str(tiny_project), str(project)], tiny_project.parent)
    run_cmd(["dvc", "repro"], project, timeout=1500)
    run_cmd(["git", "add", "-A"], project)
    run_cmd(["git", "commit", "-qm", "results of dvc repro"], project)
    return project
