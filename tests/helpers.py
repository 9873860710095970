"""What the tests share besides fixtures (those are in conftest.py): the project's paths and tiny params, helpers to
run and stop real processes and servers, and readers of a test project's DVC experiments and MLflow store.

Tests import it as a module (``from helpers import tiny_params``); conftest.py imports what its fixtures need.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.prefect_api import free_port

__all__ = ["GIT_IDENTITY", "ONE_THREAD", "REPO", "TINY", "TINY_PARAMS", "VENV_BIN", "PipelineRun", "RunCmd",
           "background_server", "copy_project", "describe", "dvc_experiments", "free_port", "mlflow_client",
           "mlflow_runs", "now_ms", "processes_with", "project_raw", "set_param", "stop_process_group", "tiny_params"]

REPO = Path(__file__).resolve().parents[1]
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


def _answers(url: str) -> bool:
    """Whether ``url`` answers 200 within 2 s."""
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


@contextmanager
def background_server(args: list[str], health_url: str, *, env: dict[str, str], log: Path,
                      timeout: float = 120) -> Iterator[subprocess.Popen]:
    """Start a server subprocess (its own process group, output to ``log``), wait until ``health_url``
    answers 200, and stop the whole group on exit. Fails the test, with the log, if it does not come up."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(health_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`{' '.join(args)}` did not come up (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        stop_process_group(proc)


RunCmd = Callable[..., subprocess.CompletedProcess]


def describe(proc: subprocess.CompletedProcess) -> str:
    """A failed command, with its output (the tail of it), for assertion messages."""
    return (f"`{' '.join(map(str, proc.args))}` exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}")


@dataclass(frozen=True)
class PipelineRun:
    """``python -m flows pipeline`` run once in the tiny project."""

    project: Path
    proc: subprocess.CompletedProcess
    started_ms: int  # now_ms() before and after: this execution's MLflow runs started in between
    ended_ms: int
    commit: str


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


def gated_alias(project: Path, name: str = "deit-student") -> str:
    """The alias the registry's quality gate gave the pipeline's newest version of ``name``, checked against the
    gate's rule: ``champion`` when the student beat its own baseline on the test split (metrics/evaluate.json),
    else ``candidate``. A tiny test run's student need not beat its baseline, so tests load what the gate chose."""
    client = mlflow_client(project)
    newest = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    scores = json.loads((project / "metrics" / "evaluate.json").read_text())
    expected = "champion" if scores["student"]["top1"] > scores["baseline"]["top1"] else "candidate"
    assert int(client.get_model_version_by_alias(name, expected).version) == newest, expected
    return expected


def mlflow_runs(client: Any, filter_string: str = "") -> list[Any]:
    """Every run of the MLflow experiment ``distill`` (matching ``filter_string``)."""
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name("distill")
    assert exp is not None, "MLflow experiment 'distill' does not exist"
    return list(client.search_runs([exp.experiment_id], filter_string=filter_string, run_view_type=ViewType.ALL,
                                   max_results=10_000))


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
