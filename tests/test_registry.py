"""The registry against a real MLflow SQLite store (no mocks): champion per dataset, candidate otherwise."""

import mlflow
import pytest
from mlflow import MlflowClient

from distill.registry import RegistryError, dataset_alias, register_student

MODEL = "deit-student-test"
DIGITS, CIFAR = "digits-fingerprint:test", "cifar-fingerprint:test"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (MLflow's schema migration takes seconds); URI restored afterwards."""
    root = tmp_path_factory.mktemp("mlflow")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    client = MlflowClient()
    experiment_id = client.create_experiment("registry-test", artifact_location=root.as_uri() + "/artifacts")
    model_dir = root / "student_model"
    model_dir.mkdir()
    (model_dir / "student.safetensors").write_bytes(b"not really weights")
    yield client, experiment_id, model_dir
    mlflow.set_tracking_uri(previous)


def _register(store, metric, dataset_key):
    client, experiment_id, model_dir = store
    run_id = client.create_run(experiment_id).info.run_id
    client.log_artifact(run_id, str(model_dir / "student.safetensors"), "student_model")
    return register_student(run_id=run_id, artifact_path="student_model", model_name=MODEL, metric=metric,
                            dataset_key=dataset_key)


def _aliases(client):
    return {alias: str(v) for alias, v in client.get_registered_model(MODEL).aliases.items()}


def test_champion_policy_per_dataset(store, tmp_path):
    client = store[0]
    digits, cifar = dataset_alias(DIGITS), dataset_alias(CIFAR)

    first = _register(store, 0.95, DIGITS)
    assert first == {"name": MODEL, "version": "1", "alias": "champion", "metric": 0.95,
                     "previous_champion_version": None, "previous_champion_metric": None,
                     "dataset_alias": digits, "champion_version": "1"}
    tags = client.get_model_version(MODEL, "1").tags
    assert tags["dataset_key"] == DIGITS and tags["metric_name"] == "test_top1" and float(tags["metric_value"]) == 0.95

    worse = _register(store, 0.93, DIGITS)
    assert (worse["alias"], worse["previous_champion_version"], worse["previous_champion_metric"]) == ("candidate", "1", 0.95)
    tie = _register(store, 0.95, DIGITS)  # strictly greater needed: the incumbent keeps the title
    assert tie["alias"] == "candidate"
    assert _aliases(client) == {"champion": "1", digits: "1", "candidate": "3"}

    better = _register(store, 0.97, DIGITS)
    assert (better["alias"], better["version"], better["previous_champion_version"]) == ("champion", "4", "1")
    assert _aliases(client) == {"champion": "4", digits: "4", "candidate": "3"}

    # Another dataset: not compared with digits' 0.97; it becomes that dataset's champion and `champion` follows it.
    other = _register(store, 0.60, CIFAR)
    assert (other["alias"], other["previous_champion_version"]) == ("champion", None)
    assert _aliases(client) == {"champion": "5", cifar: "5", digits: "4", "candidate": "3"}

    # Back on digits with a weaker model: candidate, and `champion` returns to digits' best, not the newest.
    back = _register(store, 0.96, DIGITS)
    assert (back["alias"], back["champion_version"]) == ("candidate", "4")
    assert _aliases(client) == {"champion": "4", cifar: "5", digits: "4", "candidate": "6"}

    # The registered champion's files are reachable through the alias.
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(tmp_path))
    assert (tmp_path / "student.safetensors").is_file(), local


def test_unusable_store_names_the_uri(store, tmp_path):
    (tmp_path / "a_file").write_text("")
    bad = f"sqlite:///{tmp_path}/a_file/mlflow.db"  # a database inside a regular file cannot be created
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(bad)
    try:
        with pytest.raises(RegistryError, match="a_file/mlflow.db"):
            register_student(run_id="0" * 32, artifact_path="student_model", model_name=MODEL, metric=0.5,
                             dataset_key=DIGITS)
    finally:
        mlflow.set_tracking_uri(previous)


def test_missing_run_or_artifact_is_refused(store):
    client, experiment_id, _ = store
    with pytest.raises(RegistryError, match="0{32}"):
        register_student(run_id="0" * 32, artifact_path="student_model", model_name=MODEL, metric=0.5,
                         dataset_key=DIGITS)
    empty_run = client.create_run(experiment_id).info.run_id
    with pytest.raises(RegistryError, match="no artifacts under 'student_model'"):
        register_student(run_id=empty_run, artifact_path="student_model", model_name=MODEL, metric=0.5,
                         dataset_key=DIGITS)
