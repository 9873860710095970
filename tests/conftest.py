"""Shared fixtures of the end-to-end tests (``tests/test_pipeline_e2e.py``, ``tests/test_prefect_deployment.py``).

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

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# In-process DVC (tests/test_lineage.py) and MLflow: no usage reports over the network from the test process.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
VENV_BIN = Path(sys.executable).parent  # the interpreter running pytest: <project>/.venv/bin/python
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "distill-tests", "GIT_AUTHOR_EMAIL": "distill-tests@example.invalid",
                "GIT_COMMITTER_NAME": "distill-tests", "GIT_COMMITTER_EMAIL": "distill-tests@example.invalid"}
# In-process stage runs: seconds on a laptop CPU (120 training images, a 4-wide ResNet, a 3-block DeiT, 2 epochs).
TINY = {
    "data": {"max_per_class": 12, "unlabeled": False},
    "teacher": {"width": 4, "blocks": 1, "train": {"epochs": 2, "warmup_epochs": 1, "batch_size": 32}},
    "soft_labels": {"views": 2},
    "student": {"model": {"preset": "deit_nano"}, "train": {"epochs": 2, "warmup_epochs": 1, "batch_size": 32}},
    "evaluate": {"throughput_iters": 2, "throughput_rounds": 1, "register_model": False},
}


def project_raw() -> dict[str, Any]:
    """The project's own ``params.yaml`` as a mapping (the schema has no defaults: tests start from it)."""
    from distill.config import load_raw

    return load_raw(REPO / "params.yaml")


def tiny_params(**sections: Any) -> Any:
    """The project's params with :data:`TINY` and ``sections`` (nested dicts per group) merged in, validated."""
    from distill.config import merge, parse_params

    raw = merge(project_raw(), TINY)
    for key, value in sections.items():
        raw = merge(raw, {key: value})
    return parse_params(raw)


# Tiny but complete: every stage runs, every training stage has 2 epochs of history.
TINY_PARAMS = {"teacher.train.epochs": 2, "teacher.train.warmup_epochs": 1, "student.train.epochs": 2,
               "student.train.warmup_epochs": 1, "soft_labels.views": 2, "evaluate.throughput_iters": 3,
               "evaluate.throughput_rounds": 1}
_DROPPED_PREFIXES = ("PREFECT_", "MLFLOW_", "DISTILL_", "DVC_", "GIT_")
# For subprocesses whose results are compared bit for bit: reductions split over another number of threads
# round differently.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def now_ms() -> int:
    """Wall-clock time in milliseconds, MLflow's unit for run start times."""
    return int(time.time() * 1000)


def set_param(project: Path, dotted: str, value: object) -> None:
    """Set ``a.b.c: value`` in the project's ``params.yaml`` (comments are not kept)."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def stop_process_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate a subprocess started with ``start_new_session=True`` and everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
    try:  # children that outlived their leader
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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


@contextmanager
def background_server(args: list[str], health_url: str, *, env: dict[str, str], log: Path,
                      timeout: float = 120) -> Iterator[subprocess.Popen]:
    """Start a server subprocess (its own process group, output to ``log``), wait until ``health_url``
    answers 200, and stop the whole group on exit. Fails the test, with the log, if it does not come up."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(health_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`{' '.join(args)}` did not come up (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="session")
def prefect_server(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``prefect server start`` for the session; yields its API URL."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**base_env, "PREFECT_UI_ENABLED": "false"}  # the API only: no UI build at start-up
    with background_server(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                           api + "/health", env=env, log=tmp_path_factory.mktemp("prefect-server") / "server.log"):
        yield api


@pytest.fixture(scope="session")
def sub_env(base_env: dict[str, str], prefect_server: str) -> dict[str, str]:
    """``base_env`` pointed at the session's Prefect server."""
    return {**base_env, "PREFECT_API_URL": prefect_server}


RunCmd = Callable[..., subprocess.CompletedProcess]


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


def describe(proc: subprocess.CompletedProcess) -> str:
    """A failed command, with its output (the tail of it), for assertion messages."""
    return (f"`{' '.join(map(str, proc.args))}` exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}")


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


@dataclass(frozen=True)
class PipelineRun:
    """``python -m flows pipeline`` run once in the tiny project."""

    project: Path
    proc: subprocess.CompletedProcess
    started_ms: int  # now_ms() before and after: this execution's MLflow runs started in between
    ended_ms: int
    commit: str


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


def dvc_experiments(project: Path, run_cmd: RunCmd) -> dict[str, dict[str, Any]]:
    """``dvc exp show --json``: each experiment's name -> its ``params.yaml`` values."""
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], project).stdout)
    return {rev["name"]: rev["data"]["params"]["params.yaml"]["data"]
            for baseline in shown for exp in (baseline.get("experiments") or []) for rev in exp["revs"]}


def mlflow_client(project: Path) -> Any:
    """A client of the project's own store (explicit URIs: the test process's global MLflow state is untouched)."""
    import mlflow

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def mlflow_runs(client: Any, filter_string: str = "") -> list[Any]:
    """Every run of the MLflow experiment ``distill`` (matching ``filter_string``)."""
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name("distill")
    assert exp is not None, "MLflow experiment 'distill' does not exist"
    return list(client.search_runs([exp.experiment_id], filter_string=filter_string, run_view_type=ViewType.ALL,
                                   max_results=10_000))


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


def copy_project(template: Path, dst: Path) -> Path:
    """A copy of a project folder (its git repository, DVC cache and MLflow store included)."""
    shutil.copytree(template, dst, symlinks=True)
    return dst


def processes_with(marker: str, *, server: bool = False) -> list[int]:
    """Pids of live processes whose environment holds ``marker`` (``NAME=value``; Linux /proc), zombies aside;
    ``server``: ``prefect server`` processes only."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes()
            state = (proc / "stat").read_text().split(") ", 1)[-1][:1]
        except OSError:
            continue
        if marker.encode() not in environ.split(b"\0") or state == "Z":
            continue
        if not server or (b"server" in cmdline and any(a.endswith(b"prefect") for a in cmdline)):
            found.append(int(proc.name))
    return found
