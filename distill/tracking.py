"""MLflow tracking helpers: MLflow records, it never decides.

Every figure logged here is also written to DVC's metrics files by the stages, so nothing is lost
if the tracking server is down. Stage functions take a :class:`Tracker`; :class:`NullTracker`
runs them with no tracking at all (tests, benchmarks), :class:`MlflowTracker` logs to MLflow.

Run layout: one *parent* run per pipeline execution, one *child* run per stage. Stages run as
separate processes under DVC, so they find their parent by:

1. ``DISTILL_PARENT_RUN_ID`` in the environment (set by the Prefect pipeline flow), else
2. the run tagged ``distill.pipeline_key`` = the id of the ``dvc`` process that runs the stages (its pid
   and start time), created by the first stage of that execution; a stage run by hand, outside DVC,
   gets a parent of its own.

Tracking URI: ``MLFLOW_TRACKING_URI`` from the environment, else ``sqlite:///<project>/mlflow.db``
(an absolute path, MLflow 3's default backend). An unreachable server fails the stage within ~30 s
with a message naming the URI (see :func:`check_tracking_server`), before any work is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

__all__ = ["Tracker", "NullTracker", "MlflowTracker", "TrackingUnavailableError", "tracking_uri",
           "check_tracking_server", "open_experiment", "create_pipeline_run", "stage_run", "git_commit",
           "dvc_input_hashes", "flatten"]

EXPERIMENT = os.environ.get("DISTILL_MLFLOW_EXPERIMENT", "distill")


class TrackingUnavailableError(RuntimeError):
    """The configured MLflow tracking server cannot be reached."""


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None: ...
    def log_dict(self, data: dict[str, Any], name: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_dataset(self, *, name: str, digest: str, source: str, context: str) -> None: ...


class NullTracker(Tracker):
    """Tracks nothing (stage functions called directly, tests, benchmarks): the protocol's no-op bodies."""

    run_id: Optional[str] = None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class MlflowTracker:
    """Logs to one active MLflow run (a stage's child run)."""

    def __init__(self, run_id: str) -> None:
        import mlflow

        self.run_id = run_id
        self._client = mlflow.MlflowClient()

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        flat = {k: ("null" if v is None else v) for k, v in flatten(params).items()}
        mlflow.log_params(flat, run_id=self.run_id)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if clean:
            mlflow.log_metrics(clean, step=step, run_id=self.run_id)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self._client.log_dict(self.run_id, data, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def log_dataset(self, *, name: str, digest: str, source: str, context: str) -> None:
        import mlflow
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        ds = MetaDataset(source=HTTPDatasetSource(url=source), name=name, digest=digest[:36])
        with _activate(self.run_id):
            mlflow.log_input(ds, context=context)


@contextmanager
def _activate(run_id: str) -> Iterator[None]:
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


def tracking_uri(project_root: str | Path = ".") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an absolute SQLite store in the project."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(project_root).resolve() / 'mlflow.db'}"


def check_tracking_server(uri: str, *, timeout: float = 5.0, attempts: int = 3) -> None:
    """Fail fast (well under 30 s) if an HTTP tracking server does not answer ``/health``.

    Raises:
        TrackingUnavailableError: naming the URI and what to do.
    """
    if not uri.startswith(("http://", "https://")):
        return
    last: Exception | None = None
    for i in range(attempts):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status < 500:
                    return
        except (urllib.error.URLError, OSError) as err:
            last = err
        time.sleep(min(1.0 * (i + 1), 2.0))
    raise TrackingUnavailableError(
        f"MLflow tracking server {uri} is unreachable ({last}). Start it (`mlflow server ...`), fix "
        "MLFLOW_TRACKING_URI, or unset it to track into the local sqlite store. Nothing was run; "
        "the stage's metrics files are unaffected.")


def _set_http_defaults() -> None:
    # MLflow retries HTTP calls for minutes by default; a dead server should fail a stage quickly.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def git_commit(project_root: str | Path = ".") -> str:
    """The current git commit (``unknown`` outside a repository)."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return res.stdout.strip() if res.returncode == 0 else "unknown"


def dvc_input_hashes(stage: str, project_root: str | Path = ".") -> dict[str, str]:
    """DVC's hashes of a stage's input files, read from ``dvc.yaml`` and ``dvc.lock``.

    Each dep of the stage that is an output of another stage gets the md5 DVC recorded for it
    (upstream stages have finished, so their lock entries are current). Plain source-file deps get
    the md5 recorded for this stage's previous run when known.
    """
    import yaml

    root = Path(project_root)
    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text())
        lock = yaml.safe_load((root / "dvc.lock").read_text()) if (root / "dvc.lock").is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
    deps = spec.get("stages", {}).get(stage, {}).get("deps", [])
    known: dict[str, str] = {}
    for st in (lock or {}).get("stages", {}).values():
        for entry in st.get("outs", []) + st.get("deps", []):
            if "md5" in entry:
                known.setdefault(entry["path"], entry["md5"])
    for st_name, st in (lock or {}).get("stages", {}).items():  # outs take precedence
        for entry in st.get("outs", []):
            if "md5" in entry:
                known[entry["path"]] = entry["md5"]
    return {d: known[d] for d in deps if d in known}


def _dvc_execution_id() -> Optional[str]:
    """Identify the ``dvc repro`` / ``dvc exp run`` process that started this stage, if any.

    Every stage of one DVC execution is a child (through a shell) of the same ``dvc`` process, so its pid
    plus its start time names the execution: two runs never share it, and all stages of one run do.
    """
    try:
        import psutil

        proc = psutil.Process().parent()
        while proc is not None:
            argv = proc.cmdline()
            # `dvc ...`, `<python> <venv>/bin/dvc ...` (script shebang) or `python -m dvc ...`
            if any(os.path.basename(a) == "dvc" for a in argv[:2]) or argv[1:3] == ["-m", "dvc"]:
                return f"{proc.pid}-{proc.create_time():.3f}"
            proc = proc.parent()
    except Exception:  # noqa: BLE001 - process table not readable: fall back to a parent per stage
        return None
    return None


def _pipeline_key(project_root: Path) -> Optional[str]:
    execution = _dvc_execution_id()
    if execution is None:
        return None
    h = hashlib.sha256(execution.encode())
    h.update(str(project_root).encode())
    return h.hexdigest()[:16]


def open_experiment(project_root: str | Path = ".") -> tuple[Any, str]:
    """Point MLflow at the project's tracking URI (failing fast if a server is down) and get the experiment.

    Returns:
        ``(MlflowClient, experiment_id)``.

    Raises:
        TrackingUnavailableError: a configured tracking server does not answer.
    """
    import mlflow

    _set_http_defaults()
    uri = tracking_uri(project_root)
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return client, exp.experiment_id
    try:
        return client, client.create_experiment(EXPERIMENT)
    except Exception:  # noqa: BLE001 - another process created it first
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            raise
        return client, exp.experiment_id


def create_pipeline_run(client: Any, experiment_id: str, project_root: Path, *, run_name: str,
                        tags: Optional[dict[str, str]] = None) -> str:
    """Create the parent run of one pipeline execution; returns its id."""
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={"distill.role": "pipeline", "git_commit": git_commit(project_root),
                                  "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), **(tags or {})})
    return run.info.run_id


def _find_or_create_parent(client: Any, experiment_id: str, project_root: Path) -> str:
    key = _pipeline_key(project_root)
    if key is None:  # a stage run by hand: it is its own execution
        return create_pipeline_run(client, experiment_id, project_root, run_name="stage-by-hand")
    found = client.search_runs([experiment_id], filter_string=f"tags.`distill.pipeline_key` = '{key}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        return found[0].info.run_id
    return create_pipeline_run(client, experiment_id, project_root, run_name=f"dvc-{key[:8]}",
                               tags={"distill.pipeline_key": key})


@contextmanager
def stage_run(stage: str, *, project_root: str | Path = ".", params: Optional[dict[str, Any]] = None,
              extra_tags: Optional[dict[str, str]] = None) -> Iterator[MlflowTracker]:
    """Open the child MLflow run of ``stage`` under this pipeline execution's parent run.

    Yields:
        A :class:`MlflowTracker` bound to the child run. The run ends FINISHED, or FAILED if the
        stage raised.
    """
    root = Path(project_root).resolve()
    client, experiment_id = open_experiment(root)
    given_parent = os.environ.get("DISTILL_PARENT_RUN_ID")
    parent_id = given_parent or _find_or_create_parent(client, experiment_id, root)
    tags = {
        "distill.role": "stage",
        "distill.stage": stage,
        "mlflow.parentRunId": parent_id,
        "git_commit": git_commit(root),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        **{f"dvc_hash.{k}": v for k, v in dvc_input_hashes(stage, root).items()},
        **(extra_tags or {}),
    }
    run = client.create_run(experiment_id, run_name=stage, tags=tags)
    tracker = MlflowTracker(run.info.run_id)
    if params:
        tracker.log_params(params)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status=status)
        if not given_parent:  # under plain `dvc repro` no flow owns the parent: each stage closes it as it ends
            client.set_terminated(parent_id, status=status)
