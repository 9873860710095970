"""No process outlives the command that started it (flows/lifetime.py, flows/prefect_api.py, flows/pipeline.py).

Real commands, real signals, the real process table: every process a test starts carries a marker in its
environment, and ``processes_with`` (conftest.py) finds whatever of them is still alive. The stage is held at
an exact step by the fault plug-in's ``wait`` (tests/faults.py) so that the signal lands mid-training.

* SIGKILL of a stage under plain ``dvc repro`` with no Prefect API: the stage's private Prefect server dies
  with it (before: Prefect's own temporary server, about 200 MB, ran on for 20 minutes and more);
* Ctrl-C of plain ``dvc repro``: it returns promptly (before: 150 s, while the stage retried the temporary
  server that the Ctrl-C had killed too);
* SIGKILL of ``python -m flows pipeline``: DVC and its stage end too (before: they ran on as orphans), and the
  same command then runs the pipeline to the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from helpers import copy_project, describe, processes_with, set_param

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the process table from /proc")

WATCHER = """
import sys, time
from flows.lifetime import stop_with
stop_with([int(sys.argv[1])])
print("watching", flush=True)
time.sleep(60)
"""


def test_a_stage_ends_when_the_command_it_runs_under_ends() -> None:
    """``stop_with``: SIGTERM to this process once the watched one has ended (at once if it already has)."""
    from helpers import REPO

    command = subprocess.Popen(["sleep", "60"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    stage = subprocess.Popen([sys.executable, "-c", WATCHER, str(command.pid)], env=env, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert stage.stdout is not None and stage.stdout.readline().strip() == "watching"
        time.sleep(0.5)
        assert stage.poll() is None
        command.kill()  # still a zombie here: its parent (this test) has not reaped it yet
        assert stage.wait(timeout=10) == -signal.SIGTERM
    finally:
        command.kill()
        command.wait()
        stage.kill()
    late = subprocess.run([sys.executable, "-c", WATCHER, str(command.pid)], env=env, capture_output=True, text=True,
                          timeout=30)  # a command that is gone already: at once
    assert late.returncode == -signal.SIGTERM, late


def test_the_commands_a_stage_watches() -> None:
    """The pipeline command's pid, and DVC only when it leads the process group (a script that started
    ``dvc repro &`` and ended must not end the stage)."""
    from helpers import REPO

    code = "from flows.lifetime import command_pids; print(command_pids())"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for extra, expected in (({"DISTILL_PIPELINE_PID": "12345"}, "[12345]"), ({}, "[]")):
        out = subprocess.run(["bash", "-c", f"{sys.executable} -c '{code}'; true"], env={**env, **extra},
                             capture_output=True, text=True, start_new_session=True, check=True).stdout
        assert out.strip() == expected, out  # the group's leader is bash, not DVC


@pytest.fixture()
def held(fault_plugin: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen, str]]]:
    """``held(args, cwd, env, stage)``: start ``args`` (a session of its own) with ``stage`` held at its first
    step; returns (process, marker) once the stage is held. Whatever carries the marker is killed at the end."""
    started: list[tuple[subprocess.Popen, str]] = []

    def start(args: list[str], cwd: Path, env: dict[str, str], stage: str) -> tuple[subprocess.Popen, str]:
        marker = f"DISTILL_TEST_MARKER={uuid.uuid4().hex}"
        release, log = tmp_path / f"release-{len(started)}", tmp_path / f"held-{len(started)}.log"
        env = {**env, **fault_plugin, marker.split("=")[0]: marker.split("=")[1],
               "DISTILL_TEST_FAULT": f"{stage}:wait@1", "DISTILL_TEST_FAULT_FILE": str(release)}
        with open(log, "w") as out:
            proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        started.append((proc, marker))
        deadline = time.monotonic() + 600
        while not Path(f"{release}.waiting").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(0.2)
        proc.log = log  # type: ignore[attr-defined]
        return proc, marker

    yield start
    for proc, marker in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in processes_with(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stage_pid(marker: str, stage: str) -> int:
    (pid,) = [p for p in processes_with(marker)
              if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[-3:-1] == [b"stage", stage.encode()]]
    return pid


def _gone_within(marker: str, seconds: float) -> list[str]:
    """What still carries ``marker`` after ``seconds`` (their command lines, and what each waits in)."""
    deadline = time.monotonic() + seconds
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = []
    for pid in processes_with(marker):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            left.append(f"{pid}: {cmd} (waiting in {Path(f'/proc/{pid}/wchan').read_text()})")
        except OSError:
            pass
    return left


@pytest.fixture()
def project(committed_project: Path, tmp_path: Path) -> Path:
    return copy_project(committed_project, tmp_path / "project")


@pytest.mark.slow
def test_sigkill_of_a_stage_under_plain_dvc_repro_leaves_nothing(project, base_env, held):
    """No Prefect API anywhere: the stage starts a private server of its own, which dies with it."""
    proc, marker = held(["dvc", "repro", "-s", "-f", "teacher"], project, base_env, "teacher")
    assert len(processes_with(marker)) >= 3, "DVC, the stage and a Prefect server of the stage's own"
    os.kill(_stage_pid(marker, "teacher"), signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
    time.sleep(10)
    assert _gone_within(marker, 0) == [], proc.log.read_text()[-3000:]


@pytest.mark.slow
def test_ctrl_c_of_plain_dvc_repro_returns_promptly(project, base_env, held):
    proc, marker = held(["dvc", "repro", "-s", "-f", "teacher"], project, base_env, "teacher")
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the foreground process group
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`dvc repro` still running {time.monotonic() - t0:.0f} s after Ctrl-C: {_gone_within(marker, 0)}"
                    f"\n{proc.log.read_text()[-3000:]}")
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert elapsed < 30, f"`dvc repro` took {elapsed:.1f} s to return after Ctrl-C"
    assert _gone_within(marker, 10) == [], proc.log.read_text()[-3000:]


@pytest.mark.slow
def test_sigkill_of_the_pipeline_command_ends_dvc_and_its_stage(project, sub_env, held, run_cmd: Any):
    set_param(project, "student.tau", 7.0)
    proc, marker = held([sys.executable, "-m", "flows", "pipeline"], project, sub_env, "student")
    proc.kill()  # the pipeline's process alone, as `kill -9 <pid>` does
    proc.wait()
    left = _gone_within(marker, 20)
    assert left == [], f"outlived the pipeline command: {left}"
    again = run_cmd([sys.executable, "-m", "flows", "pipeline"], project, timeout=900, check=False)
    out = again.stdout + again.stderr
    assert again.returncode == 0 and "Running stage 'student'" in out, describe(again)
    assert "up to date" in run_cmd(["dvc", "status"], project).stdout
