"""MLflow tracking helpers: MLflow records, it never decides.

Every figure logged here is also written to DVC's metrics files by the stages, so nothing is lost
if the tracking server is down. Stage functions take a :class:`Tracker`; :class:`NullTracker`
runs them with no tracking at all (tests, benchmarks), :class:`MlflowTracker` logs to MLflow.

Run layout: one *parent* run per pipeline execution, one *child* run per stage. The experiment is tagged
``mlflow.experimentKind: custom_model_development``; MLflow 3.17's UI still opens it on GenAI traces unless
its GenAI / model-training switch says otherwise, so users are sent to :func:`runs_url`. The parent
is named after its DVC experiment and carries the full resolved params (flattened), the git commit MLflow's
UI shows (``mlflow.source.git.commit``), the DVC experiment name, and, once the evaluate stage has run, the
headline metrics (teacher, baseline and student top-1, the gain and the gap): select parents and press
*Compare* to see which variant was best. Stages run as separate processes under DVC, so they find their
parent by:

1. ``DISTILL_PARENT_RUN_ID`` in the environment (set by the Prefect pipeline flow), else
2. the run tagged ``distill.pipeline_key``: a hash of the project folder, the git commit, the content of
   ``params.yaml`` and the DVC experiment name. Every stage of one plain ``dvc repro`` shares it (they read
   the same files), so the first stage creates the parent and the others join it; a ``dvc repro`` after an
   edit of the params or a new commit gets a parent of its own. (Rerunning the very same configuration after
   a failure joins the parent of the failed attempt: it is the same pipeline run, continued.)

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
import logging
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

from distill.config import ParamsError, dvc_stages, flatten
from distill.io import file_md5

__all__ = ["Tracker", "NullTracker", "NO_TRACKING", "MlflowTracker", "TrackingUnavailableError", "tracking_uri",
           "check_tracking_server", "open_experiment", "create_pipeline_run", "stage_run", "git_commit",
           "dvc_input_hashes", "mlflow_experiment_name", "log_headline", "runs_url", "system_metrics_monitor",
           "PARENT_RUN_METRICS", "tracking_uri_state", "restore_tracking_uri", "using_tracking_uri",
           "EXPERIMENT_KIND", "LOCAL_UI"]

#: The experiment's kind: model training, not GenAI (MLflow 3.17's UI switch overrides it: see :func:`runs_url`).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: Where ``mlflow ui`` / ``mlflow server`` serve the UI by default (their ``--host 127.0.0.1 --port 5000``).
LOCAL_UI = "http://127.0.0.1:5000"
#: The metrics the parent run shows for *Compare*, copied from the evaluate stage's metrics (fractions).
PARENT_RUN_METRICS = ("teacher.top1", "baseline.top1", "student.top1", "distillation_gain", "gap_to_teacher")


def mlflow_experiment_name() -> str:
    """The MLflow experiment: ``DISTILL_MLFLOW_EXPERIMENT``, default ``distill`` (read at each use)."""
    return os.environ.get("DISTILL_MLFLOW_EXPERIMENT", "distill")


def runs_url(experiment_id: str, tracking_uri: str | None = None) -> str:
    """The address that opens MLflow's UI on the experiment's training runs (the runs table).

    MLflow 3's UI has a GenAI / model-training switch, ``workflowType``, remembered in the browser and
    ``genai`` by default, which overrides the experiment's ``mlflow.experimentKind`` tag and opens an
    experiment on its traces. The route ``#/experiments/<id>/runs`` names the runs tab, and the query
    ``workflowType=machine_learning`` sets the switch for this page (the browser's saved choice is kept).

    Args:
        experiment_id: the MLflow experiment's id.
        tracking_uri: the tracking URI (default: ``MLFLOW_TRACKING_URI``). An ``http(s)://`` tracking server
            serves the UI itself, at that address; for a local store (SQLite, files) the UI is
            ``mlflow ui``'s default address, :data:`LOCAL_UI`.

    Returns:
        e.g. ``http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning``.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "") if tracking_uri is None else tracking_uri
    ui = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{ui}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be used: a server that does not answer, or a SQLite store that stays locked."""


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


#: The default tracker of a stage called directly: logs nothing.
NO_TRACKING = NullTracker()


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
        self.parent: Optional["MlflowTracker"] = None  # the pipeline's parent run, for a stage's child run

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
                where = (f"metrics/{self.stage}.json and plots/{self.stage}.csv" if self.stage
                         else "the DVC metrics files")
                _warn(f"MLflow tracking server {self.uri} is unreachable ({_first_line(err)}). The stage goes on "
                      f"without MLflow: nothing more is logged to run {self.run_id}, and every metric is still in "
                      f"{where}.")
            else:
                _warn(f"MLflow {what} failed for run {self.run_id} at {self.uri}: {_first_line(err)}; skipped.")

    def log_params(self, params: dict[str, Any]) -> None:
        """Log nested params flattened (``student.train.lr``), 100 per call (MLflow's limit per batch)."""
        import mlflow

        flat = [mlflow.entities.Param(k, "null" if v is None else str(v)) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self._call("log_params", lambda batch=flat[i:i + 100]: self._client.log_batch(self.run_id, params=batch))

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
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        def log() -> None:  # through the client: no active run to start and end (that would finish the run)
            ds = MetaDataset(source=HTTPDatasetSource(url=source), name=name, digest=digest[:36])
            tag = InputTag(key="mlflow.data.context", value=context)
            self._client.log_inputs(self.run_id, datasets=[DatasetInput(dataset=ds._to_mlflow_entity(), tags=[tag])])

        self._call("log_dataset", log)
        if self.parent is not None:  # the pipeline's run shows the data its stages used, for comparing runs
            self.parent.log_dataset(name=name, digest=digest, source=source, context=context)

    def terminate(self, status: str, *more_run_ids: str) -> None:
        """End this run (and ``more_run_ids``) with ``status``; skipped while the server is unreachable."""
        self.flush()
        for run_id in (self.run_id, *more_run_ids):
            self._call("set_terminated", lambda run_id=run_id: self._client.set_terminated(run_id, status=status))


def _warn(message: str) -> None:
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


#: How many times a call meeting ``database is locked`` is made in all. Each call first waits out MLflow's SQLite
#: busy timeout (20 s): a store that stays locked fails after about a minute.
LOCK_ATTEMPTS = 3


def _retry_locked(fn: Callable[[], Any], *, attempts: Optional[int] = None, delay: float = 0.2) -> Any:
    """Call ``fn``, retrying with backoff while SQLite says ``database is locked`` (concurrent writers).

    ``attempts`` defaults to :data:`LOCK_ATTEMPTS`.
    """
    attempts = attempts or LOCK_ATTEMPTS
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001
            if "database is locked" not in str(err) or i == attempts - 1:
                raise
            time.sleep(delay * 2 ** i)
    return None


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
        "MLFLOW_TRACKING_URI, or unset it to track into the local sqlite store, then run again. Nothing was run "
        "and nothing was logged to MLflow by this command.")


def set_defaults() -> None:
    """MLflow settings for the pipeline's processes, unless the user set them (read at MLflow's first use)."""
    # MLflow 3 reports usage over the network unless told not to; a run of this project needs no network.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # A stage's terminal shows its progress bar and its end: not MLflow's INFO records and download bars.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow retries HTTP calls for minutes by default (7 retries, backoff factor 2, 120 s timeout):
    # a server that dies mid-stage would stall a single log call for many minutes. Two retries within
    # about 3 s, and 10 s per request, keep it to one short stall before MlflowTracker goes offline.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # MLflow logs each `database is locked` with SQLAlchemy's whole traceback (about 90 lines, the file never
    # named) before it raises; the call is retried and then reported in one line (_locked_store_error).
    store_log = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _LockedStoreFilter) for f in store_log.filters):
        store_log.addFilter(_LockedStoreFilter())


class _LockedStoreFilter(logging.Filter):
    """Drops MLflow's own log record of a ``database is locked`` error (the caller retries it, then reports it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "database is locked" not in record.getMessage()


@contextmanager
def _locked_store_error(uri: str) -> Iterator[None]:
    """A SQLite store still locked after the retries (:func:`_retry_locked`) becomes one short error naming it.

    (SQLAlchemy's own error is hundreds of lines of traceback that never name the file.)

    Raises:
        TrackingUnavailableError: naming the store, who may hold it and what to do; its cause is dropped.
    """
    t0 = time.monotonic()
    try:
        yield
    except TrackingUnavailableError:
        raise
    except Exception as err:
        if "database is locked" not in str(err):
            raise
        store = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri
        raise TrackingUnavailableError(
            f"MLflow's SQLite store {store} is locked by another process (still locked after "
            f"{time.monotonic() - t0:.0f} s of retries). Another pipeline or stage may be writing to it, or a "
            f"program holds a transaction open on it (a `sqlite3` shell, a database browser): `fuser {store}` "
            "lists the processes that have it open. Run again once it is free, or track elsewhere with "
            "MLFLOW_TRACKING_URI (a tracking server, e.g. http://127.0.0.1:5000, or another sqlite:///.../mlflow.db). "
            "Nothing was run and nothing was logged to MLflow by this command.") from None


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
    """The DVC hashes of a stage's inputs as the stage runs now: its deps in ``dvc.yaml``, hashed as DVC hashes them.

    A dep that is an output of another stage gets the md5 DVC recorded for it in ``dvc.lock`` (upstream stages
    have finished, so their lock entries are current). Any other file (source code, a weights file) gets the md5
    of its bytes now, DVC 3's file hash: ``dvc.lock`` still holds the previous run's, which is stale exactly when
    the file's change is why the stage reruns. Any other folder gets the ``.dir`` hash of the previous run's
    lock entry, when there is one.
    """
    import yaml

    root = Path(project_root)
    try:
        deps = dvc_stages(root / "dvc.yaml").get(stage, {}).get("deps") or []
        lock = yaml.safe_load((root / "dvc.lock").read_text()) if (root / "dvc.lock").is_file() else {}
    except (ParamsError, OSError, yaml.YAMLError):
        return {}
    recorded: dict[str, str] = {}
    outs: set[str] = set()
    for st in (lock or {}).get("stages", {}).values():
        for entry in st.get("outs", []) + st.get("deps", []):
            if "md5" in entry:
                recorded.setdefault(entry["path"], entry["md5"])
    for st in (lock or {}).get("stages", {}).values():  # outs take precedence
        for entry in st.get("outs", []):
            if "md5" in entry:
                recorded[entry["path"]] = entry["md5"]
                outs.add(entry["path"])
    hashes = {}
    for dep in deps:
        if dep not in outs and (root / dep).is_file():
            hashes[dep] = file_md5(root / dep)
        elif dep in recorded:
            hashes[dep] = recorded[dep]
    return hashes


def pipeline_key(project_root: Path) -> str:
    """What the stages of one plain ``dvc repro`` share: project, commit, params and DVC experiment name."""
    h = hashlib.sha256(str(project_root.resolve()).encode())
    h.update(git_commit(project_root).encode())
    params = project_root / "params.yaml"
    h.update(params.read_bytes() if params.is_file() else b"")
    h.update(os.environ.get("DVC_EXP_NAME", "").encode())
    return h.hexdigest()[:16]


def tracking_uri_state() -> tuple[Optional[str], Optional[str]]:
    """MLflow's process-wide tracking URI as set in code (``None`` when only the environment names the store) and
    ``MLFLOW_TRACKING_URI``: what :func:`restore_tracking_uri` puts back.

    ``mlflow.get_tracking_uri()`` cannot be used to save it: it returns the resolved URI, and setting that back pins
    the process to it for good (a URI set in code wins over the environment variable, and ``set_tracking_uri`` also
    writes the variable), so a later ``MLFLOW_TRACKING_URI`` would be ignored.
    """
    from mlflow.tracking._tracking_service import utils

    return utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")


def restore_tracking_uri(state: tuple[Optional[str], Optional[str]]) -> None:
    """Put back the state :func:`tracking_uri_state` saved (``set_tracking_uri(None)`` unsets the code's URI)."""
    import mlflow

    in_code, env = state
    mlflow.set_tracking_uri(in_code)
    if env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for the block, then restore exactly what was there."""
    import mlflow

    state = tracking_uri_state()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        restore_tracking_uri(state)


def open_experiment(project_root: str | Path = ".") -> tuple[Any, str]:
    """Point MLflow at the project's tracking URI (failing fast if a server is down) and get the experiment.

    Returns:
        ``(MlflowClient, experiment_id)``.

    Raises:
        TrackingUnavailableError: a configured tracking server does not answer, or the SQLite store stays locked.
    """
    import mlflow

    set_defaults()
    uri = tracking_uri(project_root)
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    name = mlflow_experiment_name()
    # Opening a fresh store creates its tables (MlflowClient() opens it).
    with _locked_store_error(uri), _store_init_lock(uri):
        client = _retry_locked(mlflow.MlflowClient)
        exp = _retry_locked(lambda: client.get_experiment_by_name(name))
        if exp is None:
            try:
                return client, _retry_locked(lambda: client.create_experiment(
                    name, artifact_location=_artifact_location(uri, name), tags=EXPERIMENT_KIND))
            except Exception:  # noqa: BLE001 - another process (another store client) created it first
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if any(exp.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):  # an experiment made by an older version
            for key, value in EXPERIMENT_KIND.items():
                _retry_locked(lambda key=key, value=value: client.set_experiment_tag(exp.experiment_id, key, value))
    return client, exp.experiment_id


def _artifact_location(uri: str, name: str) -> Optional[str]:
    """A new experiment's artifacts beside its SQLite store (``<store dir>/mlruns/<name>``), else the server's choice.

    MLflow's default for a SQLite store is ``./mlruns`` of the process that creates the experiment: a stage
    in a ``dvc exp run --temp`` copy, or any process started elsewhere, would put them where they get lost.
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns" / name).as_uri()


def _source_tags(project_root: Path) -> dict[str, str]:
    """The tags MLflow's UI shows as a run's source and version, and the DVC experiment it belongs to."""
    commit = git_commit(project_root)
    tags = {"mlflow.source.type": "PROJECT", "mlflow.source.name": str(project_root.resolve()),
            "mlflow.source.git.commit": commit, "git_commit": commit}
    if os.environ.get("DVC_EXP_NAME"):  # none under plain `dvc repro`: no empty tag
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def create_pipeline_run(client: Any, experiment_id: str, project_root: Path, *, run_name: str,
                        params: Optional[dict[str, Any]] = None, tags: Optional[dict[str, str]] = None) -> str:
    """Create the parent run of one pipeline execution, with its resolved params (flattened); returns its id.

    Raises:
        TrackingUnavailableError: the SQLite store stays locked.
    """
    all_tags = {"distill.role": "pipeline", **_source_tags(project_root), **(tags or {})}
    with _locked_store_error(tracking_uri(project_root)):
        run = _retry_locked(lambda: client.create_run(experiment_id, run_name=run_name, tags=all_tags))
    if params:
        MlflowTracker(run.info.run_id, uri=tracking_uri(project_root)).log_params(params)
    return run.info.run_id


def _project_params(project_root: Path) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load((project_root / "params.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _find_or_create_parent(client: Any, experiment_id: str, project_root: Path) -> str:
    key = pipeline_key(project_root)
    found = _retry_locked(lambda: client.search_runs(
        [experiment_id], filter_string=f"tags.`distill.pipeline_key` = '{key}'", max_results=1,
        order_by=["attributes.start_time DESC"]))
    if found:
        return found[0].info.run_id
    name = os.environ.get("DVC_EXP_NAME") or f"dvc-repro-{git_commit(project_root)[:7]}"
    return create_pipeline_run(client, experiment_id, project_root, run_name=name,
                               params=_project_params(project_root), tags={"distill.pipeline_key": key})


def system_metrics_monitor(run_id: str, uri: str) -> Any | None:
    """MLflow's system metrics (CPU, memory, disk, network; GPU with ``nvidia-ml-py``) on a stage's run, if enabled.

    Off by default. ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true`` (or ``mlflow.enable_system_metrics_logging()``)
    turns it on, and MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` (seconds, default 10) and
    ``MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING`` apply. The runs are made with ``MlflowClient``, so
    ``mlflow.start_run(log_system_metrics=True)``, MLflow's documented switch, never runs here (it would make the
    stage's run the process's active run, and end it): MLflow's own ``SystemMetricsMonitor``, the class that
    ``start_run`` starts (mlflow/mlflow#10253, #10312 for an existing run), samples on a daemon thread and logs
    ``system/*`` metrics; an outage only stops it (it warns).

    Returns:
        The started monitor (call ``finish()`` before ending the run), or None when system metrics are off.
    """
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    if not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
    monitor.start()
    return monitor


def log_headline(tracker: "MlflowTracker", metrics: dict[str, Any]) -> None:
    """Copy the evaluate stage's headline metrics onto the parent run, for *Compare* in MLflow's UI."""
    flat = flatten(metrics)
    tracker.log_metrics({k: flat[k] for k in PARENT_RUN_METRICS if isinstance(flat.get(k), (int, float))})


@contextmanager
def stage_run(stage: str, *, project_root: str | Path = ".", params: Optional[dict[str, Any]] = None,
              extra_tags: Optional[dict[str, str]] = None) -> Iterator[MlflowTracker]:
    """Open the child MLflow run of ``stage`` under this pipeline execution's parent run.

    Yields:
        A :class:`MlflowTracker` bound to the child run, whose ``parent`` is a tracker of the parent run. The
        run ends FINISHED, or FAILED if the stage raised (left RUNNING if the tracking server went away).

    Raises:
        TrackingUnavailableError: a configured tracking server does not answer at the start, or the SQLite store
            stays locked.
    """
    root = Path(project_root).resolve()
    client, experiment_id = open_experiment(root)
    uri = tracking_uri(root)
    given_parent = os.environ.get("DISTILL_PARENT_RUN_ID")
    with _locked_store_error(uri):
        parent_id = given_parent or _find_or_create_parent(client, experiment_id, root)
        tags = {
            "distill.role": "stage",
            "distill.stage": stage,
            "mlflow.parentRunId": parent_id,
            **_source_tags(root),
            **{f"dvc_hash.{k}": v for k, v in dvc_input_hashes(stage, root).items()},
            **(extra_tags or {}),
        }
        run = _retry_locked(lambda: client.create_run(experiment_id, run_name=stage, tags=tags))
    tracker = MlflowTracker(run.info.run_id, uri=uri, stage=stage)
    tracker.parent = MlflowTracker(parent_id, uri=tracker.uri, stage=stage)
    if params:
        tracker.log_params(params)
    monitor = system_metrics_monitor(run.info.run_id, tracker.uri)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        if monitor is not None:
            monitor.finish()  # its last samples are sent while the run is still RUNNING
        # Under plain `dvc repro` no flow owns the parent: each stage closes it as it ends.
        if tracker.parent is not None:
            tracker.parent.flush()
        tracker.terminate(status, *([] if given_parent else [parent_id]))
