"""Sweeps (flows/sweep.py), fast: the grid and seeds as the command line gives them, the plan (which stages the
variants share, computed once in waves before they fan out), the ranking and report on validation accuracy, the
confirmation's held-out seeds, and the workspace lock that lets a sweep's temporary experiments run side by side.
The real runs are in tests/test_sweep_e2e.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from distill.config import ParamsError
from flows.seeds import confirmation
from flows.sweep import (
    CONFIRM_SEEDS,
    Plan,
    SweepError,
    make_plan,
    parse_axis,
    parse_seeds,
    plan_from_cli,
    rank,
    split_values,
    write_report,
)
from flows.workspace import WorkspaceBusy, workspace_lock

from helpers import REPO


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with the project's params.yaml and dvc.yaml (a plan reads nothing else)."""
    root = tmp_path / "project"
    (root / ".dvc").mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, root / name)
    return root


def test_values_split_at_top_level_commas_only() -> None:
    assert split_values("0.5,0.7, 0.9") == ["0.5", "0.7", "0.9"]
    assert split_values("[0.2, 1.0],[0.5, 1.0]") == ["[0.2, 1.0]", "[0.5, 1.0]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert parse_axis("student.alpha=0.5,0.7") == ("student.alpha", ["0.5", "0.7"])


@pytest.mark.parametrize("bad", ["student.alpha", "=0.5", "student.alpha=", "student.alpha=0.5,,0.7",
                                 "student.alpha=0.5,0.5"])
def test_an_axis_that_cannot_be_read_is_refused(bad: str) -> None:
    with pytest.raises(SweepError, match="sweep axis"):
        parse_axis(bad)


def test_seeds() -> None:
    assert parse_seeds("100-104") == [100, 101, 102, 103, 104]
    assert parse_seeds("1,3,5") == [1, 3, 5]
    assert parse_seeds("100-101,200") == [100, 101, 200]
    for bad in ("a-b", "", "1,1", "3-1"):
        with pytest.raises(SweepError):
            parse_seeds(bad)


def test_variants_that_change_only_the_student_share_teacher_store_and_baseline(project: Path) -> None:
    plan = plan_from_cli(project, ["student.alpha=0.5,0.7", "student.tau=1,2", "student.train.epochs=30"], "100")
    assert len(plan.variants) == 4 and plan.seeds == [100]
    # one run computes the teacher, the store and the baseline they all share
    assert [[j.targets for j in wave] for wave in plan.waves] == [[("teacher", "soft_labels", "baseline")]]
    shared = {j.name for wave in plan.waves for j in wave}
    assert all(v.needs == (f"{plan.sweep_id}-shared1",) for v in plan.variants) and len(shared) == 1
    assert all(v.targets == ("student", "baseline") for v in plan.variants)  # no variant reads the test split
    assert all("student.train.epochs=30" in v.overrides and "seed=100" in v.overrides for v in plan.variants)
    assert {v.config for v in plan.variants} == {"student.alpha=0.5 student.tau=1", "student.alpha=0.5 student.tau=2",
                                                 "student.alpha=0.7 student.tau=1", "student.alpha=0.7 student.tau=2"}
    assert len({v.name for v in plan.variants}) == 4 and all(v.name.startswith(plan.sweep_id) for v in plan.variants)


def test_what_the_baseline_reads_splits_it_and_seeds_split_everything(project: Path) -> None:
    # the baseline reads student.distillation (dvc.yaml), the store does not; every seed has its own data
    plan = plan_from_cli(project, ["student.alpha=0.5,0.7", "student.distillation=soft,hard"], "100-101")
    # per seed: one run for its teacher, store and first baseline (soft), one for the other baseline (hard); a
    # baseline reads no teacher, so all four go in wave 1
    assert [[j.targets for j in wave] for wave in plan.waves] == [
        [("teacher", "soft_labels", "baseline")] * 2 + [("baseline",)] * 2]
    for v in plan.variants:  # each variant needs its seed's teacher and store and its own baseline
        needed = [j for wave in plan.waves for j in wave if j.name in v.needs]
        assert {j.seed for j in needed} == {v.seed}
        assert {t for j in needed for t in j.targets} == {"baseline", "soft_labels", "teacher"}
        own = [j for j in needed if "baseline" in j.targets and j.config.split()[1] == v.config.split()[1]]
        assert len(own) == 1  # the run that computes its baseline (the same distillation)
    assert plan.waves_for([]) == []
    one = plan.variants[0]
    assert [len(w) for w in plan.waves_for([one])] == [1]
    hard = next(v for v in plan.variants if "hard" in v.config)
    assert [[j.targets for j in w] for w in plan.waves_for([hard])] == [[("teacher", "soft_labels", "baseline"),
                                                                           ("baseline",)]]


def test_a_store_on_a_shared_teacher_waits_for_it(project: Path) -> None:
    # soft_labels.views splits the store, not the teacher: the second store runs after the teacher's run
    plan = plan_from_cli(project, ["soft_labels.views=2,3", "student.alpha=0.5,0.7"], "100")
    assert [[j.targets for j in wave] for wave in plan.waves] == [[("teacher", "soft_labels", "baseline")],
                                                                  [("soft_labels",)]]
    late = plan.waves[1][0]
    assert "soft_labels.views=3" in late.overrides
    first = plan.waves[0][0].name
    assert all({late.name, first} <= set(v.needs) for v in plan.variants if "views=3" in v.config)


def test_a_sweep_over_seeds_shares_nothing(project: Path) -> None:
    plan = make_plan(project, [], [1, 2, 3], ["student.alpha=0.6"], targets=())
    assert plan.waves == [] and [v.seed for v in plan.variants] == [1, 2, 3]
    assert all(v.targets == () and v.overrides[0] == "student.alpha=0.6" for v in plan.variants)


def test_the_same_sweep_has_the_same_id_and_another_one_another(project: Path) -> None:
    first = plan_from_cli(project, ["student.alpha=0.5,0.7"], "1-2")
    assert plan_from_cli(project, ["student.alpha=0.5,0.7"], "1-2").sweep_id == first.sweep_id
    assert plan_from_cli(project, ["student.alpha=0.5,0.7"], "1-3").sweep_id != first.sweep_id
    assert plan_from_cli(project, ["student.alpha=0.5,0.8"], "1-2").sweep_id != first.sweep_id
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("tau: 1.0", "tau: 2.0"))
    assert plan_from_cli(project, ["student.alpha=0.5,0.7"], "1-2").sweep_id != first.sweep_id
    mine = plan_from_cli(project, ["student.alpha=0.5,0.7"], "1-2", sweep_id="mine").variants
    assert re.fullmatch(r"mine-[0-9a-f]{6}-s1", mine[0].name)
    # the same --id with a value added in front: the finished variants keep their names, the new one has its own
    grown = plan_from_cli(project, ["student.alpha=0.3,0.5,0.7"], "1-2", sweep_id="mine").variants
    assert {v.name for v in mine} < {v.name for v in grown} and len({v.name for v in grown}) == 6
    assert {v.name: v.config for v in mine}.items() <= {v.name: v.config for v in grown}.items()


@pytest.mark.parametrize("sets, match", [(["seed=1,2"], "--seeds"), (["student.alpha=0.5,0.7", "student.alpha=0.9,1"],
                                                                       "swept twice")])
def test_a_grid_that_cannot_run_is_refused(project: Path, sets: list[str], match: str) -> None:
    with pytest.raises(SweepError, match=match):
        plan_from_cli(project, sets, "1")


def test_a_value_the_schema_refuses_is_refused_before_anything_runs(project: Path) -> None:
    with pytest.raises(ParamsError, match="student.alpha"):
        plan_from_cli(project, ["student.alpha=0.5,7"], "1")


def _found(plan: Plan, student: dict[str, list[float]], baseline: float = 0.5) -> dict:
    found = {}
    for v in plan.variants:
        values = student.get(v.config)
        if values and plan.seeds.index(v.seed) < len(values):
            acc = values[plan.seeds.index(v.seed)]
            found[v.name] = {"config": v.config, "seed": v.seed, "experiment": v.name,
                             "val": {"student": acc, "baseline": baseline, "gain": acc - baseline}}
    return found


def test_the_report_ranks_on_validation_with_intervals_and_names_what_failed(project: Path, tmp_path: Path) -> None:
    plan = plan_from_cli(project, ["student.alpha=0.5,0.7,0.9"], "1-3")
    found = _found(plan, {"student.alpha=0.5": [0.6, 0.62, 0.64], "student.alpha=0.7": [0.7, 0.72, 0.74],
                          "student.alpha=0.9": [0.65, 0.66]})  # alpha 0.9's third seed failed
    failed = plan.variants[-1].name
    rows = rank(plan, found, {failed: "Crashed: no heartbeat"})
    assert [r["config"] for r in rows] == ["student.alpha=0.7", "student.alpha=0.9", "student.alpha=0.5"]
    assert rows[0]["student"]["mean"] == pytest.approx(0.72) and rows[0]["seeds"] == [1, 2, 3]
    low, high = rows[0]["student"]["ci95"]
    assert low < 0.72 < high
    assert rows[1]["failed"] == {failed: "Crashed: no heartbeat"} and rows[1]["seeds"] == [1, 2]
    text = write_report(tmp_path / "reports", plan, rows)
    assert text.index("student.alpha=0.7") < text.index("student.alpha=0.9") < text.index("student.alpha=0.5")
    assert "72.00 [" in text and f"{failed}: failed (Crashed: no heartbeat)" in text
    assert "VALIDATION" in text and "top1" not in text and "test acc" not in text
    saved = json.loads((tmp_path / "reports" / "sweep.json").read_text())
    assert saved["split"] == "validation" and saved["ranking"][0]["overrides"] == ["student.alpha=0.7"]
    assert (tmp_path / "reports" / "figures" / "sweep_val.png").stat().st_size > 1000
    assert plan.sweep_id in text and "tags.\"distill.sweep\"" in text  # the MLflow search filter


def test_the_confirmation_runs_the_best_on_held_out_seeds_only(project: Path, tmp_path: Path) -> None:
    plan = plan_from_cli(project, ["student.alpha=0.5,0.7", "student.train.epochs=30"], "1-2")
    write_report(tmp_path, plan, rank(plan, _found(plan, {"student.alpha=0.5": [0.8, 0.8],
                                                          "student.alpha=0.7": [0.6, 0.6]}), {}))
    seeds = [CONFIRM_SEEDS, CONFIRM_SEEDS + 1]
    assert confirmation(tmp_path / "sweep.json", seeds, ["evaluate.batch_size=64"]) == [
        "student.train.epochs=30", "student.alpha=0.5", "evaluate.batch_size=64"]
    with pytest.raises(SweepError, match="held-out seeds >= 1000"):
        confirmation(tmp_path / "sweep.json", [1, CONFIRM_SEEDS], [])
    with pytest.raises(SweepError, match="run `python -m flows sweep` first"):
        confirmation(tmp_path / "missing.json", seeds, [])


HOLD = """
import sys, time
from flows.workspace import workspace_lock
with workspace_lock(sys.argv[1], "holder " + sys.argv[2], shared=sys.argv[2] == "shared"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(project: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(project), mode], env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_temporary_experiments_share_the_workspace_and_a_workspace_pipeline_is_refused(project: Path) -> None:
    shared = _holder(project, "shared")
    try:
        with workspace_lock(project, "a second variant", shared=True):  # side by side
            pass
        with pytest.raises(WorkspaceBusy, match="holder shared"):
            with workspace_lock(project, "a pipeline in the workspace"):
                pytest.fail("a workspace pipeline ran beside a sweep's variants")
    finally:
        shared.send_signal(signal.SIGKILL)
        shared.wait()
    exclusive = _holder(project, "exclusive")
    try:
        with pytest.raises(WorkspaceBusy, match="holder exclusive"):
            with workspace_lock(project, "a variant", shared=True):
                pytest.fail("a variant ran beside a workspace pipeline")
    finally:
        exclusive.send_signal(signal.SIGKILL)
        exclusive.wait()
    with workspace_lock(project, "a sweep", shared=True):
        with workspace_lock(project, "its variant in this process", shared=True):
            pass
        with pytest.raises(WorkspaceBusy, match="cannot run inside it"):
            with workspace_lock(project, "a workspace pipeline inside the sweep"):
                pass


def test_one_variant_at_a_time_needs_no_shared_runs_and_side_by_side_variants_share_the_cores(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.sweep as sweep

    plan = plan_from_cli(project, ["student.alpha=0.5,0.6,0.7,0.8"], "100")
    calls: list[tuple[list[str], object]] = []
    monkeypatch.setattr(sweep, "run_here", lambda jobs, parameters, threads=None: calls.append(
        ([j.name for j in jobs], threads)) or {})
    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: set(range(4)))
    names = [v.name for v in plan.variants]
    failures, ran = sweep._run_all(plan, plan.variants, lambda job, attempt: {}, pool=None, window=50, jobs=1)
    # serial: the first variant computes teacher, store and baseline, the others restore them; no shared run
    assert calls == [(names, None)] and ran == names and failures == {}
    calls.clear()
    failures, ran = sweep._run_all(plan, plan.variants, lambda job, attempt: {}, pool=None, window=50, jobs=2)
    # side by side: the shared run alone first (all cores), then the variants with half the cores each
    assert calls == [([f"{plan.sweep_id}-shared1"], None), (names, 2)]
    assert ran == [f"{plan.sweep_id}-shared1", *names]
    assert sweep._with_threads({"sweep": {"id": "s"}}, 2) == {"sweep": {"id": "s", "threads": 2}}
    assert sweep._with_threads({"sweep": {"id": "s"}}, None) == {"sweep": {"id": "s"}}


def test_a_variant_side_by_side_gets_its_share_of_threads_unless_the_user_set_them(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.pipeline import _stage_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _stage_env(project, "run", {"variant": "v", "threads": 1})["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in _stage_env(project, "run", {"variant": "v"})
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _stage_env(project, "run", {"variant": "v", "threads": 1})["OMP_NUM_THREADS"] == "3"


def test_a_sweep_on_params_a_stage_would_reject_stops_before_any_variant(
        tiny_project: Path, run_cmd: Any, tmp_path: Path) -> None:
    """The sweep's pre-flight (its own process, beside the sweep's start-up) still stops it before anything runs."""
    from helpers import set_param

    project = tmp_path / "project"
    run_cmd(["git", "clone", "-q", str(tiny_project), str(project)], tmp_path)
    set_param(project, "data.name", "fashion_mnist")
    set_param(project, "data.root", str(tmp_path / "no-such-folder"))
    proc = run_cmd([sys.executable, "-m", "flows", "sweep", "-S", "student.alpha=0.5,0.7", "--seeds", "100"],
                   project, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "would reject" in proc.stderr and "set data.root" in proc.stderr, proc.stderr
    assert not (project / "mlflow.db").exists() and not (project / "reports" / "sweep.json").exists()
