"""One pipeline at a time in a workspace (flows/workspace.py): the workspace lock, in unit tests and for real.

The real test starts two ``python -m flows pipeline`` in one DVC project while the first one's student stage is
held at a step (the fault plug-in's ``wait``, tests/faults.py): the second must stop at once naming the first,
touch nothing, and the first must end with its experiment saved and a ``dvc.lock`` that says what trained.
(Before the lock, the second's ``dvc exp run -S`` rewrote params.yaml and dvc.lock under the first, which then
recorded the second's params and failed at its end with ``'NoneType' object is not subscriptable``.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from flows.workspace import LOCK_FILE, WorkspaceBusy, held, workspace_lock

from helpers import REPO, copy_project, describe, processes_with, set_param

HOLD = """
import sys, time
from flows.workspace import workspace_lock
with workspace_lock(sys.argv[1], "the holder's command"):
    print("held", flush=True)
    time.sleep(600)
"""


def _dvc_project(path: Path) -> Path:
    (path / ".dvc").mkdir(parents=True)
    return path


def _start_holder(project: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(project)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    project = _dvc_project(tmp_path / "project")
    holder = _start_holder(project)
    try:
        with pytest.raises(WorkspaceBusy) as refused:
            with workspace_lock(project, "the second"):
                pytest.fail("the lock was taken twice")
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and "`the holder's command`" in message, message
        assert "since 20" in message and "Nothing was changed" in message, message
    finally:
        holder.send_signal(signal.SIGKILL)  # however the holder ends, the kernel releases the lock
        holder.wait()
    with workspace_lock(project, "the next one"):
        assert held(project)
        with workspace_lock(project, "the same process again"):  # re-entrant: a flow run inside the command
            assert held(project)
        assert held(project)
    assert not held(project)
    assert json.loads((project / LOCK_FILE).read_text())["command"] == "the next one"


def test_a_folder_that_is_not_a_dvc_repository_is_refused(tmp_path: Path) -> None:
    from distill.config import ParamsError

    with pytest.raises(ParamsError, match="not a DVC repository"):
        with workspace_lock(tmp_path, "x"):
            pass
    assert not (tmp_path / ".dvc").exists()


def test_the_pipeline_command_stops_at_once_when_the_workspace_is_held(tmp_path: Path) -> None:
    """The CLI takes the lock before it starts a Prefect server, reads params.yaml's values into DVC, or runs DVC."""
    project = _dvc_project(tmp_path / "project")
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (project / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    before = {p.name: p.read_bytes() for p in project.iterdir() if p.is_file()}
    holder = _start_holder(project)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "flows", "pipeline", "-S", "student.tau=8.0"], cwd=project,
                              env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, describe(proc)
    assert f"another pipeline is running in {project}: pid {holder.pid}" in proc.stderr, describe(proc)
    assert elapsed < 30, f"took {elapsed:.1f} s"
    assert {p.name: p.read_bytes() for p in project.iterdir() if p.is_file()} == before


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _student_params_in_lock(project: Path) -> dict:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return lock["stages"]["student"]["params"]["params.yaml"]


@pytest.mark.slow
def test_two_pipelines_at_once_the_second_is_refused_and_the_lineage_holds(committed_project, sub_env, fault_plugin,
                                                                           run_cmd, tmp_path):
    from distill.checkpoint import read_metadata

    project = copy_project(committed_project, tmp_path / "project")
    set_param(project, "student.tau", 7.0)
    run_cmd(["git", "commit", "-qam", "tau 7"], project)
    release, log = tmp_path / "release", tmp_path / "first.log"
    marker = uuid.uuid4().hex
    env = {**sub_env, **fault_plugin, "DISTILL_TEST_FAULT": "student:wait@1", "DISTILL_TEST_FAULT_FILE": str(release),
           "DISTILL_TEST_MARKER": marker}
    with open(log, "w") as out:
        first = subprocess.Popen([sys.executable, "-m", "flows", "pipeline", "--name", "first"], cwd=project, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not Path(f"{release}.waiting").exists():  # the first is training the student
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(0.2)
        watched = ("params.yaml", "dvc.lock", "models/student.safetensors", "metrics/student.json", "plots/student.csv",
                   "metrics/evaluate.json")  # (DVC deleted the student's outputs before running it)
        before = {p: _read(project / p) for p in watched}
        t0 = time.monotonic()
        second = run_cmd([sys.executable, "-m", "flows", "pipeline", "-S", "student.tau=8.0", "--name", "second"],
                         project, check=False, timeout=300)
        elapsed = time.monotonic() - t0
        assert second.returncode != 0, describe(second)
        assert f"another pipeline is running in {project}: pid {first.pid}" in second.stderr, describe(second)
        assert "python -m flows pipeline --name first" in second.stderr, describe(second)
        assert elapsed < 30, f"the second took {elapsed:.1f} s to stop"
        assert {p: _read(project / p) for p in watched} == before, "the refused command changed the workspace"
        release.touch()
        assert first.wait(timeout=900) == 0, log.read_text()[-6000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        for pid in processes_with(f"DISTILL_TEST_MARKER={marker}"):  # DVC runs in a process group of its own
            os.kill(pid, signal.SIGKILL)
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], project).stdout)
    names = [rev.get("name") for commit in shown for exp in commit.get("experiments") or [] for rev in exp["revs"]]
    assert "first" in names and "second" not in names, names
    recorded = _student_params_in_lock(project)
    trained = read_metadata(project / "models" / "student.safetensors")["extra"]["params"]
    assert recorded["student"]["tau"] == trained["student"]["tau"] == 7.0, (recorded, trained)
    assert "up to date" in run_cmd(["dvc", "status"], project).stdout
