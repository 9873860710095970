"""What is bit-reproducible: one training stage run twice with the same thread count, and once with another.

The digits teacher (params.yaml, seed 0: the data and teacher stages, in temporary folders) is trained in a fresh
process per run with ``--threads`` torch threads; each run reports the sha256 of its weights, its first and last
epoch of ``plots/teacher.csv`` and its validation top-1. Same code, same data, same thread count, same machine:
the weights are expected to be identical. Another thread count splits intra-op reductions differently, so float
sums round differently and the weights drift (docs/reliability.md: "The number of CPU threads must match").
Another CPU (another instruction set, another BLAS kernel) differs the same way.

Usage:
    python bench/reproducibility.py                      # 1 thread twice, then 2 threads once
    python bench/reproducibility.py --threads 1 1 2 --out bench/results/reproducibility.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT, machine, write_json  # noqa: E402

from distill.tracking import git_commit  # noqa: E402

ONE_RUN = """
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[1]))
from distill.checkpoint import read_metadata
from distill.config import Paths, load_params
from distill.stages.runner import run_stage
out = Path(sys.argv[2]); paths = Paths(out)
(out / "data" / "raw").mkdir(parents=True, exist_ok=True)
params = load_params("params.yaml")
for stage in ("data", "teacher"):
    run_stage(stage, params, paths, dvc_yaml="dvc.yaml")
digest = read_metadata(paths.model("teacher"))["weights_sha256"]  # what the checkpoint records of its weights
rows = (out / "plots" / "teacher.csv").read_text().splitlines()
print(json.dumps({"weights_sha256": digest, "first_epoch": rows[1], "last_epoch": rows[-1],
                  "val_top1": json.loads(paths.metrics("teacher").read_text())["val_acc"]}))
"""


def run(threads: int) -> dict:
    """One teacher training in a fresh process with ``threads`` torch threads."""
    env_threads = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "DISTILL_PROGRESS": "0"}
    with tempfile.TemporaryDirectory(prefix="repro-") as out:
        proc = subprocess.run([sys.executable, "-c", ONE_RUN, str(threads), out], cwd=ROOT, text=True,
                              capture_output=True, env={**os.environ, **env_threads})
    if proc.returncode != 0:
        raise SystemExit(f"the run with {threads} thread(s) failed:\n{proc.stderr[-3000:]}")
    return {"threads": threads, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 1, 2], help="one run per entry")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    runs = [run(t) for t in args.threads]
    for r in runs:
        print(f"{r['threads']} thread(s): weights sha256 {r['weights_sha256'][:16]}  val top-1 "
              f"{100 * r['val_top1']:.2f} %  last epoch {r['last_epoch']}")
    by_threads: dict[int, set[str]] = {}
    for r in runs:
        by_threads.setdefault(r["threads"], set()).add(r["weights_sha256"])
    same = {t: len(h) == 1 for t, h in by_threads.items()}
    print("identical weights for the same thread count: " + ", ".join(f"{t}: {v}" for t, v in same.items()))
    if len(by_threads) > 1:
        distinct = len({h for hs in by_threads.values() for h in hs})
        print(f"distinct weights across thread counts: {distinct}")
    if args.out:
        write_json(args.out, {
            "command": "python bench/reproducibility.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine(1, "see runs"), "commit": git_commit(ROOT),
            "runs": runs, "identical_for_same_threads": same})
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
