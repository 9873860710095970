"""Variants never change the committed workspace (flows/pipeline.py, flows/workspace.py).

``python -m flows pipeline -S k=v`` runs the variant as a DVC experiment in a temporary copy: ``params.yaml``,
``dvc.lock`` and the outputs stay byte for byte as they were, and a value a stage rejects never reaches the
file. ``--apply`` writes the values into ``params.yaml`` in place (comments, ``null`` and inline lists kept,
which DVC's own rewrite loses) and runs in the workspace; a failed run puts the file back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import REPO, TINY_PARAMS, copy_project, describe

SAMPLE = """\
# a comment line
seed: 0
data:
  root: data/raw          # a comment after a value
  max_per_class: null     # null: all
  augment:                # a group
    scale: [0.35, 1.0]
    hflip: false
teacher:
  train:
    lr: 0.002
student:
  train:
    lr: 0.002             # the same key in another group
  alpha: 0.9              # weight of the distillation term
  tau: 1.0
"""


def test_set_values_changes_only_the_values_asked_for() -> None:
    from flows.workspace import set_values

    out = set_values(SAMPLE, {"student.train.lr": 0.0005, "data.max_per_class": 50, "data.augment.scale": [0.2, 1.0],
                              "student.alpha": None, "seed": 3})
    changed = [(a, b) for a, b in zip(SAMPLE.splitlines(), out.splitlines()) if a != b]
    assert changed == [
        ("seed: 0", "seed: 3"),
        ("  max_per_class: null     # null: all", "  max_per_class: 50       # null: all"),
        ("    scale: [0.35, 1.0]", "    scale: [0.2, 1.0]"),
        ("    lr: 0.002             # the same key in another group",
         "    lr: 0.0005            # the same key in another group"),
        ("  alpha: 0.9              # weight of the distillation term",
         "  alpha: null             # weight of the distillation term"),
    ]
    assert len(out.splitlines()) == len(SAMPLE.splitlines())


def test_set_values_refuses_what_it_cannot_write_in_place() -> None:
    from distill.config import ParamsError
    from flows.workspace import set_values

    with pytest.raises(ParamsError, match="cannot set data.augment in place: its value spans several lines"):
        set_values(SAMPLE, {"data.augment": {"scale": [0.2, 1.0]}})
    with pytest.raises(ParamsError, match="student.beta"):
        set_values(SAMPLE, {"student.beta": 1})


def test_apply_to_params_file_keeps_the_project_file_as_it_is_around_the_change(tmp_path: Path) -> None:
    from flows.workspace import apply_to_params_file

    path = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    path.write_text(text)
    assert apply_to_params_file(path, ["student.alpha=0.5", "data.augment.scale=[0.2, 1.0]"])
    new = path.read_text()
    assert yaml.safe_load(new)["student"]["alpha"] == 0.5 and yaml.safe_load(new)["data"]["augment"]["scale"] == [
        0.2, 1.0]
    assert sum(a != b for a, b in zip(text.splitlines(), new.splitlines())) == 2
    assert new.count("null") == text.count("null") and new.count("#") == text.count("#")
    assert not apply_to_params_file(path, ["student.alpha=0.5"])  # already so: the file is not rewritten


def test_apply_puts_the_file_back_when_the_run_fails(tmp_path: Path) -> None:
    from flows.pipeline import applied

    path = tmp_path / "params.yaml"
    path.write_text(SAMPLE)
    with pytest.raises(KeyboardInterrupt):
        with applied(path, ["student.alpha=0.5"]):
            assert "alpha: 0.5" in path.read_text()
            raise KeyboardInterrupt  # Ctrl-C, or a stage that failed
    assert path.read_text() == SAMPLE
    with applied(path, ["student.alpha=0.5"]):
        pass
    assert path.read_text() != SAMPLE and yaml.safe_load(path.read_text())["student"]["alpha"] == 0.5


def test_the_committed_params_only(tmp_path: Path, base_env: dict[str, str]) -> None:
    """The ``default`` deployment's guard: params.yaml as committed, or a refusal naming what changed."""
    from distill.config import ParamsError
    from flows.pipeline import check_committed

    path = tmp_path / "params.yaml"
    path.write_text(SAMPLE)
    for args in (["git", "init", "-q"], ["git", "add", "params.yaml"], ["git", "commit", "-qm", "params"]):
        subprocess.run(args, cwd=tmp_path, env=base_env, check=True)
    check_committed(path)
    path.write_text(SAMPLE.replace("alpha: 0.9", "alpha: 0.5"))
    with pytest.raises(ParamsError, match=r"differs from the committed one \(student.alpha\)"):
        check_committed(path)


# ----------------------------------------------------------------------------------------- for real
def _snapshot(project: Path, run_cmd: Any) -> dict[str, bytes]:
    """Every file git tracks, and every output DVC tracks, byte for byte."""
    tracked = run_cmd(["git", "ls-files", "-z"], project).stdout.split("\0")
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = [o["path"] for stage in lock["stages"].values() for o in stage.get("outs", [])]
    files = [p for p in tracked if p] + [str(p.relative_to(project)) for out in outs
                                         for p in ([project / out] if (project / out).is_file()
                                                   else sorted((project / out).rglob("*")))]
    return {f: (project / f).read_bytes() for f in files if (project / f).is_file()}


def _experiments(project: Path, run_cmd: Any) -> dict[str, dict[str, Any]]:
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], project).stdout)
    return {rev["name"]: rev["data"] for commit in shown for exp in commit.get("experiments") or []
            for rev in exp["revs"]}


def _pipeline(run_cmd: Any, project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "flows", "pipeline", *args], project, timeout=900, check=check)


@pytest.mark.slow
def test_a_variant_leaves_the_workspace_as_it_was(committed_project, run_cmd, tmp_path):
    project = copy_project(committed_project, tmp_path / "project")
    before = _snapshot(project, run_cmd)
    proc = _pipeline(run_cmd, project, "-S", "student.alpha=0.5", "--name", "variant")
    assert _snapshot(project, run_cmd) == before, "the variant changed the workspace"
    assert run_cmd(["git", "status", "--porcelain"], project).stdout == ""
    variant = _experiments(project, run_cmd)["variant"]
    assert variant["params"]["params.yaml"]["data"]["student"]["alpha"] == 0.5
    student = variant["metrics"]["metrics/evaluate.json"]["data"]["student"]["top1"]
    out = proc.stdout + proc.stderr
    assert "variant" in out and f"{100 * student:.2f}" in out, describe(proc)  # its figures, from DVC


@pytest.mark.slow
def test_a_value_a_stage_rejects_never_stays_in_params_yaml(committed_project, run_cmd, tmp_path):
    """As a variant the workspace stays as it was; with ``--apply``, params.yaml is put back byte for byte."""
    project = copy_project(committed_project, tmp_path / "project")
    before = _snapshot(project, run_cmd)
    proc = _pipeline(run_cmd, project, "-S", "student.model.preset=deit_micr", check=False)
    assert proc.returncode != 0 and "deit_micr" in proc.stdout + proc.stderr, describe(proc)
    assert _snapshot(project, run_cmd) == before, "the rejected variant changed the workspace"
    proc = _pipeline(run_cmd, project, "--apply", "-S", "student.model.preset=deit_micr", check=False)
    assert proc.returncode != 0 and "deit_micr" in proc.stdout + proc.stderr, describe(proc)
    assert (project / "params.yaml").read_bytes() == before["params.yaml"], "the rejected value stayed"


@pytest.mark.slow
def test_apply_writes_the_variant_in_place_and_runs_it_in_the_workspace(committed_project, run_cmd, tmp_path):
    from distill.checkpoint import read_metadata
    from flows.workspace import set_values

    project = copy_project(committed_project, tmp_path / "project")
    # the project's own params.yaml, with its comments, nulls and inline lists, at the tiny values
    text = set_values((REPO / "params.yaml").read_text(), TINY_PARAMS)
    assert yaml.safe_load(text) == yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(text)
    run_cmd(["git", "commit", "-qam", "params.yaml with its comments"], project)
    proc = _pipeline(run_cmd, project, "--apply", "-S", "student.alpha=0.5", "--name", "applied")
    new = (project / "params.yaml").read_text()
    assert new == set_values(text, {"student.alpha": 0.5}), describe(proc)
    ((old_line, new_line),) = [(a, b) for a, b in zip(text.splitlines(), new.splitlines()) if a != b]
    assert old_line.replace("alpha: 0.9", "alpha: 0.5") == new_line, (old_line, new_line)  # the comment in its column
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["student"]["params"]["params.yaml"]["student"]["alpha"] == 0.5
    assert read_metadata(project / "models" / "student.safetensors")["extra"]["params"]["student"]["alpha"] == 0.5
    assert _experiments(project, run_cmd)["applied"]["params"]["params.yaml"]["data"]["student"]["alpha"] == 0.5
    assert "up to date" in run_cmd(["dvc", "status"], project).stdout
