"""The stage server (flows/stage_server.py): a warm, forked worker stands in for a fresh stage process.

The unit tests check what decides whether the server may serve a command. The others use a real server
process and real stage commands (``--no-prefect``: the Prefect path is the pipeline test's) and compare a
served command with the same command in a fresh process: same outputs bit for bit, same exit status and
message; a killed client takes its worker along; SIGTERM reaches the worker; a server that cannot stand
in for a fresh process declines, and the command runs by itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import ONE_THREAD, REPO, describe, set_param
from flows.stage_server import ENV_VAR, Server, StageServer, code_digest, delegate, import_time_env

TIMING = {"train_images_per_sec", "epoch_time_s", "train_time_s", "time_s"}
DATA = [sys.executable, "-m", "flows", "stage", "data", "--no-prefect"]
TEACHER = [sys.executable, "-m", "flows", "stage", "teacher", "--no-prefect"]


# ------------------------------------------------------------------------------------------------ unit
def test_only_runtime_variables_may_differ() -> None:
    env = {"OMP_NUM_THREADS": "2", "PATH": "/bin", "PYTHONPATH": "/x", "CUDA_VISIBLE_DEVICES": "0",
           "DVC_ROOT": "/p", "DISTILL_PARENT_RUN_ID": "r", "MLFLOW_TRACKING_URI": "sqlite:///m.db",
           "_MLFLOW_TELEMETRY_SESSION_ID": "s", "PREFECT_API_URL": "http://h/api", "PWD": "/p", ENV_VAR: "/sock"}
    assert import_time_env(env) == {"OMP_NUM_THREADS": "2", "PATH": "/bin", "PYTHONPATH": "/x",
                                    "CUDA_VISIBLE_DEVICES": "0"}


def test_code_digest_covers_every_module_of_the_packages(tmp_path: Path) -> None:
    shutil.copytree(REPO / "distill", tmp_path / "distill", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "flows", tmp_path / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    digest = code_digest(tmp_path)
    assert digest == code_digest(REPO)
    assert "distill/models/deit.py" in digest and "flows/stage_server.py" in digest
    with open(tmp_path / "distill" / "models" / "deit.py", "a") as f:
        f.write("# edited\n")
    assert {k for k in digest if code_digest(tmp_path)[k] != digest[k]} == {"distill/models/deit.py"}


def test_decline_reasons_name_what_differs(tmp_path: Path) -> None:
    server = Server(REPO)
    request = {"argv": ["stage", "data"], "cwd": str(REPO), "env": dict(os.environ)}
    assert server.decline_reason(request) is None
    assert server.decline_reason({**request, "env": {**os.environ, "DVC_ROOT": "/elsewhere"}}) is None
    reason = server.decline_reason({**request, "env": {**os.environ, "OMP_NUM_THREADS": "7"}})
    assert reason and "OMP_NUM_THREADS" in reason
    for pkg in ("distill", "flows"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "distill" / "losses.py").write_text("# another version\n")
    reason = server.decline_reason({**request, "cwd": str(tmp_path)})
    assert reason and "distill/losses.py" in reason


def test_without_a_server_the_command_runs_itself(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert delegate(["stage", "data"]) is None
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "no-such-socket"))
    assert delegate(["stage", "data"]) is None
    assert "unreachable" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ real processes
@pytest.fixture(scope="module")
def template(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project, with a smaller teacher."""
    project = tmp_path_factory.mktemp("stage-server") / "template"
    shutil.copytree(tiny_project, project, symlinks=True)
    set_param(project, "teacher.width", 8)
    set_param(project, "teacher.blocks", 1)
    return project


@pytest.fixture(scope="module")
def env(base_env: dict[str, str]) -> dict[str, str]:
    return {**base_env, **ONE_THREAD}


@pytest.fixture(scope="module")
def server(template: Path, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StageServer, Path]]:
    log = tmp_path_factory.mktemp("stage-server-log") / "server.log"
    with StageServer(template, env=env, log=log) as srv:
        yield srv, log


def clone(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    return dest


def run(args: list[str], cwd: Path, env: dict[str, str], served: tuple[StageServer, Path] | None,
        **extra: str) -> subprocess.CompletedProcess:
    full = {**env, **(served[0].env_var() if served else {}), **extra}
    return subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True, timeout=600)


def served_lines(log: Path, cwd: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "runs `" in line and f" in {cwd}" in line]


def without_timing(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING}


@pytest.mark.slow
def test_a_served_stage_equals_a_fresh_process(server, template: Path, env: dict[str, str], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    served, fresh = clone(template, tmp_path / "served"), clone(template, tmp_path / "fresh")
    for cmd in (DATA, TEACHER):
        a, b = run(cmd, served, env, server), run(cmd, fresh, env, None)
        assert a.returncode == 0, describe(a)
        assert b.returncode == 0, describe(b)
        assert "[flows]" not in a.stderr, a.stderr  # no note: it was not declined
    assert "[teacher] epoch 2/2" in a.stdout + a.stderr  # the worker wrote to the client's streams
    assert len(served_lines(server[1], served)) == 2, server[1].read_text()
    assert served_lines(server[1], fresh) == []
    for f in sorted((fresh / "data" / "prepared").iterdir()):
        if f.suffix != ".json":
            assert (served / "data" / "prepared" / f.name).read_bytes() == f.read_bytes(), f.name
    wa, wb = (load_file(p / "models" / "teacher.safetensors") for p in (served, fresh))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert without_timing(served / "metrics" / "teacher.json") == without_timing(fresh / "metrics" / "teacher.json")


@pytest.mark.slow
def test_failure_status_and_message_pass_through(server, template: Path, env: dict[str, str], tmp_path: Path) -> None:
    """The teacher of a project without prepared data fails the same way served and fresh."""
    a = run(TEACHER, clone(template, tmp_path / "served"), env, server)
    b = run(TEACHER, clone(template, tmp_path / "fresh"), env, None)
    assert a.returncode == b.returncode != 0
    last = lambda text: [line for line in text.splitlines() if line.strip()][-1]  # noqa: E731
    assert last(a.stderr).replace(str(tmp_path / "served"), "P") == last(b.stderr).replace(str(tmp_path / "fresh"), "P")


def _long_teacher(server, template: Path, env: dict[str, str], project: Path) -> tuple[subprocess.Popen, int]:
    assert run(DATA, project, env, server).returncode == 0
    set_param(project, "teacher.train.epochs", 500)
    proc = subprocess.Popen(TEACHER, cwd=project, env={**env, **server[0].env_var()}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (lines := [line for line in served_lines(server[1], project) if "stage teacher" in line]):
        assert proc.poll() is None and time.monotonic() < deadline, server[1].read_text()
        time.sleep(0.1)
    pid = int(re.search(r"worker (\d+) runs", lines[-1]).group(1))
    time.sleep(1.0)  # into training
    assert _alive(pid)
    return proc, pid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow
def test_a_killed_client_takes_its_worker_along(server, template: Path, env: dict[str, str], tmp_path: Path) -> None:
    proc, worker = _long_teacher(server, template, env, clone(template, tmp_path / "killed"))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _gone_within(worker, 5), "the worker outlived its client"
    assert f"worker {worker} killed: its client went away" in server[1].read_text()


@pytest.mark.slow
def test_sigterm_reaches_the_worker(server, template: Path, env: dict[str, str], tmp_path: Path) -> None:
    proc, worker = _long_teacher(server, template, env, clone(template, tmp_path / "terminated"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM  # what a shell reports for a process killed by SIGTERM
    assert _gone_within(worker, 5)


@pytest.mark.slow
def test_the_server_declines_what_a_fresh_process_would_do_differently(server, template: Path, env: dict[str, str],
                                                                       tmp_path: Path) -> None:
    project = clone(template, tmp_path / "declined")
    res = run(DATA, project, env, server, OMP_NUM_THREADS="2")
    assert res.returncode == 0, describe(res)
    assert "OMP_NUM_THREADS" in res.stderr and "running the stage in this process" in res.stderr
    with open(project / "distill" / "data.py", "a") as f:
        f.write("# a local edit\n")
    res = run(DATA, project, env, server)
    assert res.returncode == 0, describe(res)
    assert "distill/data.py" in res.stderr and "running the stage in this process" in res.stderr
    assert served_lines(server[1], project) == []
