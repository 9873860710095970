"""One-seed screen of student/baseline recipes against one fixed teacher (how the default recipe was chosen).

Prepares the data and trains the teacher once in ``--workdir`` (reused on later calls), then trains each
variant: a name starting with ``base`` trains the labels-only baseline, any other name the distilled
student (generating the soft-label store first when it replays one). Prints each model's test top-1.
A single seed and a 359-image test split give a figure within about ±1 point: use it to screen,
and confirm with ``bench/distill_gain.py`` over several seeds.

Usage:
    python bench/recipe_screen.py --workdir /tmp/screen --seed 0 \\
        -B data.max_per_class=null -B student.train.epochs=60 \\
        "hard:student.teacher_mode=online" "soft:student.teacher_mode=online;student.distillation=soft" "base:"

``-B key=value`` applies to everything (data, teacher, every variant); a variant is ``name:k=v;k=v``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from soft_labels import test_top1  # noqa: E402  (bench/soft_labels.py)

from distill import stages as S  # noqa: E402
from distill.config import apply_overrides, parse_params  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-B", "--base", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("variants", nargs="+", metavar="NAME:K=V;K=V")
    args = ap.parse_args(argv)

    raw = apply_overrides(yaml.safe_load(Path(args.params).read_text()), [*args.base, f"seed={args.seed}"])
    paths = S.Paths(Path(args.workdir))
    if not paths.model("teacher").is_file():
        for stage in ("data", "teacher"):
            getattr(S, f"run_{stage}")(parse_params(raw), paths)
    stored: set[str] = set()  # the store depends only on the teacher and its stage's params (views, crops, mixup)
    for spec in args.variants:
        name, _, overrides = spec.partition(":")
        params = parse_params(apply_overrides(raw, [o for o in overrides.split(";") if o]))
        t0 = time.perf_counter()
        if name.startswith("base"):
            S.run_baseline(params, paths)
            model = "baseline"
        else:
            store_key = json.dumps(S.stage_params(params, "soft_labels"), sort_keys=True)
            if params.student.teacher_mode == "stored" and params.student.distillation != "none" \
                    and store_key not in stored:
                S.run_soft_labels(params, paths)
                stored = {store_key}
            S.run_student(params, paths)
            model = "student"
        print(f"RESULT {name} seed={args.seed} test_top1={test_top1(paths, model):.4f} "
              f"time={time.perf_counter() - t0:.0f}s [{overrides}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
