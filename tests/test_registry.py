"""The registry against a real MLflow SQLite store (no mocks): champion per dataset, candidate otherwise;
the servable student logged as an MLflow model and loaded back through its alias."""

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from test_serving import CLASSES, raw_images, student_checkpoint

from distill.registry import RegistryError, Score, dataset_alias, log_and_register_student, register_student
from distill.serving import save_servable
from distill.tracking import MlflowTracker, NullTracker, restore_tracking_uri, tracking_uri_state, using_tracking_uri

MODEL = "deit-student-test"
LOGGED = "deit-student-logged"
DIGITS, CIFAR = "digits-fingerprint:test", "cifar-fingerprint:test"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (MLflow's schema migration takes seconds); URI restored afterwards."""
    root = tmp_path_factory.mktemp("mlflow")
    previous = tracking_uri_state()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    client = MlflowClient()
    experiment_id = client.create_experiment("registry-test", artifact_location=root.as_uri() + "/artifacts")
    model_dir = root / "student_model"
    model_dir.mkdir()
    (model_dir / "student.safetensors").write_bytes(b"not really weights")
    yield client, experiment_id, model_dir
    restore_tracking_uri(previous)


def _register(store, metric, dataset_key, *, baseline=None, model_name=MODEL):
    client, experiment_id, model_dir = store
    run_id = client.create_run(experiment_id).info.run_id
    client.log_artifact(run_id, str(model_dir / "student.safetensors"), "student_model")
    return register_student(run_id=run_id, artifact_path="student_model", model_name=model_name,
                            score=Score(metric, dataset_key, baseline=baseline))


def _aliases(client, name=MODEL):
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def test_champion_policy_per_dataset(store, tmp_path):
    client = store[0]
    digits, cifar = dataset_alias(DIGITS), dataset_alias(CIFAR)

    first = _register(store, 0.95, DIGITS)
    assert first == {"name": MODEL, "version": "1", "alias": "champion", "metric": 0.95, "baseline_metric": None,
                     "reason": "no baseline to beat (no gate)", "previous_champion_version": None,
                     "previous_champion_metric": None, "dataset_alias": digits, "champion_version": "1"}
    tags = client.get_model_version(MODEL, "1").tags
    assert tags["dataset_key"] == DIGITS and tags["metric_name"] == "test_top1" and float(tags["metric_value"]) == 0.95

    worse = _register(store, 0.93, DIGITS)
    assert (worse["alias"], worse["previous_champion_version"], worse["previous_champion_metric"]) == \
        ("candidate", "1", 0.95)
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


def test_quality_gate_a_student_must_beat_its_own_baseline(store):
    """The reported case: a short trial's 28 % student on a new dataset took `champion` from a good model."""
    client, name = store[0], "deit-student-gated"
    digits, cifar = dataset_alias(DIGITS), dataset_alias(CIFAR)

    first = _register(store, 0.28, DIGITS, baseline=0.30, model_name=name)  # worse than its own baseline
    assert (first["alias"], first["champion_version"]) == ("candidate", None)
    assert first["reason"] == "test_top1 0.2800 does not beat its own labels-only baseline 0.3000 (-2.00 points)"
    assert _aliases(client, name) == {"candidate": "1"}  # nothing to serve rather than a bad model
    tags = client.get_model_version(name, "1").tags
    assert tags["promotion"] == "candidate: " + first["reason"] and float(tags["baseline_value"]) == 0.30

    good = _register(store, 0.95, DIGITS, baseline=0.90, model_name=name)
    assert (good["alias"], good["champion_version"]) == ("champion", "2")
    assert _aliases(client, name) == {"champion": "2", digits: "2", "candidate": "1"}

    # A new dataset's first model, no better than its own baseline: `champion` stays on the good model.
    trial = _register(store, 0.28, CIFAR, baseline=0.28, model_name=name)  # a tie is not a gain
    assert (trial["alias"], trial["champion_version"]) == ("candidate", "2")
    assert _aliases(client, name) == {"champion": "2", digits: "2", "candidate": "3"}

    passed = _register(store, 0.60, CIFAR, baseline=0.50, model_name=name)
    assert (passed["alias"], passed["champion_version"]) == ("champion", "4")
    assert _aliases(client, name) == {"champion": "4", cifar: "4", digits: "2", "candidate": "3"}

    # Better than the dataset's champion, but not than its own baseline: candidate.
    unhelped = _register(store, 0.70, CIFAR, baseline=0.75, model_name=name)
    assert (unhelped["alias"], unhelped["champion_version"]) == ("candidate", "4")
    # Better than its baseline, but not than the dataset's champion: candidate, and the reason says both.
    weaker = _register(store, 0.55, CIFAR, baseline=0.50, model_name=name)
    assert weaker["alias"] == "candidate" and weaker["reason"] == (
        "test_top1 0.5500 beats its own labels-only baseline 0.5000 (+5.00 points), but not the dataset's "
        "champion, version 4 (0.6000)")
    assert _aliases(client, name) == {"champion": "4", cifar: "4", digits: "2", "candidate": "6"}


def test_unusable_store_names_the_uri(store, tmp_path):
    (tmp_path / "a_file").write_text("")
    bad = f"sqlite:///{tmp_path}/a_file/mlflow.db"  # a database inside a regular file cannot be created
    with using_tracking_uri(bad), pytest.raises(RegistryError, match="a_file/mlflow.db"):
        register_student(run_id="0" * 32, artifact_path="student_model", model_name=MODEL, score=Score(0.5, DIGITS))


def test_missing_run_or_artifact_is_refused(store):
    client, experiment_id, _ = store
    with pytest.raises(RegistryError, match="0{32}"):
        register_student(run_id="0" * 32, artifact_path="student_model", model_name=MODEL, score=Score(0.5, DIGITS))
    empty_run = client.create_run(experiment_id).info.run_id
    with pytest.raises(RegistryError, match="no artifacts under 'student_model'"):
        register_student(run_id=empty_run, artifact_path="student_model", model_name=MODEL, score=Score(0.5, DIGITS))


@pytest.fixture(scope="module")
def servable(tmp_path_factory):
    """A student saved as the evaluate stage saves it (``models/student_mlflow``)."""
    root = tmp_path_factory.mktemp("servable")
    return save_servable(student_checkpoint(root / "student.safetensors"), root / "student_mlflow")


def _tracker(store):
    """A stage's tracker: a run of its own with a param, left RUNNING (the stage ends it)."""
    client, experiment_id, _ = store
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "seed", 0)
    return MlflowTracker(run_id, uri=mlflow.get_tracking_uri())


def test_logged_student_loads_and_predicts_through_its_alias(store, servable):
    client = store[0]
    tracker = _tracker(store)
    first = log_and_register_student(tracker, servable, model_name=LOGGED, score=Score(0.9, DIGITS))
    assert first == {"name": LOGGED, "version": "1", "alias": "champion", "metric": 0.9, "baseline_metric": None,
                     "reason": "no baseline to beat (no gate)", "previous_champion_version": None,
                     "previous_champion_metric": None, "dataset_alias": dataset_alias(DIGITS), "champion_version": "1"}

    images = raw_images(3, 20, 18)
    expected = mlflow.pyfunc.load_model(str(servable)).predict(images)
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(f"models:/{LOGGED}@champion").predict(images), expected)

    info = mlflow.models.get_model_info(f"models:/{LOGGED}@champion")
    (inputs,), (outputs,) = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert (inputs.type, inputs.shape, outputs.shape) == (np.dtype(np.uint8), (-1, -1, -1, 3), (-1, CLASSES))
    assert info.saved_input_example_info["type"] == "ndarray" and info.metadata["class_names"][0] == "ant"

    # A logged model of the stage's run (not a bare artifact), registered from models:/<model_id>.
    version = client.get_model_version(LOGGED, "1")
    assert version.source.startswith("models:/m-") and version.run_id == tracker.run_id
    logged = mlflow.get_logged_model(version.source[len("models:/"):])
    assert logged.source_run_id == tracker.run_id
    # Filed under the run's own experiment (its Models tab), not MLflow's `Default`.
    assert logged.experiment_id == store[1] != "0"
    assert [m.model_id for m in client.search_logged_models([store[1]])].count(logged.model_id) == 1
    assert logged.params.get("seed") == "0" and logged.status == "READY"
    run = client.get_run(tracker.run_id)
    assert run.info.status == "RUNNING"  # logging did not end the stage's run
    assert (run.data.tags["registry.version"], run.data.tags["registry.alias"]) == ("1", "champion")

    # A second, worse student: candidate; champion stays with the first, and both load.
    second = log_and_register_student(_tracker(store), servable, model_name=LOGGED, score=Score(0.8, DIGITS))
    assert (second["version"], second["alias"], second["champion_version"]) == ("2", "candidate", "1")
    assert _aliases(client, LOGGED) == {"champion": "1", dataset_alias(DIGITS): "1", "candidate": "2"}
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(f"models:/{LOGGED}@candidate").predict(images), expected)


def test_no_run_or_offline_tracker_logs_nothing(store, servable):
    client = store[0]
    assert log_and_register_student(NullTracker(), servable, model_name="never", score=Score(1.0, DIGITS)) == {}
    offline = _tracker(store)
    offline.offline = True  # the tracking server went away during the stage
    assert log_and_register_student(offline, servable, model_name="never", score=Score(1.0, DIGITS)) == {}
    assert client.search_model_versions("name = 'never'") == []


def test_log_and_register_names_the_uri(store, servable):
    uri = mlflow.get_tracking_uri()
    tracker = MlflowTracker("0" * 32, uri=uri)  # a run the store does not have
    with pytest.raises(RegistryError, match=f"run 0{{32}}.* at {uri}"):
        log_and_register_student(tracker, servable, model_name=LOGGED, score=Score(0.5, DIGITS))
