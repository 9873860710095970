"""One row per DVC experiment: the params that differ between the rows, and the headline metrics.

``dvc exp show`` prints every param and every metric (more than 200 columns here), which a terminal cuts to
``…``. This reads ``dvc exp show --json`` and keeps what answers "which variant was best": the params whose value
is not the same in every row shown, then teacher, baseline and student test top-1 (%), the distillation gain
and the gap to the teacher (points), from ``metrics/evaluate.json``. Rows: the workspace, the commit and its
experiments, as ``dvc exp show`` lists them; arguments after the options go to ``dvc exp show`` (``-A``,
``--rev``, ``-n``...).

Usage::

    python scripts/compare.py                      # the experiments of the current commit
    python scripts/compare.py --sort student -A    # every commit's, best student first
    python scripts/compare.py --csv > runs.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from typing import Any

from distill.config import flatten  # the project's own flattening (``student.train.lr``)

METRICS_FILE = "metrics/evaluate.json"
#: (column, key in metrics/evaluate.json): top-1 as a percentage; the gain and the gap in points, signed.
METRIC_COLUMNS = (("teacher %", "teacher.top1"), ("baseline %", "baseline.top1"), ("student %", "student.top1"),
            ("gain pts", "distillation_gain"), ("gap pts", "gap_to_teacher"))
SORTS = {"teacher": "teacher.top1", "baseline": "baseline.top1", "student": "student.top1",
         "gain": "distillation_gain", "gap": "gap_to_teacher"}
DASH = "-"


def rows(shown: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``dvc exp show --json`` as ``{"name", "rev", "params", "metrics"}`` rows (params and metrics flattened)."""
    out = []
    for entry in shown:
        revs = [entry] + [rev for exp in (entry.get("experiments") or []) for rev in exp.get("revs") or []]
        for rev in revs:
            data = rev.get("data") or {}
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            metrics = ((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data") or {}
            sha = rev.get("rev") or ""
            name = rev.get("name") or (sha if sha == "workspace" else sha[:7])
            out.append({"name": name, "rev": sha[:7], "params": flatten(params),
                        "metrics": flatten(metrics)})
    return out


def changed_params(table: list[dict[str, Any]]) -> list[str]:
    """The params whose value is not the same in every row (in params.yaml's order)."""
    keys: dict[str, None] = {}
    for row in table:
        keys.update(dict.fromkeys(row["params"]))
    return [k for k in keys if len({json.dumps(row["params"].get(k), sort_keys=True) for row in table}) > 1]


def _value(row: dict[str, Any], key: str) -> float | None:
    value = row["metrics"].get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _cell(value: float | None, signed: bool) -> str:
    return DASH if value is None else f"{value * 100:{'+' if signed else ''}.2f}"


def table_rows(table: list[dict[str, Any]], params: list[str]) -> list[list[str]]:
    """Header and one line of text cells per row."""
    lines = [["experiment", *params, *(col for col, _ in METRIC_COLUMNS)]]
    for row in table:
        values = ["null" if row["params"].get(k) is None else str(row["params"].get(k, DASH)) for k in params]
        figures = [_cell(_value(row, key), col.endswith("pts")) for col, key in METRIC_COLUMNS]
        lines.append([row["name"], *values, *figures])
    return lines


def render(lines: list[list[str]]) -> str:
    """Aligned columns: text left, figures right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    numeric = [all(c == DASH or c.lstrip("+-").replace(".", "", 1).isdigit() for c in col[1:])
               for col in zip(*lines)]
    text = []
    for line in lines:
        cells = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(line, widths, numeric)]
        text.append("  ".join(cells).rstrip())
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sort", choices=list(SORTS), help="best first by this metric (the smallest gap first)")
    parser.add_argument("--csv", action="store_true", help="comma-separated values instead of aligned columns")
    args, dvc_args = parser.parse_known_args(argv)
    proc = subprocess.run(["dvc", "exp", "show", "--json", *dvc_args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr.strip() or f"error: `dvc exp show` exited {proc.returncode}", file=sys.stderr)
        return proc.returncode
    table = rows(json.loads(proc.stdout or "[]"))
    if args.sort:
        sign = 1 if args.sort == "gap" else -1
        table.sort(key=lambda r: (_value(r, SORTS[args.sort]) is None, sign * (_value(r, SORTS[args.sort]) or 0)))
    lines = table_rows(table, changed_params(table))
    if args.csv:
        csv.writer(sys.stdout).writerows(lines)
    else:
        print(render(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
