"""What an edit can rerun: the rules of the rerun matrix, as deps that ``dvc.yaml`` must never list.

A stage's deps are its import closure (``tests/test_dvc_deps.py``), so what a module imports decides what an edit
of it reruns (``python scripts/rerun_matrix.py`` prints the whole matrix). The rules follow the data flow:

* the teacher never depends on the student's model file or the soft-label store (a DeiT edit must not retrain
  the CNN teacher, nor a store edit);
* soft_labels never depends on the training loop, the losses or the student's model (it runs the teacher once);
* the baseline never depends on the store (it learns from labels only);
* only the data stage depends on the preparation of raw data, and ``check_params``, which runs the data stage's
  own planning (no image decoded) so that a bad data setting stops before DVC deletes ``data/prepared``; its
  output never changes, so it reruns nothing after it.

Each rule also checks that the file it names exists and that the stages whose data flow uses it do list it, so
a renamed module cannot make a rule pass by naming nothing.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from distill.config import dvc_stages

REPO = Path(__file__).resolve().parents[1]
DEIT, STORE, ENGINE, LOSSES, PREPARATION = ("distill/models/deit.py", "distill/store.py", "distill/engine.py",
                                            "distill/losses.py", "distill/prepare.py")
#: stage -> library files it must never depend on.
FORBIDDEN = {"teacher": {DEIT, STORE}, "soft_labels": {ENGINE, LOSSES, DEIT}, "baseline": {STORE}}
#: library file -> the stages that may depend on it (no other may).
ONLY = {PREPARATION: {"check_params", "data"}}
#: library file -> stages whose data flow uses it: they must list it (the rules above then name a real dep).
USED_BY = {DEIT: {"student", "baseline"}, STORE: {"soft_labels", "student"}, ENGINE: {"teacher", "student"},
           LOSSES: {"teacher", "student", "baseline"}, PREPARATION: {"data"}}


def violations(dvc_yaml: str | Path) -> list[str]:
    """Every way ``dvc_yaml``'s deps break the rules (module docstring); empty when it keeps them all."""
    deps = {name: {str(next(iter(d))) if isinstance(d, dict) else str(d) for d in spec.get("deps") or []}
            for name, spec in dvc_stages(dvc_yaml).items()}
    found = []
    for stage, files in FORBIDDEN.items():
        found += [f"{stage} depends on {f}" for f in sorted(files & deps.get(stage, set()))]
    for file, allowed in ONLY.items():
        found += [f"{stage} depends on {file} (only {', '.join(sorted(allowed))} may)"
                  for stage in deps if file in deps[stage] and stage not in allowed]
    for file, users in USED_BY.items():
        if not (REPO / file).is_file():
            found.append(f"{file} does not exist: the rules name a module that is not there")
        found += [f"{stage} does not list {file}, which its data flow uses" for stage in sorted(users)
                  if file not in deps.get(stage, set())]
    return found


def test_dvc_yaml_keeps_the_rerun_rules() -> None:
    assert violations(REPO / "dvc.yaml") == []


def test_each_rule_catches_the_dep_it_forbids(tmp_path: Path) -> None:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    spec["stages"]["teacher"]["deps"].append(STORE)
    spec["stages"]["soft_labels"]["deps"].append(ENGINE)
    spec["stages"]["baseline"]["deps"].append(STORE)
    spec["stages"]["evaluate"]["deps"].append(PREPARATION)
    spec["stages"]["data"]["deps"].remove(PREPARATION)
    broken = tmp_path / "dvc.yaml"
    broken.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert violations(broken) == [f"teacher depends on {STORE}", f"soft_labels depends on {ENGINE}",
                                  f"baseline depends on {STORE}",
                                  f"evaluate depends on {PREPARATION} (only check_params, data may)",
                                  f"data does not list {PREPARATION}, which its data flow uses"]


def test_the_matrix_command_prints_each_library_dep_with_the_stages_that_list_it() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "scripts" / "rerun_matrix.py")], capture_output=True, text=True,
                         check=True).stdout
    rows = {line.split("|")[1].strip(" `"): [s.strip() for s in line.split("|")[2].split(",")]
            for line in out.splitlines()[2:]}
    listed = {str(next(iter(d))) if isinstance(d, dict) else str(d) for spec in dvc_stages(REPO / "dvc.yaml").values()
              for d in spec.get("deps") or []}
    assert set(rows) == {d for d in listed if d.startswith("distill/")}
    assert "teacher" not in rows[DEIT] and "data" not in rows[STORE] and "teacher" not in rows[STORE]
    assert rows[PREPARATION] == ["check_params", "data"]
