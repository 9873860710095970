"""DVC reruns exactly what changed: each stage's ``params`` in ``dvc.yaml`` are exactly the keys its code reads.

1. Every stage runs for real (tiny configuration, in process) with a :class:`distill.config.ParamsView` that
   records each key it reads. The keys read must equal the leaves ``dvc.yaml`` declares for it: an undeclared
   read would be served stale by DVC (the view also refuses it at run time), an unread declaration reruns
   the stage for nothing. Other branches (online teacher, no distillation, the epoch budget) run too, so
   no read hides behind a condition.
2. In a real DVC repository (a temporary git repo with the project's ``dvc.yaml``, outputs recorded by
   ``dvc commit``), every leaf of ``params.yaml`` is changed in turn: ``dvc status`` marks exactly the stages
   that read it (plus ``check_params``, which validates every edit). The slow variant replaces every stage's
   command by a stub and reproduces: exactly those stages *and their downstream stages* run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from distill.config import ParamsView, Paths, declared_params, flatten, leaf_keys, load_raw
from distill.stages.runner import pipeline_stages, run_stage

from helpers import REPO, tiny_params

DVC_YAML = REPO / "dvc.yaml"
STAGES = pipeline_stages(DVC_YAML)
# Each variant runs the stages listed, after the default run, in a copy of its outputs.
VARIANTS = {
    "online teacher, hard": ({"student": {"distillation": "hard", "teacher_mode": "online"}}, ["student"]),
    "no distillation": ({"student": {"distillation": "none"}}, ["student", "baseline"]),
    "epoch budget, own lr": ({"baseline": {"budget": "epochs", "lr": 0.002, "weight_decay": 0.01}}, ["baseline"]),
}


def declared_leaves(stage: str, dvc_yaml: Path = DVC_YAML) -> set[str]:
    """The leaves of params.yaml a stage's ``dvc.yaml`` entry covers (a group stands for all its keys)."""
    declared = declared_params(stage, dvc_yaml)
    return {k for k in leaf_keys(load_raw(REPO / "params.yaml")) if any(k == d or k.startswith(d + ".")
                                                                         for d in declared)}


def _run(stage: str, params: Any, root: Path, reads: dict[str, set[str]], dvc_yaml: Path = DVC_YAML) -> None:
    view = ParamsView(params, stage=stage, declared=declared_params(stage, dvc_yaml))
    run_stage(stage, view, Paths(root))
    reads.setdefault(stage, set()).update(view.reads)


@pytest.fixture(scope="module")
def reads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """The keys each stage read, over the default run and the variants."""
    found: dict[str, set[str]] = {}
    root = tmp_path_factory.mktemp("lineage")
    (root / "data" / "raw").mkdir(parents=True)
    params = tiny_params(evaluate={"register_model": True})  # register: the model name is read (no MLflow here)
    for stage in STAGES:
        _run(stage, params, root, found)
    for changes, stages in VARIANTS.values():
        copy = tmp_path_factory.mktemp("variant")
        shutil.copytree(root, copy, dirs_exist_ok=True)
        for stage in stages:
            _run(stage, tiny_params(**changes), copy, found)
    return found


def test_every_stage_reads_exactly_what_dvc_yaml_declares(reads: dict[str, set[str]]) -> None:
    assert set(reads) == set(STAGES)
    problems = {}
    for stage in STAGES:
        undeclared, unread = reads[stage] - declared_leaves(stage), declared_leaves(stage) - reads[stage]
        if undeclared or unread:
            problems[stage] = {"read, not declared": sorted(undeclared), "declared, never read": sorted(unread)}
    assert not problems, json.dumps(problems, indent=1)


def test_a_read_of_an_undeclared_key_fails_naming_it(tmp_path: Path) -> None:
    """The view refuses at run time what dvc.yaml does not declare (here: the data stage without data.unlabeled)."""
    spec = yaml.safe_load(DVC_YAML.read_text())
    spec["stages"]["data"]["params"].remove("data.unlabeled")
    stale = tmp_path / "dvc.yaml"
    stale.write_text(yaml.safe_dump(spec))
    from distill.config import UndeclaredParamError

    refused = r"stage 'data' read parameter 'data\.unlabeled'.*stages\.data\.params"
    with pytest.raises(UndeclaredParamError, match=refused):
        _run("data", tiny_params(), tmp_path, {}, dvc_yaml=stale)
    assert not (tmp_path / "data" / "prepared").exists()  # refused before any work


# ------------------------------------------------------------------------------ DVC itself, key by key
def _changed(value: Any, key: str) -> Any:
    """Another value for a leaf (only DVC sees it: it need not be valid for the pipeline)."""
    if key == "data.root":
        return "data/raw2"
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value[:-1], value[-1] + 0.01] if value else [1]
    if value is None:
        return 7
    return f"{value}-changed"


def _set(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return out


STUB = """import functools, hashlib, json, pathlib, re, sys, yaml
stage = sys.argv[1]
spec = yaml.safe_load(open("dvc.yaml"))["stages"][stage]
raw = yaml.safe_load(open("params.yaml"))
h = hashlib.sha256(json.dumps([raw], sort_keys=True, default=str).encode())
lookup = lambda m: str(functools.reduce(lambda node, k: node[k], m.group(1).split("."), raw))
for dep in spec.get("deps", []):
    p = pathlib.Path(re.sub(r"\\$\\{([^}]+)\\}", lookup, dep))  # dvc.yaml's ${...} from params.yaml
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(f.read_bytes())
out = [next(iter(o)) if isinstance(o, dict) else o for k in ("outs", "metrics", "plots") for o in spec.get(k, [])]
content = "params valid" if stage == "check_params" else h.hexdigest()  # check_params' stamp never changes
for o in out:
    p = pathlib.Path(o)
    if p.suffix or p.name.startswith("."):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content + "\\n")
    else:
        p.mkdir(parents=True, exist_ok=True)
        (p / "content").write_text(content + "\\n")
with open("ran.log", "a") as log:
    log.write(stage + "\\n")
"""


def _git(args: list[str], cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@example.invalid",
                        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})


def _stub_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, stub_commands: bool) -> Path:
    """A git + DVC repository with the project's stage graph, params and library files, outputs recorded."""
    repo = tmp_path / "repo"
    for rel in ("dvc.yaml", "params.yaml"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, repo / rel)
    shutil.copytree(REPO / "distill", repo / "distill", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("data/raw", "data/raw2", "models/pretrained/teacher", "models/pretrained/student"):
        (repo / folder).mkdir(parents=True, exist_ok=True)
        (repo / folder / "README.md").write_text(folder + "\n")
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        stage["cmd"] = f"{sys.executable} stub.py {name}"
    if stub_commands:
        (repo / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        (repo / "stub.py").write_text(STUB)
    monkeypatch.chdir(repo)  # DVC's Python API resolves stage paths against the working directory
    _git(["init", "-q"], repo)
    _git(["add", "-A"], repo)
    _git(["commit", "-qm", "project"], repo)
    from dvc.repo import Repo

    Repo.init(str(repo))
    if stub_commands:
        Repo(str(repo)).reproduce()
    else:  # the real commands never run: write placeholder outputs and let DVC record them as they are
        (repo / "stub.py").write_text(STUB)
        for name in spec["stages"]:
            subprocess.run([sys.executable, "stub.py", name], cwd=repo, check=True)
        Repo(str(repo)).commit(None, force=True)
    return repo


def _expected(key: str, reads: dict[str, set[str]]) -> set[str]:
    return {"check_params", *(s for s, keys in reads.items() if key in keys)}


def _downstream(stages: set[str], repo: Path) -> set[str]:
    from dvc.repo import Repo

    graph = Repo(str(repo)).index.graph  # edges point from a stage to the stages it depends on
    out = set(stages)
    for node in graph.nodes:
        if any(getattr(up, "name", None) in stages for up in nx_descendants(graph, node)):
            out.add(node.name)
    return out


def nx_descendants(graph: Any, node: Any) -> set[Any]:
    import networkx as nx

    return nx.descendants(graph, node)


def test_dvc_status_marks_exactly_the_stages_that_read_each_key(reads: dict[str, set[str]], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from dvc.repo import Repo

    repo = _stub_repo(tmp_path, monkeypatch, stub_commands=False)
    dvc = Repo(str(repo))
    assert dvc.status() == {}, dvc.status()
    base = load_raw(repo / "params.yaml")
    wrong = {}
    for key, value in flatten(base).items():
        (repo / "params.yaml").write_text(yaml.safe_dump(_set(base, key, _changed(value, key))))
        marked = set(dvc.status())
        if marked != _expected(key, reads):
            wrong[key] = {"dvc status": sorted(marked), "readers": sorted(_expected(key, reads))}
    (repo / "params.yaml").write_text(yaml.safe_dump(base))
    assert not wrong, json.dumps(wrong, indent=1)


@pytest.mark.slow
def test_changing_each_key_reruns_its_readers_and_their_downstream_stages(reads: dict[str, set[str]],
                                                                          tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from dvc.repo import Repo

    repo = _stub_repo(tmp_path, monkeypatch, stub_commands=True)
    params = load_raw(repo / "params.yaml")
    log = repo / "ran.log"
    wrong = {}
    for key, value in flatten(load_raw(repo / "params.yaml")).items():  # one change after another, each reproduced
        log.write_text("")
        params = _set(params, key, _changed(value, key))
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        Repo(str(repo)).reproduce()
        ran = set(log.read_text().split())
        want = _downstream(_expected(key, reads) - {"check_params"}, repo) | {"check_params"}
        if ran != want:
            wrong[key] = {"ran": sorted(ran), "expected": sorted(want)}
    assert not wrong, json.dumps(wrong, indent=1)
