"""Sweeps for real (flows/sweep.py): ``python -m flows sweep`` in a throw-away git + DVC project, on the session's
``prefect server start``, with the project's own MLflow store.

* Here (``--jobs 2``): two alpha variants share one teacher, one store and one baseline, computed once; every run
  carries the sweep's tag under one sweep parent run; the workspace stays as committed; the same sweep again runs
  nothing.
* On a work pool with two real ``prefect worker start --pool ... --limit 1``: a 2x2 sweep finishes although one
  "machine" dies while its variant trains (its worker and every process the worker started, SIGKILL: Prefect's
  flow-run process outlives a killed worker, in a session of its own; its flow run, without heartbeats, is
  marked Crashed by the zombie automation and submitted again); DVC and MLflow show the shared
  teacher and store computed once; the report lists all 4 variants; submitting the sweep again starts no flow run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import describe, dvc_experiments, mlflow_client, set_param, stop_process_group

pytestmark = pytest.mark.slow

#: Smaller than the session's tiny project: 12 images per class, no unlabeled images, the smallest models.
SMALLER = {"data.max_per_class": 12, "data.unlabeled": False, "teacher.width": 4, "teacher.blocks": 1,
           "teacher.train.batch_size": 32, "student.model.preset": "deit_nano", "student.train.batch_size": 32}
POOL = "distill-sweep-test"


@pytest.fixture
def project(tiny_project: Path, run_cmd: Any, tmp_path: Path) -> Path:
    path = tmp_path / "project"
    run_cmd(["git", "clone", "-q", str(tiny_project), str(path)], tmp_path)
    for key, value in SMALLER.items():
        set_param(path, key, value)
    run_cmd(["git", "commit", "-qam", "smaller"], path)
    return path


def sweep(run_cmd: Any, project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = run_cmd([sys.executable, "-m", "flows", "sweep", *args], project, timeout=1500, check=False, env=env)
    assert proc.returncode == 0, describe(proc)
    return proc


def sweep_runs(project: Path, sweep_id: str) -> list[Any]:
    from mlflow.entities import ViewType

    client = mlflow_client(project)
    experiment = client.get_experiment_by_name("distill")
    return client.search_runs([experiment.experiment_id], f"tags.`distill.sweep` = '{sweep_id}'",
                              run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)


def stage_count(runs: list[Any], stage: str) -> int:
    return sum(r.data.tags.get("distill.stage") == stage and r.info.status == "FINISHED" for r in runs)


def report(project: Path) -> dict[str, Any]:
    return json.loads((project / "reports" / "sweep.json").read_text())


def test_a_sweep_here_computes_shared_stages_once_and_runs_only_what_is_missing(project: Path, run_cmd: Any) -> None:
    params = (project / "params.yaml").read_bytes()
    proc = sweep(run_cmd, project, "-S", "student.alpha=0.5,0.7", "--seeds", "100", "--jobs", "2")
    sweep_id = report(project)["sweep"]
    runs = sweep_runs(project, sweep_id)
    assert {stage: stage_count(runs, stage) for stage in ("data", "teacher", "soft_labels", "baseline", "student")} \
        == {"data": 1, "teacher": 1, "soft_labels": 1, "baseline": 1, "student": 2}, proc.stdout
    assert stage_count(runs, "evaluate") == 0  # a variant never reads the test split
    [parent] = [r for r in runs if r.data.tags.get("distill.role") == "sweep"]
    variants = [r for r in runs if not r.data.tags.get("distill.variant", "").startswith(f"{sweep_id}-shared")
                and r.data.tags.get("distill.role") == "pipeline"]
    assert len(variants) == 2 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in variants)
    assert all(0 <= r.data.metrics["val.student"] <= 1 and "val.gain" in r.data.metrics for r in variants)
    rows = report(project)["ranking"]
    assert sorted(r["config"] for r in rows) == ["student.alpha=0.5", "student.alpha=0.7"]
    assert rows[0]["student"]["mean"] >= rows[1]["student"]["mean"] and all(r["seeds"] == [100] for r in rows)
    assert "sweep.md" in os.listdir(project / "reports") and (project / "reports/figures/sweep_val.png").is_file()
    assert (project / "params.yaml").read_bytes() == params  # the workspace is as committed
    assert not list((project / ".state" / "sweeps").glob("*/*/*"))  # finished: no resume state left
    experiments = dvc_experiments(project, run_cmd)

    again = sweep(run_cmd, project, "-S", "student.alpha=0.5,0.7", "--seeds", "100", "--jobs", "2")
    assert "2 finished before, 0 to run" in again.stdout + again.stderr, describe(again)  # Prefect logs: stderr
    assert len(sweep_runs(project, sweep_id)) == len(runs)  # no new run
    assert dvc_experiments(project, run_cmd) == experiments


@pytest.fixture
def pool(project: Path, run_cmd: Any) -> dict[str, str]:
    """The variant deployment of prefect.yaml registered on its own work pool (the deployment test has the default)."""
    env = {"DISTILL_PROJECT_DIR": str(project)}
    run_cmd(["prefect", "work-pool", "create", POOL, "--type", "process", "--overwrite"], project, timeout=120)
    run_cmd(["prefect", "deploy", "--name", "variant", "--pool", POOL, "--no-prompt"], project, env=env, timeout=300)
    return env


@pytest.fixture
def workers(pool: dict[str, str], project: Path, sub_env: dict[str, str], fault_plugin: dict[str, str],
            tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen, Path]]]:
    """Two real ``prefect worker start --pool ... --limit 1``, each in its own process group; always stopped."""
    started = []
    for name in ("a", "b"):
        log = tmp_path / f"worker-{name}.log"
        env = {**sub_env, **pool, "PREFECT_WORKER_QUERY_SECONDS": "2"}
        if name == "a":  # its first student holds at its first step (tests/faults.py) until the worker is killed
            env.update({**fault_plugin, "DISTILL_TEST_FAULT": "student:wait@1",
                        "DISTILL_TEST_FAULT_FILE": str(tmp_path / "release")})
        with open(log, "w") as out:
            started.append((subprocess.Popen(["prefect", "worker", "start", "--pool", POOL, "--limit", "1",
                                              "--name", f"sweep-test-{name}"], cwd=project, env=env, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True), log))
    try:
        yield started
    finally:
        for proc, _ in started:  # its flow runs too: Prefect starts each in a session of its own
            if proc.poll() is None:
                _kill_tree(proc)


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in (e for e in Path("/proc").iterdir() if e.name.isdigit()):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _kill_machine_when_it_trains(worker: subprocess.Popen, waiting: Path, deadline: float) -> None:
    """Once the worker's variant holds its student at the first step: SIGKILL the worker and everything it started,
    every process group (Prefect's flow-run process, DVC and the stage each have their own), as a dying machine."""
    while time.monotonic() < deadline and not waiting.exists():
        time.sleep(1)
    assert waiting.exists(), "worker a never trained a variant's student"
    _kill_tree(worker)


def _kill_tree(worker: subprocess.Popen) -> None:
    groups = set()
    for pid in _descendants(worker.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    worker.wait()


def test_a_sweep_on_a_work_pool_survives_a_killed_worker(project: Path, run_cmd: Any, sub_env: dict[str, str],
                                                         workers: list[tuple[subprocess.Popen, Path]],
                                                         tmp_path: Path) -> None:
    args = [sys.executable, "-m", "flows", "sweep", "-S", "student.alpha=0.5,0.7", "-S", "student.tau=1,2",
            "--seeds", "100", "--pool", POOL]
    env = {**sub_env, "DISTILL_SWEEP_ZOMBIE_S": "60"}
    with open(project.parent / "sweep.log", "w") as out:
        proc = subprocess.Popen(args, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _kill_machine_when_it_trains(workers[0][0], tmp_path / "release.waiting", time.monotonic() + 900)
        rc = proc.wait(timeout=1500)
    finally:
        stop_process_group(proc)
    output = (project.parent / "sweep.log").read_text()
    context = f"{output[-6000:]}\n--- killed worker ---\n{workers[0][1].read_text()[-3000:]}"
    assert rc == 0, context
    assert "submitted again" in output, context  # the killed worker's variant ran again
    rows = report(project)["ranking"]
    assert len(rows) == 4 and all(r["seeds"] == [100] and not r["failed"] for r in rows), rows
    sweep_id = report(project)["sweep"]
    runs = sweep_runs(project, sweep_id)
    assert stage_count(runs, "teacher") == 1 and stage_count(runs, "soft_labels") == 1, context
    assert stage_count(runs, "student") >= 4
    shared = [name for name in dvc_experiments(project, run_cmd) if name.startswith(f"{sweep_id}-shared")]
    assert len(shared) == 1  # DVC: one experiment computed teacher, store and baseline; the variants restored them

    again = sweep(run_cmd, project, *args[4:], env={"DISTILL_SWEEP_ZOMBIE_S": "60"})
    logged = again.stdout + again.stderr
    assert "4 finished before, 0 to run" in logged and "(attempt" not in logged, describe(again)


def _student_trainings(steps_file: Path) -> list[list[int]]:
    """Per student process of the test (tests/faults.py's steps files): its trainings' first global steps, and its
    last step at the end: ``[first, ..., last]``."""
    out = []
    for path in sorted(steps_file.parent.glob(f"{steps_file.name}.*")):
        stage, starts, last = path.read_text().split()
        if stage == "student":
            out.append([*map(int, starts.split(",")), int(last)])
    return out


def test_a_failed_variant_is_retried_from_its_last_epoch_and_one_that_keeps_failing_is_reported(
        project: Path, run_cmd: Any, fault_plugin: dict[str, str], tmp_path: Path) -> None:
    steps = tmp_path / "steps" / "s"
    steps.parent.mkdir()
    # 120 images in full batches of 32: 3 steps per epoch, 2 epochs; the first student dies in its second epoch
    env = {**fault_plugin, "DISTILL_TEST_FAULT": "student:kill@5", "DISTILL_TEST_FAULT_ONCE": str(tmp_path / "once"),
           "DISTILL_TEST_STEPS_FILE": str(steps)}
    proc = sweep(run_cmd, project, "-S", "student.alpha=0.5,0.7", "--seeds", "100", "--jobs", "1", "--id", "faults",
                 env=env)
    assert (tmp_path / "once").exists(), describe(proc)  # the fault fired
    rows = report(project)["ranking"]
    assert len(rows) == 2 and not any(r["failed"] for r in rows), rows
    trainings = _student_trainings(steps)
    assert sorted(trainings) == [[1, 5], [1, 6], [4, 6]], trainings  # killed at 5; attempt 2 began at epoch 2
    assert not list((project / ".state" / "sweeps").glob("*/*/*"))

    # the same sweep with another value, and a student that always crashes: both attempts of the new variant fail,
    # the finished one is not run again, the report names the failure
    env = {**fault_plugin, "DISTILL_TEST_FAULT": "student:kill@2"}
    failed = run_cmd([sys.executable, "-m", "flows", "sweep", "-S", "student.alpha=0.5,0.9", "--seeds", "100",
                      "--jobs", "1", "--id", "faults"], project, timeout=1500, check=False, env=env)
    assert failed.returncode == 1, describe(failed)
    rows = {r["config"]: r for r in report(project)["ranking"]}
    assert rows["student.alpha=0.9"]["failed"] and "student" not in rows["student.alpha=0.9"], rows
    assert not rows["student.alpha=0.5"]["failed"] and rows["student.alpha=0.5"]["student"]["mean"] > 0, rows
    assert "alpha=0.9" in (project / "reports" / "sweep.md").read_text()


def test_a_dvc_remote_gives_another_machine_the_shared_stages(project: Path, run_cmd: Any, tmp_path: Path) -> None:
    """Two checkouts with caches of their own ("machines") and one local-directory DVC remote: what the first
    computed, the second restores (its MLflow store shows only its student trained)."""
    other_remote = run_cmd([sys.executable, "-m", "flows", "sweep", "-S", "student.alpha=0.5", "--seeds", "100",
                            "--remote", "shared"], project, check=False)
    assert other_remote.returncode != 0 and "dvc remote add -d shared" in other_remote.stderr, describe(other_remote)
    run_cmd(["dvc", "remote", "add", "shared", str(tmp_path / "remote")], project)
    not_default = run_cmd([sys.executable, "-m", "flows", "sweep", "-S", "student.alpha=0.5", "--seeds", "100",
                           "--remote", "shared"], project, check=False)
    assert not_default.returncode != 0 and "dvc remote default shared" in not_default.stderr, describe(not_default)
    run_cmd(["dvc", "remote", "default", "shared"], project)
    run_cmd(["git", "commit", "-qam", "a shared DVC remote"], project)
    other = tmp_path / "other"
    run_cmd(["git", "clone", "-q", str(project), str(other)], tmp_path)
    assert not (other / ".dvc" / "cache").exists()

    sweep(run_cmd, project, "-S", "student.alpha=0.5", "--seeds", "100", "--remote", "shared", "--id", "machine-a")
    assert any((tmp_path / "remote").rglob("*")), "nothing was pushed to the remote"
    proc = sweep(run_cmd, other, "-S", "student.alpha=0.7", "--seeds", "100", "--remote", "shared", "--id", "machine-b")
    runs = sweep_runs(other, "machine-b")
    counts = {stage: stage_count(runs, stage) for stage in ("data", "teacher", "soft_labels", "baseline", "student")}
    assert counts == {"data": 0, "teacher": 0, "soft_labels": 0, "baseline": 0, "student": 1}, describe(proc)
    assert report(other)["ranking"][0]["student"]["mean"] > 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_stopping_a_sweep_here_stops_its_variants(project: Path, sub_env: dict[str, str], fault_plugin: dict[str, str],
                                                  tmp_path: Path) -> None:
    """SIGTERM (as Ctrl-C) to a sweep whose two variants train: it ends, their students' processes end with it, no
    variant is recorded as finished, and no retry starts a variant after the stop."""
    steps = tmp_path / "steps" / "s"
    steps.parent.mkdir()
    release = tmp_path / "release"
    env = {**sub_env, **fault_plugin, "DISTILL_TEST_FAULT": "student:wait@1", "DISTILL_TEST_FAULT_FILE": str(release),
           "DISTILL_TEST_STEPS_FILE": str(steps)}
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows", "sweep", "-S", "student.alpha=0.5,0.7", "--seeds",
                                 "100", "--jobs", "2", "--id", "stopped"], cwd=project, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        students: set[int] = set()
        while len(students) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            students = {int(p.name.rsplit(".", 1)[1]) for p in steps.parent.glob("s.*")
                        if p.read_text().startswith("student")}
        assert len(students) == 2, log.read_text()[-4000:]
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=180)
        time.sleep(5)  # what a retry would start, it starts now
        started_after = {int(p.name.rsplit(".", 1)[1]) for p in steps.parent.glob("s.*")
                         if p.read_text().startswith("student")} - students
    finally:
        stop_process_group(proc)
    output = log.read_text()
    assert rc != 0, output[-4000:]
    assert not [pid for pid in students if _alive(pid)], output[-4000:]
    assert not started_after, output[-4000:]
    finished = [r for r in sweep_runs(project, "stopped") if r.data.tags.get("distill.role") == "pipeline"
                and r.info.status == "FINISHED" and not r.data.tags.get("distill.variant", "").endswith("-shared1")]
    assert not [r for r in finished if "val.student" in r.data.metrics], output[-4000:]
