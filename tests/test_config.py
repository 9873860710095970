from pathlib import Path

import pytest
import yaml

from distill.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_yaml_is_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.data.name == "digits"
    assert p.student.distillation in ("none", "soft", "hard")


@pytest.mark.parametrize(
    "raw, must_contain",
    [
        ({"student": {"alpah": 0.5}}, ["student.alpah", "unknown key", "alpha"]),
        ({"student": {"alpha": 1.5}}, ["student.alpha", "1.5", "less than or equal to 1"]),
        ({"teacher": {"train": {"epochs": "many"}}}, ["teacher.train.epochs", "'many'", "integer"]),
        ({"data": {"name": "imagenet"}}, ["data.name", "'imagenet'", "digits"]),
        ({"student": {"distillation": "medium"}}, ["student.distillation", "'soft'", "'hard'"]),
        ({"studnt": {}}, ["studnt", "unknown key", "student"]),
        ({"data": {"augment": {"scale": [0.9, 0.1]}}}, ["data.augment", "scale"]),
        ({"student": {"train": {"epochs": 3, "warmup_epochs": 5}}}, ["student.train", "warmup_epochs"]),
        ({"data": {"name": "imagefolder"}}, ["data", "data.root is required"]),
    ],
)
def test_bad_params_name_the_key(raw, must_contain):
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    for s in must_contain:
        assert s in str(err.value)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("student: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_round_trip_defaults(tmp_path):
    p = parse_params({})
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    assert load_params(f) == p


def test_overrides_use_dvc_syntax_and_are_validated():
    from distill.config import apply_overrides

    raw = {"student": {"alpha": 0.5}}
    out = apply_overrides(raw, ["student.alpha=0.7", "data.augment.scale=[0.2, 1.0]", "student.distillation=soft"])
    assert raw == {"student": {"alpha": 0.5}}  # input untouched
    p = parse_params(out)
    assert (p.student.alpha, p.data.augment.scale, p.student.distillation) == (0.7, (0.2, 1.0), "soft")
    with pytest.raises(ParamsError, match="student.alpah"):
        parse_params(apply_overrides(raw, ["student.alpah=1"]))
    with pytest.raises(ParamsError, match="key.path=value"):
        apply_overrides(raw, ["student.alpha"])
    with pytest.raises(ParamsError, match="not a group"):
        apply_overrides(raw, ["student.alpha.x=1"])
