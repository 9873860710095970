#!/usr/bin/env bash
# The GPU check (issue 20): one command for a one-GPU machine, at most 8 minutes, one table at the end.
#
#   bench/gpu_check.sh              # on the GPU: deit_tiny at 224 px, bf16; then the default pipeline in bf16
#   bench/gpu_check.sh --dry-run    # on the CPU, seconds: tiny sizes, torch.compile's eager backend, `dvc status`
#
# 1. Training images/s of our DeiT (distill/models/deit.py) against timm's VisionTransformerDistilled, the same
#    architecture, batch, random weights and training step as bench/model_speed.py (whose builders it uses), under
#    torch.autocast(bfloat16), with torch.compile off and on; the sides alternate over rounds, the median is given.
# 2. The default pipeline (params.yaml as committed) under ACCELERATE_MIXED_PRECISION=bf16, `dvc repro` in a
#    throw-away clone of this checkout's HEAD: its wall time, the soft-label generation's views/s
#    (metrics/soft_labels.json) and each training stage's images/s.
# Writes the table to stdout and bench/results/gpu_check.json (--out to change).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python=python
exec "$python" - "$here" "$@" <<'PY'
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

root = Path(sys.argv[1])
sys.path.insert(0, str(root))
sys.path.insert(0, str(root / "bench"))
ap = argparse.ArgumentParser(prog="bench/gpu_check.sh")
ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds: checks that everything runs")
ap.add_argument("--out", default=str(root / "bench" / "results" / "gpu_check.json"))
ap.add_argument("--rounds", type=int, default=None)
args = ap.parse_args(sys.argv[2:])
t_start = time.perf_counter()

import torch  # noqa: E402

from distill.models.deit import build_deit  # noqa: E402
from model_speed import build_timm, make_step  # noqa: E402

dry = args.dry_run
device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
if not dry and device.type != "cuda":
    sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); --dry-run checks it on the CPU")
preset, size, batch = ("deit_nano", 32, 8) if dry else ("deit_tiny", 224, 128)
steps, warmup, rounds = (2, 1, args.rounds or 2) if dry else (20, 5, args.rounds or 3)
backend = "eager" if dry else "inductor"  # the dry run checks the compiled path without inductor's minutes
rows, record = [], {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
                    "dry_run": dry, "preset": preset, "img_size": size, "batch": batch, "dtype": "bfloat16"}


def sync() -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def side(name: str, compiled: bool):
    torch.manual_seed(0)
    kw = dict(img_size=size, num_classes=1000, drop_path_rate=0.1)
    model = build_timm(preset, **kw) if name == "timm" else build_deit(preset, **kw)
    model = model.to(device).train()
    if compiled:
        model = torch.compile(model, backend=backend)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    step = make_step(model, x, y)

    def bf16_step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            step()
    for _ in range(warmup):  # includes the compilation
        bf16_step()
    sync()
    return bf16_step


rates = {}
for compiled in (False, True):
    steps_of = {name: side(name, compiled) for name in ("ours", "timm")}
    per_round = {name: [] for name in steps_of}
    for r in range(rounds):
        for name in (("ours", "timm") if r % 2 == 0 else ("timm", "ours")):
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                steps_of[name]()
            sync()
            per_round[name].append(batch * steps / (time.perf_counter() - t0))
    for name, values in per_round.items():
        rates[(name, compiled)] = statistics.median(values)
    ratio = statistics.median(a / b for a, b in zip(per_round["ours"], per_round["timm"]))
    label = f"compile {'on (' + backend + ')' if compiled else 'off'}"
    rows += [(f"DeiT training, ours, {label}", f"{rates[('ours', compiled)]:.0f} images/s"),
             (f"DeiT training, timm, {label}", f"{rates[('timm', compiled)]:.0f} images/s"),
             (f"ours / timm, {label}", f"{ratio:.3f}x (median of per-round ratios)")]
    record[f"ours_over_timm_compile_{'on' if compiled else 'off'}"] = ratio
record["images_per_sec"] = {f"{n}_compile_{'on' if c else 'off'}": v for (n, c), v in rates.items()}


def pipeline() -> None:
    """The default pipeline in bf16 in a clone of HEAD (dry run: `dvc status`, nothing computed)."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        clone = Path(tmp) / "project"
        subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
        env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16", "DISTILL_PROGRESS": "0",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}"}
        if dry:
            env["CUDA_VISIBLE_DEVICES"] = ""
        t0 = time.perf_counter()
        cmd = ["dvc", "status", "--json"] if dry else ["dvc", "repro"]
        proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"gpu_check: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        if dry:
            planned = len(json.loads(proc.stdout or "{}"))
            rows.append(("default pipeline, bf16 (dry run: dvc status)", f"{planned} stages to run"))
            record["pipeline_stages_planned"] = planned
            return
        metrics = {p.stem: json.loads(p.read_text()) for p in (clone / "metrics").glob("*.json")}
        rows.append(("default pipeline, bf16, dvc repro", f"{wall:.0f} s"))
        rows.append(("soft-label generation, bf16", f"{metrics['soft_labels']['views_per_sec']:.0f} views/s"))
        for stage in ("teacher", "student", "baseline"):
            rows.append((f"{stage} training, bf16", f"{metrics[stage]['train_images_per_sec']:.0f} images/s"))
        record["pipeline"] = {"wall_s": wall, "metrics": metrics}


pipeline()
total = time.perf_counter() - t_start
rows.append(("gpu_check wall time", f"{total:.0f} s (limit 480 s)"))
record["wall_s"] = total
width = max(len(r[0]) for r in rows)
print(f"\nGPU check on {record['device']} ({preset} at {size} px, batch {batch}, bfloat16"
      f"{', DRY RUN' if dry else ''})")
print(f"| {'check'.ljust(width)} | result |\n|{'-' * (width + 2)}|---|")
for name, value in rows:
    print(f"| {name.ljust(width)} | {value} |")
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps(record, indent=2, default=str) + "\n")
PY
