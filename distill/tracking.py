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
(an absolute path, MLflow 3's default backend; inside a ``dvc exp run --temp`` workspace, the
``mlflow.db`` of the repository the experiment belongs to, since DVC deletes the temporary copy).

Outages (docs/reliability.md): a configured server that does not answer at stage start fails the
stage before any work, within about 3 s (8 s with the Prefect retry), naming the URI. A server that
goes away *during* a stage does not stop it: :class:`MlflowTracker` warns once, naming the URI, and
logs nothing more; the stage finishes, and its DVC metrics and plots files hold every figure.

Concurrency: several pipelines may share one SQLite store. MLflow creates the tables of a fresh
store with migrations that break when two processes run them at once, so the first access is
serialised with a file lock (:func:`_store_init_lock`); calls that meet ``database is locked`` are
retried.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

__all__ = ["Tracker", "NullTracker", "MlflowTracker", "TrackingUnavailableError", "tracking_uri",
           "check_tracking_server", "open_experiment", "create_pipeline_run", "stage_run", "git_commit",
           "dvc_input_hashes", "flatten", "experiment_name"]

# MLflow 3 reports usage over the network unless told not to; a run of this project needs no network.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def experiment_name() -> str:
    """The MLflow experiment: ``DISTILL_MLFLOW_EXPERIMENT``, default ``distill`` (read at each use)."""
    return os.environ.get("DISTILL_MLFLOW_EXPERIMENT", "distill")


class TrackingUnavailableError(RuntimeError):
    """The configured MLflow tracking server cannot be reached."""


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None: ...
    def log_dict(self, data: dict[str, Any], name: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_dataset(self, *, name: str, digest: str, source: str, context: str) -> None: ...
    def flush(self) -> None: ...


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
    """Logs to one MLflow run (a stage's child run); a tracking outage never stops the stage.

    The first call that cannot reach the tracking store prints one warning naming the URI and
    turns this tracker off: training goes on, and the stage's DVC metrics and plots files, written
    before anything goes to MLflow, keep every figure. Other MLflow errors are warned about and
    skipped (MLflow records, it never decides). ``database is locked`` from a busy SQLite store is
    retried first.

    Per-epoch metrics (:meth:`log_metrics`) are sent by a background thread, in order, so that
    training never waits for the store (a SQLite commit, or an HTTP round trip); :meth:`flush` waits
    for them, and :meth:`terminate` flushes before it ends the run.
    """

    def __init__(self, run_id: str, *, uri: Optional[str] = None, stage: str = "") -> None:
        import mlflow

        self.run_id = run_id
        self.uri = uri or mlflow.get_tracking_uri()
        self.stage = stage
        self.offline = False
        self._offline_lock = threading.Lock()
        self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        self._queue: Optional[queue.Queue] = None

    def _submit(self, what: str, fn: Callable[[], Any]) -> None:
        """Run ``self._call(what, fn)`` on the background thread (started on first use)."""
        if self._queue is None:
            self._queue = queue.Queue()
            threading.Thread(target=self._drain, args=(self._queue,), name="mlflow-metrics", daemon=True).start()
        self._queue.put((what, fn))

    def _drain(self, q: queue.Queue) -> None:
        while True:
            what, fn = q.get()
            try:
                self._call(what, fn)
            finally:
                q.task_done()

    def flush(self) -> None:
        """Wait until every queued metric has been sent (or skipped)."""
        if self._queue is not None:
            self._queue.join()

    def _call(self, what: str, fn: Callable[[], Any]) -> None:
        if self.offline:
            return
        try:
            _retry_locked(fn)
        except Exception as err:  # noqa: BLE001 - tracking must not stop training
            if _is_unreachable(err):
                with self._offline_lock:  # the metrics thread and the stage may find the server gone together
                    first, self.offline = not self.offline, True
                if not first:
                    return
                where = f"metrics/{self.stage}.json and plots/{self.stage}.csv" if self.stage else "the DVC metrics files"
                _warn(f"MLflow tracking server {self.uri} is unreachable ({_first_line(err)}). The stage goes on "
                      f"without MLflow: nothing more is logged to run {self.run_id}, and every metric is still in {where}.")
            else:
                _warn(f"MLflow {what} failed for run {self.run_id} at {self.uri}: {_first_line(err)}; skipped.")

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        flat = {k: ("null" if v is None else v) for k, v in flatten(params).items()}
        self._call("log_params", lambda: self._client.log_batch(
            self.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in flat.items()]))

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if clean:
            ts = int(time.time() * 1000)
            self._submit("log_metrics", lambda: self._client.log_batch(
                self.run_id, metrics=[mlflow.entities.Metric(k, v, ts, step or 0) for k, v in clean.items()]))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._call("log_artifact", lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self._call("log_dict", lambda: self._client.log_dict(self.run_id, data, name))

    def set_tags(self, tags: dict[str, str]) -> None:
        import mlflow

        self._call("set_tags", lambda: self._client.log_batch(
            self.run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()]))

    def log_dataset(self, *, name: str, digest: str, source: str, context: str) -> None:
        import mlflow
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        def log() -> None:
            ds = MetaDataset(source=HTTPDatasetSource(url=source), name=name, digest=digest[:36])
            with _activate(self.run_id):
                mlflow.log_input(ds, context=context)

        self._call("log_dataset", log)

    def terminate(self, status: str, *more_run_ids: str) -> None:
        """End this run (and ``more_run_ids``) with ``status``; skipped while the server is unreachable."""
        self.flush()
        for run_id in (self.run_id, *more_run_ids):
            self._call("set_terminated", lambda run_id=run_id: self._client.set_terminated(run_id, status=status))


def _warn(message: str) -> None:
    import logging

    logging.getLogger("distill.tracking").warning(message)
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _is_unreachable(err: BaseException) -> bool:
    """A connection-level failure (refused, reset, timed out, retries exhausted), anywhere in the cause chain."""
    import requests

    seen: Optional[BaseException] = err
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                             TimeoutError, urllib.error.URLError)):
            return True
        text = str(seen)
        if "API request to" in text and ("failed with exception" in text or "Max retries exceeded" in text):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retry_locked(fn: Callable[[], Any], *, attempts: int = 6, delay: float = 0.2) -> Any:
    """Call ``fn``, retrying with backoff while SQLite says ``database is locked`` (concurrent writers)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001
            if "database is locked" not in str(err) or i == attempts - 1:
                raise
            time.sleep(delay * 2 ** i)
    return None


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
    """``MLFLOW_TRACKING_URI`` if set, else an absolute SQLite store in the project.

    In a ``dvc exp run --temp`` workspace (``<repo>/.dvc/tmp/exps/...``) the store is the repository's:
    DVC deletes the temporary copy, and a store inside it would go with it.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(project_root).resolve()
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            root = Path(*parts[:i])
            break
    return f"sqlite:///{root / 'mlflow.db'}"


def check_tracking_server(uri: str, *, budget: float = 3.0) -> None:
    """Fail fast if an HTTP tracking server does not answer ``/health`` within ``budget`` seconds.

    A few attempts (a server that is just starting gets a second chance), never more than
    ``budget`` seconds in all, so a stage and its one Prefect retry fail well within 30 s.

    Raises:
        TrackingUnavailableError: naming the URI and what to do.
    """
    if not uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + budget
    last: Exception | str | None = None
    while True:
        left = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=max(0.5, min(left, 4.0))) as resp:
                if resp.status < 500:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as err:
            if err.code < 500:  # it answers: not our /health, but a server
                return
            last = err
        except (urllib.error.URLError, OSError) as err:
            last = err
        if deadline - time.monotonic() < 1.5:
            break
        time.sleep(1.0)
    raise TrackingUnavailableError(
        f"MLflow tracking server {uri} is unreachable ({last}). Start it (`mlflow server ...`), fix "
        "MLFLOW_TRACKING_URI, or unset it to track into the local sqlite store. Nothing was run; "
        "the stage's metrics files are unaffected.")


def _set_http_defaults() -> None:
    # MLflow retries HTTP calls for minutes by default (7 retries, backoff factor 2, 120 s timeout):
    # a server that dies mid-stage would stall a single log call for many minutes. Two retries within
    # about 3 s, and 10 s per request, keep it to one short stall before MlflowTracker goes offline.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@contextmanager
def _store_init_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock per SQLite store while MLflow opens it (and may create its tables).

    MLflow creates a fresh store's tables with migrations that fail, and can leave the schema half
    made, when two processes run them at once (two pipelines started together). The lock file lives
    in the temporary folder, keyed by the store's path, so the project gains no file.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    db = Path(uri[len("sqlite:///"):]).resolve()
    lock = Path(tempfile.gettempdir()) / f"distill-mlflow-{hashlib.sha256(str(db).encode()).hexdigest()[:16]}.lock"
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    name = experiment_name()
    with _store_init_lock(uri):  # opening a fresh store creates its tables (MlflowClient() opens it)
        client = mlflow.MlflowClient()
        exp = _retry_locked(lambda: client.get_experiment_by_name(name))
        if exp is None:
            try:
                return client, _retry_locked(lambda: client.create_experiment(name))
            except Exception:  # noqa: BLE001 - another process (another store client) created it first
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
    return client, exp.experiment_id


def create_pipeline_run(client: Any, experiment_id: str, project_root: Path, *, run_name: str,
                        tags: Optional[dict[str, str]] = None) -> str:
    """Create the parent run of one pipeline execution; returns its id."""
    all_tags = {"distill.role": "pipeline", "git_commit": git_commit(project_root),
                "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), **(tags or {})}
    run = _retry_locked(lambda: client.create_run(experiment_id, run_name=run_name, tags=all_tags))
    return run.info.run_id


def _find_or_create_parent(client: Any, experiment_id: str, project_root: Path) -> str:
    key = _pipeline_key(project_root)
    if key is None:  # a stage run by hand: it is its own execution
        return create_pipeline_run(client, experiment_id, project_root, run_name="stage-by-hand")
    found = _retry_locked(lambda: client.search_runs(
        [experiment_id], filter_string=f"tags.`distill.pipeline_key` = '{key}'", max_results=1,
        order_by=["attributes.start_time DESC"]))
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
        stage raised (left RUNNING if the tracking server went away during the stage).

    Raises:
        TrackingUnavailableError: a configured tracking server does not answer at the start.
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
    run = _retry_locked(lambda: client.create_run(experiment_id, run_name=stage, tags=tags))
    tracker = MlflowTracker(run.info.run_id, uri=tracking_uri(root), stage=stage)
    if params:
        tracker.log_params(params)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        # Under plain `dvc repro` no flow owns the parent: each stage closes it as it ends.
        tracker.terminate(status, *([] if given_parent else [parent_id]))
