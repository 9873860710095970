"""What orchestration costs: the pipeline through DVC + Prefect + MLflow against the bare stage functions.

Three measurements in one run, each in a fresh copy of the project (a new git + DVC repository):

* ``direct``: one Python process calls the six stage functions of ``distill.stages`` in order, with no
  Prefect, MLflow or DVC (``bench/pipeline_overhead.py --direct-only`` runs only this side);
* ``pipeline``: ``python -m flows pipeline``, the README's command: a Prefect flow that runs ``dvc repro``,
  every stage a Prefect flow run in its own process (a warm worker of the stage server,
  flows/stage_server.py) with an MLflow child run, and the flow's temporary Prefect server;
* ``noop``: ``dvc repro`` again in the ``pipeline`` copy, where everything is up to date.

The figure is the ratio pipeline / direct (goal: at most 1.15) and the no-op time (goal: at most 5 s). The
sides run one after the other on the same machine, in fresh copies each round; with ``--rounds N`` the order
alternates from round to round and the median ratio is the figure (a shared machine drifts by minutes).

Prefect runs in a temporary ``PREFECT_HOME``. Its database is created before the timing starts, as it
exists on any machine where Prefect ran once; ``--cold-prefect`` leaves it to the pipeline (the first
Prefect run on a machine, about 5 s more). MLflow's store is always created by the timed run (a fresh
clone has none). ``--cold-stages`` runs the pipeline with ``DISTILL_WARM_STAGES=0``: every stage a fresh
process, as under plain ``dvc repro``.

Usage:
    python bench/pipeline_overhead.py                 # the default params.yaml
    python bench/pipeline_overhead.py --rounds 2      # both orders, median ratio
    python bench/pipeline_overhead.py --quick         # 2 epochs per model: measures the fixed cost only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DIRECT = """
import time
t0 = time.perf_counter()
from distill import stages as S
from distill.config import load_params
params, paths = load_params("params.yaml"), S.Paths(".")
for stage in S.STAGES:
    getattr(S, f"run_{stage}")(params, paths)
"""


def make_project(dest: Path, quick: bool) -> Path:
    """Copy the project's tracked and untracked (not ignored) files into ``dest`` as a fresh git repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    if quick:
        p = yaml.safe_load((dest / "params.yaml").read_text())
        for model in ("teacher", "student"):
            p[model]["train"].update(epochs=2, warmup_epochs=1)
        (dest / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True, env=_env())
    return dest


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DISTILL_PROGRESS", "0")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for k, v in (("GIT_AUTHOR_NAME", "bench"), ("GIT_AUTHOR_EMAIL", "bench@localhost"),
                 ("GIT_COMMITTER_NAME", "bench"), ("GIT_COMMITTER_EMAIL", "bench@localhost")):
        env.setdefault(k, v)
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy's own sqlite store
    return env


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run ``cmd`` to completion; return its wall time. A failure stops the benchmark with the log's tail."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        res = subprocess.run(cmd, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT, check=False)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed with status {res.returncode}:\n" + log.read_text()[-3000:])
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 epochs per model")
    ap.add_argument("--order", choices=("direct-first", "pipeline-first"), default="direct-first",
                    help="which side runs first in the first round (later rounds alternate)")
    ap.add_argument("--rounds", type=int, default=1, help="measure both sides this many times; the median ratio counts")
    ap.add_argument("--direct-only", action="store_true")
    ap.add_argument("--cold-prefect", action="store_true", help="let the timed pipeline create Prefect's database")
    ap.add_argument("--cold-stages", action="store_true", help="no stage server: a fresh process per stage")
    ap.add_argument("--out", default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)

    if args.cold_stages:
        os.environ["DISTILL_WARM_STAGES"] = "0"
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            here = Path(tmp) / f"round-{r}"
            here.mkdir()
            os.environ["PREFECT_HOME"] = str(here / "prefect-home")  # isolated Prefect database
            if not (args.cold_prefect or args.direct_only):
                timed(["prefect", "server", "database", "upgrade", "-y"], here, here / "prefect-db.log")
            direct_dir, pipe_dir = make_project(here / "direct", args.quick), make_project(here / "pipeline", args.quick)
            runs = {"direct": lambda: timed([sys.executable, "-c", DIRECT], direct_dir, here / "direct.log")}
            if not args.direct_only:
                runs["pipeline"] = lambda: timed([sys.executable, "-m", "flows", "pipeline"], pipe_dir,
                                                 here / "pipeline.log")
            order = list(runs) if (r % 2 == 0) == (args.order == "direct-first") else list(reversed(runs))
            times: dict[str, float] = {}
            for name in order:
                times[name] = runs[name]()
                print(f"round {r + 1}: {name}: {times[name]:.1f} s", flush=True)
            if not args.direct_only:
                times["noop"] = timed(["dvc", "repro"], pipe_dir, here / "noop.log")
                times["ratio"] = times["pipeline"] / times["direct"]
                print(f"round {r + 1}: no-op dvc repro {times['noop']:.2f} s; ratio pipeline/direct {times['ratio']:.3f}; "
                      f"overhead {times['pipeline'] - times['direct']:.1f} s", flush=True)
            rounds.append(times)
    summary: dict[str, float] = {}
    if not args.direct_only:
        summary = {k: statistics.median(t[k] for t in rounds) for k in ("direct", "pipeline", "noop", "ratio")}
        print(f"median over {len(rounds)} round(s): ratio pipeline/direct {summary['ratio']:.3f} (goal <= 1.15); "
              f"no-op dvc repro {summary['noop']:.2f} s (goal <= 5 s)")
    result = {"command": " ".join(["python", "bench/pipeline_overhead.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "setup": {"prefect_database": "created by the pipeline" if args.cold_prefect else "created before timing",
                        "stages": "fresh process each" if args.cold_stages else "stage server"},
              "rounds": rounds, "median": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
