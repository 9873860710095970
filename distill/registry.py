"""Register the distilled student in the MLflow model registry and keep a champion per dataset.

MLflow records, it never decides what the pipeline computes; here it only labels versions. Each
call adds a new version of the registered model whose source is ``runs:/<run_id>/<artifact_path>``
(a plain artifact folder holding the self-describing ``.safetensors`` checkpoint; MLflow 3 accepts a
``runs:/`` source for ``create_model_version`` without an MLflow "logged model"). The version is
tagged with ``dataset_key``, ``metric_name`` and ``metric_value``.

Alias policy. Aliases belong to a registered model, but accuracies are only comparable on the same
test set, so champions are kept per dataset:

* ``champion-<12 hex of sha256(dataset_key)>`` marks the best version for that dataset. A new version
  takes it when no version holds it, or when its metric is strictly greater than the holder's
  ``metric_value`` tag (a tie keeps the incumbent; a holder with an unreadable metric or another
  ``metric_name`` is not comparable and is replaced).
* ``champion`` marks the champion of the dataset registered most recently: ``models:/<name>@champion``
  is what the pipeline, as configured now, would serve. After each registration it points at the
  per-dataset champion of this call's dataset, whether that is the new version or an older one.
  So switching the pipeline to another dataset moves ``champion`` there (without comparing metrics
  across test sets), and switching back restores that dataset's best version, not the latest one.
* ``candidate`` marks the newest version that did not become its dataset's champion.

The read-compare-set sequence is not atomic: two registrations of the same model at the same moment
can both believe they won. The pipeline runs one evaluate stage at a time.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Optional

__all__ = ["RegistryError", "register_student", "dataset_alias", "CHAMPION", "CANDIDATE"]

CHAMPION = "champion"
CANDIDATE = "candidate"


class RegistryError(RuntimeError):
    """The model registry could not be read or written (the message names the tracking URI)."""


def dataset_alias(dataset_key: str) -> str:
    """The per-dataset champion alias, e.g. ``champion-3f2a9c1b2d4e`` (MLflow aliases allow ``[\\w-]`` only)."""
    return f"{CHAMPION}-{hashlib.sha256(dataset_key.encode()).hexdigest()[:12]}"


def _alias_holder(client: Any, name: str, alias: str) -> Optional[Any]:
    """The version holding ``alias``, or None when the alias is not set."""
    versions = client.get_registered_model(name).aliases
    if alias not in versions:
        return None
    return client.get_model_version(name, str(versions[alias]))


def _tag_metric(version: Any, metric_name: str) -> Optional[float]:
    """The version's recorded metric, or None if missing, unparsable or for another metric."""
    if version.tags.get("metric_name") != metric_name:
        return None
    try:
        value = float(version.tags.get("metric_value", "nan"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description="DeiT students distilled from a CNN teacher (distill).")


def register_student(*, run_id: str, artifact_path: str, model_name: str, metric: float, dataset_key: str,
                     metric_name: str = "test_top1") -> dict[str, Any]:
    """Register a run's student artifact as a new model version and set its alias (see module docstring).

    Uses the current MLflow tracking URI (the caller sets it), which is also the registry URI.

    Args:
        run_id: The MLflow run that logged the artifact.
        artifact_path: The artifact folder inside the run, e.g. ``"student_model"``.
        model_name: The registered model's name (created if missing).
        metric: The value champions are compared on, higher is better (test top-1 as a fraction).
        dataset_key: Identifies the test set the metric was measured on (data fingerprint and split).
        metric_name: Name of ``metric``, stored as a tag; versions are compared only on the same name.

    Returns:
        ``{"name", "version", "alias", "metric", "previous_champion_version", "previous_champion_metric",
        "dataset_alias", "champion_version"}``: ``alias`` is ``"champion"`` or ``"candidate"``; the
        ``previous_champion_*`` entries describe the dataset's champion this version was compared with
        (None if there was none); ``champion_version`` is who holds ``champion`` afterwards.

    Raises:
        RegistryError: If the tracking store cannot be reached, read or written; names the URI.
    """
    import mlflow

    uri = mlflow.get_tracking_uri()
    try:
        return _register(mlflow.MlflowClient(), run_id=run_id, artifact_path=artifact_path, model_name=model_name,
                         metric=float(metric), dataset_key=dataset_key, metric_name=metric_name)
    except Exception as err:  # MlflowException, SQLAlchemy and HTTP errors alike: add the URI, keep the cause
        raise RegistryError(f"could not register {model_name!r} (run {run_id}) in the model registry at {uri}: "
                            f"{err}") from err


def _check_source(client: Any, run_id: str, artifact_path: str) -> None:
    """Fail before registering when the run does not exist or logged nothing under ``artifact_path``.

    MLflow itself accepts a ``runs:/`` source of a missing run, which would register a version whose
    files cannot be downloaded.
    """
    client.get_run(run_id)  # raises RESOURCE_DOES_NOT_EXIST for an unknown run
    if not client.list_artifacts(run_id, artifact_path):
        raise RegistryError(f"run {run_id} has no artifacts under {artifact_path!r}: log the model first")


def _register(client: Any, *, run_id: str, artifact_path: str, model_name: str, metric: float, dataset_key: str,
              metric_name: str) -> dict[str, Any]:
    artifact_path = artifact_path.strip("/")
    _check_source(client, run_id, artifact_path)
    _ensure_registered_model(client, model_name)
    per_dataset = dataset_alias(dataset_key)
    previous = _alias_holder(client, model_name, per_dataset)
    previous_metric = _tag_metric(previous, metric_name) if previous is not None else None
    version = client.create_model_version(
        model_name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
        tags={"dataset_key": dataset_key, "metric_name": metric_name, "metric_value": repr(metric)},
        description=f"{metric_name} = {metric:.4f} on {dataset_key}")
    wins = previous is None or previous_metric is None or metric > previous_metric
    if wins:
        client.set_registered_model_alias(model_name, per_dataset, version.version)
    else:
        client.set_registered_model_alias(model_name, CANDIDATE, version.version)
    champion_version = version.version if wins else previous.version
    client.set_registered_model_alias(model_name, CHAMPION, champion_version)
    return {
        "name": model_name,
        "version": str(version.version),
        "alias": CHAMPION if wins else CANDIDATE,
        "metric": metric,
        "previous_champion_version": None if previous is None else str(previous.version),
        "previous_champion_metric": previous_metric,
        "dataset_alias": per_dataset,
        "champion_version": str(champion_version),
    }
