"""bench/gpu_check.sh, the GPU check of issue 20, in its CPU dry run: it runs end to end on tiny sizes and prints
its one table (our DeiT against timm's in bf16, compile off and on, and the default pipeline's plan). The figures on
a GPU come from a machine that has one (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow  # tens of seconds on the loaded 2-core machine: torch, timm and DVC start-up


def test_the_gpu_check_dry_run_prints_its_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "DVC_NO_ANALYTICS": "1",
                               "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in table[1:]]
    for side in ("ours", "timm"):
        for mode in ("compile off", "compile on (eager)"):
            assert f"DeiT training, {side}, {mode}" in names, proc.stdout
    assert "default pipeline, bf16 (dry run: dvc status)" in names and "DRY RUN" in proc.stdout
    record = json.loads(out.read_text())
    assert record["dry_run"] is True and record["pipeline_stages_planned"] >= 7
    assert all(v > 0 for v in record["images_per_sec"].values()) and len(record["images_per_sec"]) == 4
