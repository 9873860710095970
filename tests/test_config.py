from pathlib import Path

import pytest
import yaml

from distill.config import (
    ParamsError,
    ParamsView,
    UndeclaredParamError,
    apply_overrides,
    declared_params,
    load_params,
    merge,
    parse_params,
)

from helpers import project_raw

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_yaml_is_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.data.name == "digits"
    assert p.student.distillation in ("none", "soft", "hard")


@pytest.mark.parametrize(
    "change, must_contain",
    [
        ({"student": {"alpah": 0.5}}, ["student.alpah", "unknown key", "alpha"]),
        ({"student": {"alpha": 1.5}}, ["student.alpha", "1.5", "less than or equal to 1"]),
        ({"teacher": {"train": {"epochs": "many"}}}, ["teacher.train.epochs", "'many'", "integer"]),
        ({"data": {"name": "imagenet"}}, ["data.name", "'imagenet'", "digits"]),
        ({"student": {"distillation": "medium"}}, ["student.distillation", "'soft'", "'hard'"]),
        ({"studnt": {}}, ["studnt", "unknown key", "student"]),
        ({"data": {"augment": {"scale": [0.9, 0.1]}}}, ["data.augment", "scale"]),
        ({"student": {"train": {"epochs": 3, "warmup_epochs": 5}}}, ["student.train", "warmup_epochs"]),
        ({"student": {"train": {"epochs": 0}}}, ["student", "at least 1"]),
        ({"teacher": {"train": {"epochs": 0}}}, ["teacher", "pretrained_path"]),
        ({"teacher": {"mean": [0.5]}}, ["teacher", "both teacher.mean and teacher.std"]),
        ({"data": {"unlabeled": True, "max_per_class": None}}, ["data", "max_per_class"]),
    ],
)
def test_bad_params_name_the_key(change, must_contain):
    with pytest.raises(ParamsError) as err:
        parse_params(merge(project_raw(), change))
    for s in must_contain:
        assert s in str(err.value)


def test_the_schema_has_no_defaults_a_missing_key_is_an_error():
    """params.yaml is the only source of values: nothing in the code could contradict it."""
    raw = project_raw()
    del raw["student"]["alpha"]
    del raw["baseline"]
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert "student.alpha: missing" in str(err.value) and "baseline: missing" in str(err.value)
    with pytest.raises(ParamsError, match="missing"):
        parse_params({})


def test_an_image_folder_may_bring_its_own_unlabeled_images_without_a_cap():
    p = parse_params(merge(project_raw(), {"data": {"name": "imagefolder", "unlabeled": True, "max_per_class": None}}))
    assert p.data.unlabeled and p.data.max_per_class is None


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("student: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_round_trip(tmp_path):
    p = load_params(ROOT / "params.yaml")
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    assert load_params(f) == p


def test_overrides_use_dvc_syntax_and_are_validated():
    raw = project_raw()
    out = apply_overrides(raw, ["student.alpha=0.7", "data.augment.scale=[0.2, 1.0]", "student.distillation=soft"])
    assert raw == project_raw()  # input untouched
    p = parse_params(out)
    assert (p.student.alpha, p.data.augment.scale, p.student.distillation) == (0.7, (0.2, 1.0), "soft")
    with pytest.raises(ParamsError, match="student.alpah"):
        parse_params(apply_overrides(raw, ["student.alpah=1"]))
    with pytest.raises(ParamsError, match="key.path=value"):
        apply_overrides(raw, ["student.alpha"])
    with pytest.raises(ParamsError, match="not a group"):
        apply_overrides(raw, ["student.alpha.x=1"])


def test_a_stage_reads_only_what_dvc_yaml_declares_and_its_reads_are_recorded():
    params = load_params(ROOT / "params.yaml")
    view = ParamsView(params, stage="baseline", declared=declared_params("baseline", ROOT / "dvc.yaml"))
    assert view.student.train.lr == params.student.train.lr
    assert view.baseline.budget == params.baseline.budget
    assert view.reads == {"student.train.lr", "baseline.budget"}
    with pytest.raises(UndeclaredParamError, match=r"'student\.alpha'.*stages\.baseline\.params"):
        _ = view.student.alpha
    assert view.student.model.resolve() == params.student.model  # a whole group: every key in it is read
    assert "student.model.preset" in view.reads and "student.model.pretrained_path" in view.reads
    with pytest.raises(AttributeError):
        _ = view.student.train.nope
    with pytest.raises(AttributeError, match="read-only"):
        view.seed = 3
    # What a stage logs and keys its resume state with is everything it declares, not counted as reads.
    assert set(view.declared()) == {"seed", "data", "student", "baseline"}
    assert set(view.declared()["data"]) == {"augment"}
    assert "student.train.epochs" not in view.reads


def test_declared_params_of_an_unknown_stage_is_a_clear_error(tmp_path):
    with pytest.raises(ParamsError, match="stage 'nope'"):
        declared_params("nope", ROOT / "dvc.yaml")
    with pytest.raises(ParamsError, match="cannot read"):
        declared_params("data", tmp_path / "dvc.yaml")
