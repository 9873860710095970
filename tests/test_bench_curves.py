"""The recipe benchmarks (bench/label_curve.py, bench/variants.py) on tiny digits recipes: what they report, the
seed policy, and that an interrupted run resumes where it stopped (finished points and stages are not run again)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO

TINY = ["data.pool_per_class=20", "teacher.width=4", "teacher.blocks=1", "teacher.train.epochs=2",
        "teacher.train.warmup_epochs=1", "teacher.train.batch_size=32", "soft_labels.views=2",
        "student.model.preset=deit_nano", "student.train.epochs=2", "student.train.warmup_epochs=1",
        "student.train.batch_size=32"]


def _bench(script: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "DISTILL_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          env={**env, **(env_extra or {})}, cwd=REPO, timeout=900)


@pytest.fixture()
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "curve_tiny.yaml"
    path.write_text(yaml.safe_dump({"dataset": "digits", "labels_per_class": [3, 20], "overrides": TINY}))
    return path


def test_label_curve_reports_every_point_and_resumes_without_rerunning(tiny_recipe, tmp_path):
    out, plot, work = tmp_path / "curve.json", tmp_path / "curve.png", tmp_path / "work"
    args = ["--recipes", str(tiny_recipe), "--split", "val", "--seeds", "100", "101", "--jobs", "1",
            "--workdir", str(work), "--out", str(out), "--plot", str(plot)]
    first = _bench("label_curve.py", *args)
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads(out.read_text())
    points = report["summary"]["digits"]
    assert sorted(points) == ["20", "3"] and all(points[p]["student.top1"]["n"] == 2 for p in points)
    gain = points["3"]["distillation_gain"]
    assert gain["values"] == pytest.approx([r["metrics"]["distillation_gain"] for r in report["runs"]
                                            if r["labels_per_class"] == 3])
    assert gain["ci95"][0] <= gain["mean"] <= gain["ci95"][1]
    assert plot.stat().st_size > 10_000
    # the largest point labels the whole pool: no unlabeled images are left for it
    def data_metrics(labels: int, seed: int) -> dict:
        [found] = (work / "val" / "digits" / f"L{labels}" / f"seed{seed}").glob("T*/D*/metrics/data.json")
        return json.loads(found.read_text())
    assert data_metrics(20, 100)["num_unlabeled"] == 0 and data_metrics(20, 100)["num_train"] == 200
    assert data_metrics(3, 100)["num_train"] == 30 and data_metrics(3, 100)["num_unlabeled"] == 170
    # interrupted: one model lost its result and its stage; a rerun redoes only that
    [point] = (work / "val" / "digits" / "L3" / "seed101").glob("T*/D*/Vbase")
    (point / "result.json").unlink()
    (point / "baseline.done").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("models/*.safetensors") if not p.is_symlink()}
    second = _bench("label_curve.py", *args)
    assert second.returncode == 0, second.stdout + second.stderr
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t]
    assert changed == [point / "models" / "baseline.safetensors"]
    again = json.loads(out.read_text())["summary"]["digits"]["3"]["distillation_gain"]
    assert again["values"] == pytest.approx(gain["values"])  # the same result, also for the rerun baseline
    # a controls grid at the same recipe, label count and seeds, in the same folder, reuses the curve's models
    grid = tmp_path / "controls.yaml"
    grid.write_text(yaml.safe_dump({"recipe": str(tiny_recipe), "labels_per_class": 3, "seeds": [100, 101],
                                    "split": "val", "reference": "base",
                                    "variants": {"base": [], "student": [], "labeled_only": ["data.unlabeled=false"]}}))
    res = _bench("variants.py", str(grid), "--jobs", "1", "--workdir", str(work / "val" / "digits" / "L3"),
                 "--out", str(tmp_path / "controls.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    controls = json.loads((tmp_path / "controls.json").read_text())["summary"]
    assert controls["student"]["top1"]["values"] == pytest.approx(
        [r["metrics"]["student"]["top1"] for r in json.loads(out.read_text())["runs"] if r["labels_per_class"] == 3])
    for seed in (100, 101):  # the labeled-only student has data of its own but shares the teacher
        folder = work / "val" / "digits" / "L3" / f"seed{seed}"
        assert len(list(folder.glob("T*"))) == 1 and len(list(folder.glob("T*/D*"))) == 2
        assert len([p for p in folder.rglob("teacher.safetensors") if not p.is_symlink()]) == 1
    # a variant name reused with other params is refused, not silently answered from the old result
    grid.write_text(yaml.safe_dump({"recipe": str(tiny_recipe), "labels_per_class": 3, "seeds": [100], "split": "val",
                                    "variants": {"student": ["student.tau=2.0"]}}))
    res = _bench("variants.py", str(grid), "--workdir", str(work / "val" / "digits" / "L3"),
                 "--out", str(tmp_path / "clash.json"))
    assert res.returncode != 0 and "made with other params" in res.stderr


def test_seed_policy_keeps_test_for_held_out_seeds(tiny_recipe, tmp_path):
    res = _bench("label_curve.py", "--recipes", str(tiny_recipe), "--split", "val", "--seeds", "1000")
    assert res.returncode == 2 and "seeds >= 1000 are kept for the held-out confirmation" in res.stderr
    res = _bench("label_curve.py", "--recipes", str(tiny_recipe), "--split", "test", "--seeds", "100")
    assert res.returncode == 2 and "held-out seeds (>= 1000)" in res.stderr


def test_variants_share_the_teacher_and_store_and_pair_with_the_reference(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"dataset": "digits", "labels_per_class": [3], "overrides": TINY}))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "recipe": str(recipe), "labels_per_class": 3, "seeds": [100, 101], "split": "val", "reference": "base",
        "variants": {"base": [], "soft": ["student.distillation=soft"], "hard": ["student.distillation=hard"],
                     "cls_only_hard": ["student.distillation=hard", "student.dist_token=false"],
                     "soft_more_views": ["soft_labels.views=3"], "teacher": []}}))
    out, work = tmp_path / "grid.json", tmp_path / "work"
    res = _bench("variants.py", str(grid), "--jobs", "2", "--workdir", str(work), "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert set(summary) == {"base", "soft", "hard", "cls_only_hard", "soft_more_views", "teacher"}
    assert summary["base"]["model"] == "baseline" and summary["teacher"]["model"] == "teacher"
    diff = summary["soft"]["minus_base"]
    runs = {(r["variant"], r["seed"]): r for r in report["runs"]}
    assert diff["values"] == pytest.approx([runs["soft", s]["top1"] - runs["base", s]["top1"] for s in (100, 101)])
    for seed in (100, 101):
        groups = list((work / f"seed{seed}").glob("T*"))
        assert len(groups) == 1  # every variant agrees on data and teacher: one teacher per seed
        assert len(list(groups[0].glob("D*/S*"))) == 2  # two store configurations (2 and 3 views)
        assert len(list(groups[0].glob("models/teacher.safetensors"))) == 1
    assert summary["cls_only_hard"]["top1"]["n"] == 2


def test_distill_gain_follows_the_seed_policy_and_scores_validation(tmp_path):
    res = _bench("distill_gain.py", "--split", "val", "--seeds", "1000")
    assert res.returncode == 2 and "seeds >= 1000 are kept for the held-out confirmation" in res.stderr
    res = _bench("distill_gain.py", "--seeds", "5")
    assert res.returncode == 2 and "--allow-screened-seeds" in res.stderr
    out = tmp_path / "gain.json"
    tiny = [a for o in [*TINY, "data.max_per_class=3"] for a in ("-S", o)]
    res = _bench("distill_gain.py", "--split", "val", "--seeds", "100", "101", "--jobs", "2", "--out", str(out), *tiny)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(out.read_text())
    gains = [r["distillation_gain"] for r in report["runs"]]
    assert [r["seed"] for r in report["runs"]] == [100, 101]
    assert report["summary"]["distillation_gain"]["values"] == pytest.approx(gains)
    assert all(0 < r["student"]["top1"] <= 1 for r in report["runs"])
