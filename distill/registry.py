"""Register the distilled student in the MLflow model registry and keep a champion per dataset.

MLflow records, it never decides what the pipeline computes; here it only labels versions. Three ways in,
one alias policy (below):

* :func:`log_and_register_student` (what the evaluate stage calls): logs the servable student
  (:mod:`distill.serving`: raw uint8 images in, class probabilities out; signature, input example and
  preprocessing included) to the stage's run as an MLflow 3 *logged model*, and registers it, so
  ``mlflow.pyfunc.load_model("models:/<name>@champion")`` and ``mlflow models serve`` work. The logged
  model is made with :func:`mlflow.models.Model.log` (the function behind ``mlflow.pyfunc.log_model``,
  which also takes the ``run_id`` to log to, so the stage's run is not made the active run and not ended)
  from the same arguments that wrote the saved folder (:func:`distill.serving.servable_spec`) and from the
  checkpoint inside that folder: the registered model is the DVC output ``models/student_mlflow`` up to
  the ids and times MLflow writes into ``MLmodel``. The logged model is created first in the run's own
  experiment (``Model.log`` alone would file it under ``Default``, there being no active experiment), with
  the run's params. The version's source is ``models:/<model_id>``, as ``mlflow.register_model`` makes it,
  linked to the run. (``Model.log`` also links the run's step-0 metrics to the logged model, and logs its
  ``model_config`` defaults, ``device`` and ``batch_size``, as two params of the run.)
* :func:`log_and_register_model`: the same for a model of any MLflow flavor; the export stage registers the
  ONNX student with it (``mlflow.onnx``, as ``deit-student-onnx``), under the same gate and alias policy.
* :func:`register_student`: registers a file artifact a run already logged (source
  ``runs:/<run_id>/<artifact_path>``); such a version cannot be loaded with ``mlflow.pyfunc``.

Each version is tagged with ``dataset_key``, ``metric_name``, ``metric_value``, ``baseline_value`` (when
known) and ``promotion``: why it was or was not made champion.

Quality gate. A version can become champion only if its metric strictly beats ``Score.baseline``, the
labels-only baseline of its own run on the same test set (the evaluate stage passes it): a student
that distillation did not improve, or a short trial whose student is no better than its baseline, is
registered as ``candidate`` and serves nothing. (To serve such a version anyway, set the alias by hand:
``MlflowClient().set_registered_model_alias(name, "champion", version)``.)

Alias policy. Aliases belong to a registered model, but accuracies are only comparable on the same
test set, so champions are kept per dataset:

* ``champion-<12 hex of sha256(dataset_key)>`` marks the best version for that dataset. A new version
  that passes the gate takes it when no version holds it, or when its metric is strictly greater than
  the holder's ``metric_value`` tag (a tie keeps the incumbent; a holder with an unreadable metric or
  another ``metric_name`` is not comparable and is replaced).
* ``champion`` marks the champion of the dataset registered most recently: ``models:/<name>@champion``
  is what the pipeline, as configured now, would serve. After each registration it points at the
  per-dataset champion of this call's dataset, whether that is the new version or an older one.
  So switching the pipeline to another dataset moves ``champion`` there (without comparing metrics
  across test sets) once that dataset has a version that passed the gate, and switching back restores
  that dataset's best version, not the latest one. While the dataset has none, ``champion`` stays where
  it was: a served ``@champion`` never moves to a model that failed the gate.
* ``candidate`` marks the newest version that did not become its dataset's champion.

The read-compare-set sequence is not atomic: two registrations of the same model at the same moment
can both believe they won. The pipeline runs one evaluate stage at a time.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from distill.serving import servable_checkpoint, servable_spec
from distill.tracking import Tracker, using_tracking_uri

__all__ = ["CANDIDATE", "CHAMPION", "RegistryError", "Score", "dataset_alias", "gate_verdict",
           "log_and_register_model", "log_and_register_student", "promotion_note", "register_student"]

CHAMPION = "champion"
CANDIDATE = "candidate"
_T = TypeVar("_T")


class RegistryError(RuntimeError):
    """The model registry could not be read or written (the message names the tracking URI)."""


@dataclass(frozen=True)
class Score:
    """What a new version is judged on (module docstring: quality gate, alias policy).

    Attributes:
        metric: the value champions are compared on, higher is better (test top-1 as a fraction).
        dataset_key: identifies the test set the metric was measured on (data fingerprint and split).
        metric_name: the name of ``metric``, stored as a tag; versions are compared only on the same name.
        baseline: the same metric of the labels-only baseline of the same run, which ``metric`` must beat to
            become champion; None: no gate (a version registered outside the pipeline).
    """

    metric: float
    dataset_key: str
    metric_name: str = "test_top1"
    baseline: float | None = None


def gate_verdict(score: Score) -> tuple[bool, str]:
    """Whether ``score`` passes the quality gate (it beats its own baseline), and why, in words."""
    if score.baseline is None:
        return True, "no baseline to beat (no gate)"
    gain = score.metric - score.baseline
    beats = gain > 0
    return beats, (f"{score.metric_name} {score.metric:.4f} {'beats' if beats else 'does not beat'} its own "
                   f"labels-only baseline {score.baseline:.4f} ({gain * 100:+.2f} points)")


def dataset_alias(dataset_key: str) -> str:
    """The per-dataset champion alias, e.g. ``champion-3f2a9c1b2d4e`` (MLflow aliases allow ``[\\w-]`` only)."""
    return f"{CHAMPION}-{hashlib.sha256(dataset_key.encode()).hexdigest()[:12]}"


def _alias_holder(client: Any, name: str, alias: str) -> Any | None:
    """The version holding ``alias``, or None when the alias is not set."""
    versions = client.get_registered_model(name).aliases
    if alias not in versions:
        return None
    return client.get_model_version(name, str(versions[alias]))


def _tag_metric(version: Any, metric_name: str) -> float | None:
    """The version's recorded metric, or None if missing, unparsable or for another metric."""
    if version.tags.get("metric_name") != metric_name:
        return None
    try:
        value = float(version.tags.get("metric_value", "nan"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _ensure_registered_model(client: Any, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description="DeiT students distilled from a CNN teacher (distill).")


def _in_registry(uri: str, what: str, work: Callable[[Any], _T]) -> _T:
    """``work(client)`` against the registry of ``uri``; any failure becomes a :class:`RegistryError` naming ``uri``.

    MlflowException, SQLAlchemy and HTTP errors alike: the message adds the URI, the cause is kept.
    """
    try:
        return work(mlflow.MlflowClient(tracking_uri=uri))
    except Exception as err:
        raise RegistryError(f"could not register {what} in the model registry at {uri}: {err}") from err


def register_student(*, run_id: str, artifact_path: str, model_name: str, score: Score) -> dict[str, Any]:
    """Register a run's student artifact as a new model version and set its alias (see module docstring).

    Uses the current MLflow tracking URI (the caller sets it), which is also the registry URI. The version is
    a plain artifact folder, not an MLflow model: :func:`log_and_register_student` registers a servable one.

    Args:
        run_id: The MLflow run that logged the artifact.
        artifact_path: The artifact folder inside the run, e.g. ``"student_model"``.
        model_name: The registered model's name (created if missing).
        score: its metric, test set and baseline (:class:`Score`).

    Returns:
        ``{"name", "version", "alias", "metric", "baseline_metric", "reason", "previous_champion_version",
        "previous_champion_metric", "dataset_alias", "champion_version"}``: ``alias`` is ``"champion"`` or
        ``"candidate"`` and ``reason`` says why; the ``previous_champion_*`` entries describe the dataset's
        champion this version was compared with (None if there was none); ``champion_version`` is who holds
        ``champion`` afterwards (None if no version does).

    Raises:
        RegistryError: If the tracking store cannot be reached, read or written; names the URI.
    """
    artifact_path = artifact_path.strip("/")

    def register(client: Any) -> dict[str, Any]:
        _check_source(client, run_id, artifact_path)
        return _register(client, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, model_id=None,
                         model_name=model_name, score=score)

    return _in_registry(mlflow.get_tracking_uri(), f"{model_name!r} (run {run_id})", register)


def log_and_register_student(tracker: Tracker, model_dir: str | Path, *, model_name: str, score: Score,
                             name: str = "student") -> dict[str, Any]:
    """Log the servable student to the tracker's run as an MLflow logged model, register it, set its alias.

    See the module docstring for how it is logged, the quality gate and the alias policy. The run is tagged with
    the version and alias it got and why (``registry.version``, ``registry.alias``, ``registry.reason``).

    Args:
        tracker: the evaluate stage's tracker; a tracker without an MLflow run (:class:`~distill.tracking.NullTracker`,
            ``run_id`` None) or one that went offline (tracking server gone mid-stage) logs nothing.
        model_dir: a model folder written by :func:`distill.serving.save_servable` (``models/student_mlflow``).
        model_name: The registered model's name (created if missing).
        score: its metric, test set and baseline (:class:`Score`).
        name: the logged model's name (MLflow 3 ``name``, formerly ``artifact_path``).

    Returns:
        What :func:`register_student` returns, or ``{}`` when nothing was logged.

    Raises:
        CheckpointError: ``model_dir`` is not a servable model folder.
        RegistryError: the tracking store cannot be reached, read or written; names the tracking URI.
    """
    if _logging_run(tracker) is None:
        return {}
    checkpoint = servable_checkpoint(model_dir)
    return log_and_register_model(tracker, lambda: servable_spec(checkpoint), flavor=mlflow.pyfunc,
                                  model_name=model_name, score=score, name=name)


def log_and_register_model(tracker: Tracker, spec: Callable[[], AbstractContextManager[dict[str, Any]]], *,
                           flavor: Any, model_name: str, score: Score, name: str) -> dict[str, Any]:
    """Log a model of any MLflow flavor to the tracker's run, register it and set its alias (one policy for all).

    :func:`log_and_register_student` logs the pyfunc student with it; the export stage the ONNX student
    (``mlflow.onnx``), registered beside it under its own name with the same gate and alias policy.

    Args:
        tracker: as for :func:`log_and_register_student` (no run, or offline: nothing is logged).
        spec: a context manager factory yielding the keyword arguments of ``flavor.save_model`` (through
            :func:`mlflow.models.Model.log`): the model, signature, input example, metadata, requirements.
        flavor: the MLflow flavor module (``mlflow.pyfunc``, ``mlflow.onnx``).
        model_name: the registered model's name (created if missing).
        score: its metric, test set and baseline (:class:`Score`).
        name: the logged model's name.

    Returns:
        What :func:`register_student` returns, or ``{}`` when nothing was logged.

    Raises:
        RegistryError: the tracking store cannot be reached, read or written; names the tracking URI.
    """
    run_id = _logging_run(tracker)
    if run_id is None:
        return {}
    uri = getattr(tracker, "uri", None) or mlflow.get_tracking_uri()
    tracker.flush()  # the run's metrics are in the store: Model.log links those of step 0 to the logged model

    def log_and_register(client: Any) -> dict[str, Any]:
        # The global URI too: Model.log takes none, and MLflow's SQL registry resolves a models:/ source with it.
        with spec() as kwargs, using_tracking_uri(uri):
            model_id = _new_logged_model(client, run_id, name)
            info = Model.log(artifact_path=None, name=name, flavor=flavor, run_id=run_id, model_id=model_id, **kwargs)
            return _register(client, source=info.model_uri, run_id=run_id, model_id=info.model_id,
                             model_name=model_name, score=score)

    result = _in_registry(uri, f"{model_name!r} (run {run_id})", log_and_register)
    tracker.set_tags({"registry.version": result["version"], "registry.alias": result["alias"],
                      "registry.reason": result["reason"]})
    return result


def promotion_note(result: dict[str, Any]) -> str | None:
    """The terminal's line on a version that was registered but not made champion (None: it was, or none was made)."""
    if not result or result["alias"] == CHAMPION:
        return None
    held = (f"@champion stays on version {result['champion_version']}" if result["champion_version"]
            else "no version is @champion")
    return (f"{result['name']} version {result['version']} registered as @{result['alias']}, not promoted: "
            f"{result['reason']}; {held}.")


def _logging_run(tracker: Tracker) -> str | None:
    """The run a model is logged to, or None: no MLflow run (a NullTracker), or a tracker gone offline."""
    run_id = getattr(tracker, "run_id", None)
    return None if run_id is None or getattr(tracker, "offline", False) else run_id


def _new_logged_model(client: Any, run_id: str, name: str) -> str:
    """A new logged model of ``run_id``, in the run's own experiment; returns its id (for ``Model.log``).

    ``Model.log(run_id=...)`` alone files the model under the *active* experiment, which in a stage process
    (runs made through ``MlflowClient``, none active) is ``Default``: the run's experiment would show no model.
    The run's params go on the model, as ``Model.log`` does for a model it creates itself.
    """
    run = client.get_run(run_id)
    return client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                      params=dict(run.data.params)).model_id


def _check_source(client: Any, run_id: str, artifact_path: str) -> None:
    """Fail before registering when the run does not exist or logged nothing under ``artifact_path``.

    MLflow itself accepts a ``runs:/`` source of a missing run, which would register a version whose
    files cannot be downloaded.
    """
    client.get_run(run_id)  # raises RESOURCE_DOES_NOT_EXIST for an unknown run
    if not client.list_artifacts(run_id, artifact_path):
        raise RegistryError(f"run {run_id} has no artifacts under {artifact_path!r}: log the model first")


def _register(client: Any, *, source: str, run_id: str, model_id: str | None, model_name: str,
              score: Score) -> dict[str, Any]:
    """Create a version from ``source`` and apply the gate and the alias policy (module docstring): the one place."""
    _ensure_registered_model(client, model_name)
    per_dataset = dataset_alias(score.dataset_key)
    previous = _alias_holder(client, model_name, per_dataset)
    previous_metric = _tag_metric(previous, score.metric_name) if previous is not None else None
    passes, reason = gate_verdict(score)
    if passes and previous is not None and previous_metric is not None:
        incumbent = f"the dataset's champion, version {previous.version} ({previous_metric:.4f})"
        passes = score.metric > previous_metric
        reason = f"{reason} and {incumbent}" if passes else f"{reason}, but not {incumbent}"
    tags = {"dataset_key": score.dataset_key, "metric_name": score.metric_name, "metric_value": repr(score.metric),
            "promotion": ("champion: " if passes else "candidate: ") + reason}
    if score.baseline is not None:
        tags["baseline_value"] = repr(score.baseline)
    version = client.create_model_version(
        model_name, source=source, run_id=run_id, model_id=model_id, tags=tags,
        description=f"{score.metric_name} = {score.metric:.4f} on {score.dataset_key}; {tags['promotion']}")
    client.set_registered_model_alias(model_name, per_dataset if passes else CANDIDATE, version.version)
    champion = version if passes else previous  # this dataset's champion, if it has one
    if champion is not None:
        client.set_registered_model_alias(model_name, CHAMPION, champion.version)
    holder = _alias_holder(client, model_name, CHAMPION)  # else `champion` stays where it was
    return {
        "name": model_name,
        "version": str(version.version),
        "alias": CHAMPION if passes else CANDIDATE,
        "metric": score.metric,
        "baseline_metric": score.baseline,
        "reason": reason,
        "previous_champion_version": None if previous is None else str(previous.version),
        "previous_champion_metric": previous_metric,
        "dataset_alias": per_dataset,
        "champion_version": None if holder is None else str(holder.version),
    }
