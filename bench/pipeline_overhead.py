"""What orchestration costs per stage: a fresh process, its imports, the Prefect flow run and the MLflow run.

Two sides, in one run, in the same fresh copy of the project (a new git + DVC repository), against one running
``prefect server start`` (as under ``python -m flows pipeline``, which shares one server with all stages):

* ``in process``: one Python process runs the stages in pipeline order (``distill.stages.runner.run_stage``,
  no Prefect, no MLflow) and times each one;
* ``command``: each stage as DVC runs it, ``python -m flows stage <name>`` in a fresh process (a Prefect flow
  run with an MLflow child run), timed from start to exit.

The fixed cost of a stage is ``command - in process``; the figure is its median over ``--rounds`` rounds (the
sides alternate which goes first) and its mean over the stages. Goal: at most 7 s per stage on the 2-core
reference machine. Then ``dvc repro`` with everything up to date is timed (goal: at most 5 s): DVC's own
bookkeeping, what a user pays for "nothing changed".

``--quick`` (2-epoch models, 2 stored views) measures the fixed cost alone; without it, the default params.

Usage:
    python bench/pipeline_overhead.py --quick [--rounds 3] [--out overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
IN_PROCESS = """
import json, sys, time
from pathlib import Path
from distill.config import Paths, load_params
from distill.stages.runner import pipeline_stages, run_stage
params, paths, times = load_params("params.yaml"), Paths(Path(".").resolve()), {}
for stage in pipeline_stages("dvc.yaml"):
    t0 = time.perf_counter()
    run_stage(stage, params, paths)
    times[stage] = time.perf_counter() - t0
print("TIMES " + json.dumps(times))
"""
QUICK = {"teacher.train.epochs": 2, "teacher.train.warmup_epochs": 1, "student.train.epochs": 2,
         "student.train.warmup_epochs": 1, "soft_labels.views": 2, "evaluate.throughput_rounds": 1}


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "DISTILL_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"DISTILL_PROGRESS": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
                "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench",
                "GIT_COMMITTER_EMAIL": "bench@localhost", **(extra or {})})
    return env


def make_project(dest: Path, quick: bool, env: dict[str, str]) -> Path:
    """Copy the project's tracked and untracked (not ignored) files into ``dest`` as a fresh git repository."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    if quick:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        for dotted, value in QUICK.items():
            *parents, leaf = dotted.split(".")
            node = params
            for part in parents:
                node = node[part]
            node[leaf] = value
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    return dest


def run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, str]:
    """Run ``cmd`` to completion; its wall time and output. A failure stops the benchmark with the log's tail."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed with status {res.returncode}:\n" + log.read_text()[-3000:])
    return elapsed, res.stdout


def prefect_server(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    log = open(home / "prefect-server.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                            env={**env, "PREFECT_HOME": str(home / "prefect")}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(api + "/health", timeout=1) as resp:
                if resp.status == 200:
                    return proc, api
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("prefect server did not start: " + (home / "prefect-server.log").read_text()[-2000:])


def one_round(here: Path, quick: bool, command_first: bool, api: str, env: dict[str, str]) -> dict[str, dict]:
    project = make_project(here / "project", quick, env)
    stages = [s for s in yaml.safe_load((project / "dvc.yaml").read_text())["stages"] if s != "check_params"]
    sides: dict[str, dict[str, float]] = {}

    def in_process() -> None:
        scratch = here / "in-process"
        shutil.copytree(project, scratch)
        _, out = run([sys.executable, "-c", IN_PROCESS], scratch, env, here / "in-process.log")
        sides["in process"] = json.loads(out.split("TIMES ", 1)[1])

    def commands() -> None:
        stage_env = {**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(here / "prefect-client")}
        run([sys.executable, "-m", "distill.config", "params.yaml", "--stamp", ".dvc-params-ok"], project, env,
            here / "check.log")
        sides["command"] = {s: run([sys.executable, "-m", "flows", "stage", s], project, stage_env,
                                   here / f"{s}.log")[0] for s in stages}

    for side in (commands, in_process) if command_first else (in_process, commands):
        side()
    run(["dvc", "commit", "-f"], project, env, here / "commit.log")  # record the outputs: everything is up to date
    noop = [run(["dvc", "repro"], project, env, here / "noop.log")[0] for _ in range(3)]
    return {"stages": {s: {"in_process_s": sides["in process"][s], "command_s": sides["command"][s],
                           "overhead_s": sides["command"][s] - sides["in process"][s]} for s in stages},
            "noop_repro_s": statistics.median(noop)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2-epoch models: the fixed cost alone")
    ap.add_argument("--rounds", type=int, default=1, help="rounds; the sides alternate which goes first")
    ap.add_argument("--out", default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)

    env = _env()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        server, api = prefect_server(Path(tmp), env)
        try:
            for r in range(args.rounds):
                here = Path(tmp) / f"round-{r}"
                here.mkdir()
                rounds.append(one_round(here, args.quick, command_first=r % 2 == 1, api=api, env=env))
                per = rounds[-1]["stages"]
                print(f"round {r + 1}: " + ", ".join(f"{s} {v['overhead_s']:+.1f} s" for s, v in per.items())
                      + f"; no-op dvc repro {rounds[-1]['noop_repro_s']:.2f} s", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    stages = list(rounds[0]["stages"])
    table = {s: {k: statistics.median(r["stages"][s][k] for r in rounds) for k in ("in_process_s", "command_s",
                                                                                     "overhead_s")} for s in stages}
    mean = statistics.fmean(v["overhead_s"] for v in table.values())
    noop = statistics.median(r["noop_repro_s"] for r in rounds)
    print("\n| stage | in process (s) | `python -m flows stage` (s) | fixed cost (s) |\n|---|---|---|---|")
    for s, v in table.items():
        print(f"| {s} | {v['in_process_s']:.1f} | {v['command_s']:.1f} | {v['overhead_s']:.1f} |")
    print(f"\nfixed cost per stage: mean {mean:.1f} s, max {max(v['overhead_s'] for v in table.values()):.1f} s "
          f"(goal <= 7 s); no-op dvc repro {noop:.2f} s (goal <= 5 s); medians over {len(rounds)} round(s)")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": " ".join(["python", "bench/pipeline_overhead.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "rounds": rounds, "median": table, "mean_overhead_s": mean, "noop_repro_s": noop}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
