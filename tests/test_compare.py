"""Comparing runs on the terminal and in DVC's plots, in a real DVC repository with two real experiments.

The repository is small but real: a stage that writes ``metrics/evaluate.json`` (the evaluate stage's headline keys)
and ``plots/student.csv`` from its params, the project's own ``.dvc/config``, and ``dvc exp run -S`` twice.

* ``scripts/compare.py``: one row per experiment, only the params that differ, the headline metrics;
* ``dvc plots show`` with the project's config: a page whose scripts are all inline (no CDN), and, in a slow test,
  that headless Chromium with no network draws the plots.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import GIT_IDENTITY, REPO

STAGE = '''
import csv, json, yaml
p = yaml.safe_load(open("params.yaml"))
alpha = p["student"]["alpha"]
student = round(0.90 + 0.05 * alpha, 4)
metrics = {"teacher": {"top1": 0.95}, "baseline": {"top1": 0.92}, "student": {"top1": student},
           "distillation_gain": round(student - 0.92, 4), "gap_to_teacher": round(0.95 - student, 4),
           "many": {f"other_{i}": i for i in range(100)}}  # the columns `dvc exp show` prints too
json.dump(metrics, open("metrics/evaluate.json", "w"))
with open("plots/student.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["epoch", "val_acc"])
    w.writerows([e, round(student * e / 5, 4)] for e in range(1, 6))
'''
DVC_YAML = {
    "stages": {"evaluate": {"cmd": "python stage.py", "deps": ["stage.py"], "params": ["student", "seed"],
                            "metrics": [{"metrics/evaluate.json": {"cache": False}}],
                            "plots": [{"plots/student.csv": {"cache": False}}]}},
    "plots": [{"validation accuracy per epoch": {"template": "linear", "x": "epoch",
                                                  "y": {"plots/student.csv": "val_acc"}}}],
}
PARAMS = {"seed": 0, "student": {"alpha": 0.5, "tau": 1.0, "train": {"lr": 0.002, "epochs": 5}}}


def _run(args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env.update(GIT_IDENTITY, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repository with the project's .dvc/config, one commit and two experiments on it."""
    root = tmp_path_factory.mktemp("compare") / "repo"
    root.mkdir()
    _run(["git", "init", "-q", "-b", "main"], root)
    _run(["dvc", "init", "-q"], root)
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")  # plots.html_template = offline_plots.html
    _run([sys.executable, str(REPO / "scripts" / "plots_template.py"), str(root / ".dvc" / "offline_plots.html")],
         root)
    (root / "stage.py").write_text(STAGE)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    for folder in ("metrics", "plots"):
        (root / folder).mkdir()
    _run(["dvc", "repro", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-q", "-m", "baseline"], root)
    for alpha in ("0.3", "0.9"):
        _run(["dvc", "exp", "run", "-q", "-S", f"student.alpha={alpha}", "--name", f"alpha-{alpha}"], root)
    return root


def test_compare_prints_one_row_per_experiment_with_changed_params_and_headline(repo: Path) -> None:
    out = _run([sys.executable, str(REPO / "scripts" / "compare.py"), "--sort", "student"], repo)
    lines = out.strip().splitlines()
    header = lines[0].split()
    assert header == ["experiment", "student.alpha", "teacher", "%", "baseline", "%", "student", "%", "gain", "pts",
                      "gap", "pts"], out  # only the param that differs; seed, tau, lr ... are the same everywhere
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["alpha-0.9"] == ["0.9", "95.00", "92.00", "94.50", "+2.50", "+0.50"], out
    assert rows["alpha-0.3"] == ["0.3", "95.00", "92.00", "91.50", "-0.50", "+3.50"], out
    assert rows["workspace"] == rows["alpha-0.9"] and rows["main"][:1] == ["0.5"], out  # dvc exp run applied 0.9
    assert [line.split()[0] for line in lines[1:]][2:] == ["main", "alpha-0.3"], out  # --sort student: best first
    assert max(map(len, lines)) < 100, out  # readable on a terminal: `dvc exp show` has over 100 columns here
    csv_out = _run([sys.executable, str(REPO / "scripts" / "compare.py"), "--csv"], repo)
    assert csv_out.splitlines()[0] == "experiment,student.alpha,teacher %,baseline %,student %,gain pts,gap pts"


SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?\s*(?:https?:)?//", re.I)


def test_dvc_plots_show_page_loads_nothing_from_the_network(repo: Path) -> None:
    _run(["dvc", "plots", "show", "-o", "dvc_plots"], repo)
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert not SCRIPT_SRC.search(page), SCRIPT_SRC.search(page)
    assert "cdn.jsdelivr" not in page and "vegaEmbed(" in page and "validation accuracy per epoch" in page
    assert "(vl-convert-python " in page  # the project's template, with the libraries inline
    assert "dvc_plots/" in (REPO / ".gitignore").read_text().splitlines()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's Chromium (`apt-get install chromium`)")
def test_dvc_plots_render_offline_in_a_browser(repo: Path, tmp_path: Path) -> None:
    """Chromium, with no network, draws the plot: vega-embed's chart, an SVG with the line of the curve."""
    from test_mlflow_ui import _browse

    _run(["dvc", "plots", "show", "-o", "dvc_plots"], repo)
    dom = _browse((repo / "dvc_plots" / "index.html").as_uri(), tmp_path / "profile")
    assert re.search(r'class="vega-embed[^"]*"', dom) and 'class="mark-group role-frame root"' in dom, dom[-3000:]
    assert re.search(r'class="mark-line role-mark[^"]*"', dom) and "validation accuracy per epoch" in dom, dom[-3000:]
