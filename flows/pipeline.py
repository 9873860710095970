"""The whole pipeline as one Prefect flow, run *through DVC*.

The stage graph is written down once, in ``dvc.yaml``. This flow runs ``dvc exp run`` (in the workspace, or
with ``temp`` in a temporary copy), so DVC alone decides which stages are out of date, and every execution is
a named DVC experiment (``dvc exp show``). Every stage DVC runs is itself a Prefect flow run
(``python -m flows stage <name>``), created as a subflow of this one.

It also opens the MLflow *parent* run of this execution, named after the DVC experiment and carrying the full
resolved params, and hands its id, the tracking URI and this flow's Prefect API to the stage processes through
their environment. DVC's own output (``Running stage ...``) and each stage's progress bar go straight to the
terminal.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from prefect import flow, get_run_logger
from prefect.runtime import deployment, flow_run

from distill.config import apply_overrides, load_raw, parse_params
from distill.tracking import MlflowTracker, create_pipeline_run, open_experiment, runs_url, tracking_uri
from flows.lifetime import PIPELINE_PID_ENV
from flows.stage import PARENT_ENV, publish_report
from flows.workspace import apply_to_params_file, workspace_lock

__all__ = ["pipeline_flow", "StageFailed", "run_dvc", "experiment_name", "flow_run_holder", "check_committed",
           "check_remote",
           "applied", "experiment_metrics", "experiment_files", "where_to_look", "sweep_tags", "finished_variant",
           "SWEEP_TAG", "VARIANT_TAG", "CONFIG_TAG", "SEED_TAG", "VALIDATION_FILES", "interrupt_dvc"]


class StageFailed(RuntimeError):
    """A DVC command run by the pipeline exited non-zero."""


def experiment_name() -> str:
    """A new DVC experiment name: ``run-<date>-<time>``."""
    return time.strftime("run-%Y%m%d-%H%M%S")


def run_dvc(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> None:
    """Run a DVC command on this terminal; if this process is stopped, DVC is interrupted first (it cleans up).

    DVC runs in a process group of its own, with the stage it starts. Stopping this process (Ctrl-C, SIGTERM,
    SIGHUP) sends SIGINT to that whole group, as Ctrl-C in a terminal does: DVC ignores SIGINT while a stage
    runs and relies on the stage receiving it too, then records the failure and releases its lock.

    Raises:
        StageFailed: the command exited non-zero.
    """
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, **group)
    _RUNNING.add(proc)
    try:
        rc = proc.wait()
    finally:
        _RUNNING.discard(proc)
        if proc.poll() is None:  # this process is being stopped: interrupt DVC and its stage as Ctrl-C would
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
    if rc != 0:
        raise StageFailed(f"`{' '.join(cmd)}` exited with status {rc}; the failing stage's error is above")


#: The DVC commands this process runs now (a sweep runs several at once, one per thread).
_RUNNING: set[subprocess.Popen] = set()


def interrupt_dvc() -> None:
    """Interrupt every DVC command this process runs, as Ctrl-C would (a sweep stopped while its variants run in
    threads: each thread's :func:`run_dvc` then returns with DVC's failure)."""
    for proc in list(_RUNNING):
        _signal_group(proc, signal.SIGINT)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def flow_run_holder(what: str) -> str:
    """How a flow run of ``what`` names itself as the workspace lock's holder (a deployment's run has no CLI)."""
    name = f"Prefect flow run {flow_run.name or flow_run.id} of {what}"
    return f"{name} (deployment {deployment.name})" if deployment.name else name


def _api_url() -> Optional[str]:
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@flow(name="distill-pipeline", log_prints=True, persist_result=False)
def pipeline_flow(overrides: Optional[list[str]] = None, project_root: str = ".", exp_name: Optional[str] = None,
                  force: bool = False, temp: bool = False, apply: bool = False,
                  committed: bool = False, sweep: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run the pipeline as a DVC experiment, with ``key=value`` overrides (DVC's ``-S``).

    With overrides, the variant runs in a temporary copy (``dvc exp run --temp``): the workspace's ``params.yaml``,
    ``dvc.lock`` and outputs stay as they are, and the experiment is saved by DVC. Without, the pipeline runs in
    the workspace (``dvc exp run``, which a rerun after a kill resumes).

    Args:
        overrides: e.g. ``["student.alpha=0.7"]``; validated before anything runs.
        project_root: the DVC repository.
        exp_name: the DVC experiment's name, also the MLflow parent run's (default: a new ``run-<time>``).
        force: rerun every stage.
        temp: run in a temporary copy even without overrides.
        apply: write the overrides into ``params.yaml`` (its formatting kept) and run in the workspace; the file is
            put back as it was if the run fails.
        committed: refuse to run unless ``params.yaml`` is the committed one (the ``default`` deployment).
        sweep: this run's place in a sweep (:mod:`flows.sweep`): ``id``, ``variant``, ``parent`` (the sweep's
            MLflow run), ``config``, ``seed``, and optionally ``targets`` (the stages to run: a shared stage),
            ``threads`` (``OMP_NUM_THREADS`` of its stages, unless set: variants side by side here) and
            ``remote`` (the default DVC remote: ``dvc exp run --pull`` restores from it what other machines
            computed, and the run's outputs and run-cache are pushed to it). Always in a temporary copy,
            holding the workspace lock shared; a variant that already finished in MLflow is not run again.

    Returns:
        ``{"experiment", "mlflow_parent_run_id", "evaluate"}``: ``evaluate`` holds the evaluate metrics.
    """
    root = Path(project_root).resolve()
    overrides = list(overrides or [])
    in_temp = temp or bool(sweep) or (bool(overrides) and not apply)
    # held already when the CLI started this; shared by a sweep's variants, which never touch the workspace
    with workspace_lock(root, flow_run_holder("distill-pipeline"), shared=bool(sweep)):
        if committed:
            check_committed(root / "params.yaml")
        resolved = apply_overrides(load_raw(root / "params.yaml"), overrides)
        parse_params(resolved, source="params.yaml with the overrides")  # bad overrides fail before any work
        with applied(root / "params.yaml", [] if in_temp else overrides):
            return _pipeline(root, overrides, resolved, exp_name=exp_name or experiment_name(), force=force,
                             temp=in_temp, sweep=sweep or {})


def check_committed(params_file: Path) -> None:
    """Refuse a ``params.yaml`` that differs from the committed one (``git diff HEAD``), naming the changed keys."""
    from distill.config import ParamsError

    res = subprocess.run(["git", "show", f"HEAD:./{params_file.name}"], cwd=params_file.parent, capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise ParamsError(f"{params_file} is not committed in git ({res.stderr.strip()}); commit it first")
    if res.stdout == params_file.read_text():
        return
    import yaml

    from distill.config import flatten

    head, now = flatten(yaml.safe_load(res.stdout) or {}), flatten(load_raw(params_file))
    changed = sorted(k for k in set(head) | set(now) if head.get(k) != now.get(k)) or ["(formatting only)"]
    raise ParamsError(f"{params_file} differs from the committed one ({', '.join(changed)}): this run takes the "
                      "committed params only. Commit the change, or run it as a variant with overrides")


@contextmanager
def applied(params_file: Path, overrides: list[str]) -> Iterator[None]:
    """``overrides`` written into ``params_file`` for the run (``--apply``), put back as it was if the run fails.

    Only the file: the stages that finished keep their new outputs and ``dvc.lock`` entries (DVC deletes a stage's
    outputs before it runs it, so one that failed on the new values has none), and the same command again takes up
    what they did (a training stage resumes from its state in ``.state/``).
    """
    if not overrides:
        yield
        return
    from distill.io import atomic_write_bytes

    before = params_file.read_bytes()
    apply_to_params_file(params_file, overrides)
    written = params_file.read_bytes()
    try:
        yield
    except BaseException:
        if params_file.read_bytes() == written:
            atomic_write_bytes(params_file, before)
            print(f"{params_file.name} is back as it was: the run with {' '.join(overrides)} did not finish",
                  file=sys.stderr, flush=True)
        raise


def _pipeline(root: Path, overrides: list[str], resolved: dict[str, Any], *, exp_name: str, force: bool,
              temp: bool, sweep: dict[str, Any]) -> dict[str, Any]:
    logger = get_run_logger()
    client, experiment_id = open_experiment(root)
    if sweep and (done := finished_variant(client, experiment_id, sweep)):
        print(f"{sweep['variant']}: finished before (MLflow run {done}); not run again", flush=True)
        return {"experiment": exp_name, "mlflow_parent_run_id": done, "skipped": True}
    parent = create_pipeline_run(client, experiment_id, root, run_name=exp_name, params=resolved,
                                 tags={"dvc_exp_name": exp_name, "overrides": " ".join(overrides),
                                       "prefect_flow_run_id": str(flow_run.id or ""), **sweep_tags(sweep)})
    env = _stage_env(root, parent, sweep)
    # In the workspace the values are in params.yaml already (--apply): DVC's -S would rewrite the file its own way.
    cmd = (["dvc", "exp", "run", "--name", exp_name] + (["--temp"] if temp else [])
           + [a for o in (overrides if temp else []) for a in ("-S", o)] + (["-f"] if force else [])
           + (["--pull"] if sweep.get("remote") else []) + list(sweep.get("targets") or []))
    logger.info("DVC experiment %s: %s (MLflow parent run %s)", exp_name, " ".join(cmd), parent)
    parent_run = MlflowTracker(parent, uri=tracking_uri(root))  # an outage must not fail finished stages
    status = "FAILED"
    try:
        run_dvc(cmd, cwd=root, env=env)
        if sweep.get("remote"):
            _push_shared(root, sweep["remote"], exp_name)
        if sweep:
            _log_sweep_metrics(parent_run, root, exp_name)
        status = "FINISHED"
    finally:
        parent_run.terminate(status)
        if sweep:
            _tag_stage_runs(client, experiment_id, parent, sweep_tags(sweep))
        _drop_if_empty(client, experiment_id, parent)
    if sweep:
        shutil.rmtree(env["DISTILL_STATE_DIR"], ignore_errors=True)  # done: its resume state is not needed
        return {"experiment": exp_name, "mlflow_parent_run_id": parent}
    return _closing(root, experiment_id, exp_name, overrides, temp=temp, parent=parent)


def _closing(root: Path, experiment_id: str, exp_name: str, overrides: list[str], *, temp: bool,
             parent: str) -> dict[str, Any]:
    """The result of a finished pipeline and what it prints: the variant's headline, or the workspace's report."""
    result: dict[str, Any] = {"experiment": exp_name, "mlflow_parent_run_id": parent}
    if temp:
        result["evaluate"] = experiment_metrics(root, [exp_name])[exp_name]
        print(_variant_summary(exp_name, result["evaluate"], overrides))
    else:
        metrics_file = root / "metrics" / "evaluate.json"
        if metrics_file.is_file():
            result["evaluate"] = json.loads(metrics_file.read_text())
            report = root / "reports" / "results.md"
            if report.is_file():
                print(report.read_text())
                publish_report(root)
    print(where_to_look(root, experiment_id, exp_name, temp=temp))
    return result


def _stage_env(root: Path, parent: str, sweep: dict[str, Any]) -> dict[str, str]:
    """The environment of DVC and the stages it runs: the MLflow parent run, this process, the Prefect API."""
    env = {**os.environ, "DISTILL_PARENT_RUN_ID": parent, PIPELINE_PID_ENV: str(os.getpid()),  # flows/lifetime.py
           "MLFLOW_TRACKING_URI": tracking_uri(root)}  # the repository's store, also from a temporary copy
    api = _api_url()
    if api:
        env["PREFECT_API_URL"] = api
    if flow_run.id:
        env[PARENT_ENV] = str(flow_run.id)
    if sweep:  # the resume state outlives the temporary copy, which DVC deletes when the run fails
        env["DISTILL_STATE_DIR"] = str(root / ".state" / "sweeps" / str(sweep["variant"]))
    if sweep.get("threads") and "OMP_NUM_THREADS" not in os.environ:  # variants side by side share the cores
        env["OMP_NUM_THREADS"] = str(sweep["threads"])
    return env


#: MLflow tags of a sweep's runs (flows/sweep.py); the parent run of a variant also gets ``mlflow.parentRunId``.
SWEEP_TAG, VARIANT_TAG, CONFIG_TAG, SEED_TAG = "distill.sweep", "distill.variant", "distill.config", "distill.seed"


def sweep_tags(sweep: dict[str, Any]) -> dict[str, str]:
    """The tags that put a run in its sweep: the sweep id, the variant, its grid point and seed, its parent run."""
    if not sweep:
        return {}
    tags = {SWEEP_TAG: str(sweep["id"]), VARIANT_TAG: str(sweep["variant"]), CONFIG_TAG: str(sweep.get("config", "")),
            SEED_TAG: str(sweep.get("seed", ""))}
    if sweep.get("parent"):
        tags["mlflow.parentRunId"] = str(sweep["parent"])
    return tags


def finished_variant(client: Any, experiment_id: str, sweep: dict[str, Any]) -> Optional[str]:
    """The id of a FINISHED parent run of this sweep's variant, if there is one (its stage runs carry its tags too)."""
    found = client.search_runs([experiment_id], filter_string=(
        f"tags.`{SWEEP_TAG}` = '{sweep['id']}' and tags.`{VARIANT_TAG}` = '{sweep['variant']}' "
        "and tags.`distill.role` = 'pipeline' and attributes.status = 'FINISHED'"), max_results=1)
    return found[0].info.run_id if found else None


def _tag_stage_runs(client: Any, experiment_id: str, parent: str, tags: dict[str, str]) -> None:
    """Put the sweep's tags on the stage runs under ``parent`` too (MLflow records, it never decides)."""
    tags = {k: v for k, v in tags.items() if k != "mlflow.parentRunId"}
    try:
        for run in client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"):
            for key, value in tags.items():
                client.set_tag(run.info.run_id, key, value)
    except Exception as err:  # noqa: BLE001
        print(f"WARNING: could not tag the stage runs of {parent}: {err}", file=sys.stderr, flush=True)


#: The validation accuracy of each trained model, from its stage's metrics file: what a sweep ranks on.
VALIDATION_FILES = {"student": "metrics/student.json", "baseline": "metrics/baseline.json",
                    "teacher": "metrics/teacher.json"}


def _log_sweep_metrics(parent_run: MlflowTracker, root: Path, exp_name: str) -> None:
    """Log ``val.<model>`` (and ``val.gain``, student minus baseline) on the variant's parent run (MLflow compare)."""
    files = experiment_files(root, [exp_name], list(VALIDATION_FILES.values())).get(exp_name, {})
    val = {f"val.{model}": (files.get(path) or {}).get("val_acc") for model, path in VALIDATION_FILES.items()}
    if isinstance(val["val.student"], (int, float)) and isinstance(val["val.baseline"], (int, float)):
        val["val.gain"] = val["val.student"] - val["val.baseline"]
    parent_run.log_metrics({k: v for k, v in val.items() if isinstance(v, (int, float))})


def _push_shared(root: Path, remote: str, exp_name: str) -> None:
    """After a run: the run-cache and every file its entries name pushed to ``remote``, so that other machines'
    runs restore those stages instead of computing them. (``dvc push --run-cache`` moves the entries only, not the
    outputs they name, and ``dvc push`` of the experiment's commit skips the ``cache: false`` metrics that an entry
    also needs; the pulling side is ``dvc exp run --pull``, which takes both from the default remote:
    :func:`check_remote`.) A push that fails is a warning: the results are in this machine's cache, and other
    machines compute the stages themselves."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            entries = repo.stage_cache.push(remote)
            for objs in repo.stage_cache.get_used_objs(entries).values():
                failed = repo.cloud.push(objs, remote=remote).failed
                if failed:
                    raise OSError(f"{len(failed)} file(s) could not be pushed")
    except Exception as err:  # noqa: BLE001 - DVC's errors have no common base that covers its remotes' ones
        print(f"WARNING: pushing {exp_name}'s stages to the DVC remote {remote!r} failed ({type(err).__name__}: "
              f"{err}); other machines will compute them again", file=sys.stderr, flush=True)


def check_remote(root: Path, remote: str) -> None:
    """``remote`` must be the project's default DVC remote: ``dvc exp run --pull`` restores what other machines
    computed from that one (DVC has no option to pull from another).

    Raises:
        ParamsError: naming the remote the project has as default (if any) and the fix.
    """
    from dvc.repo import Repo

    from distill.config import ParamsError

    with Repo(str(root)) as repo:  # every config level merged, as `dvc remote list` / `dvc remote default` read it
        names = list(repo.config["remote"])
        default = repo.config["core"].get("remote") or ""
    if remote not in names:
        raise ParamsError(f"--remote {remote}: the project has no DVC remote of that name (it has: "
                          f"{', '.join(names) or 'none'}); add it with `dvc remote add -d {remote} <url>` and commit "
                          ".dvc/config, on every machine's checkout")
    if default != remote:
        raise ParamsError(f"--remote {remote}: DVC pulls the shared stages from the project's default remote, which "
                          f"is {default or 'not set'}; make it the default with `dvc remote default {remote}` and "
                          "commit .dvc/config, so every machine's checkout has it")


def _drop_if_empty(client: Any, experiment_id: str, run_id: str) -> None:
    """Delete the parent run if no stage ran under it (nothing was out of date): an empty run says nothing.

    MLflow records, it never decides: an error here is a warning.
    """
    from mlflow.entities import ViewType

    try:
        children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
                                      run_view_type=ViewType.ALL, max_results=1)
        if not children:
            client.delete_run(run_id)
            print("No stage ran (everything was up to date): no MLflow run kept for this execution.", flush=True)
    except Exception as err:  # noqa: BLE001
        print(f"WARNING: could not check MLflow parent run {run_id} for stage runs: {err}", file=sys.stderr,
              flush=True)


def where_to_look(root: Path, experiment_id: str, exp_name: str, *, temp: bool) -> str:
    """The closing lines: where the results are, and the address that opens MLflow's UI on the runs."""
    uri = tracking_uri(root)
    lines = ["", "Where to look:"]
    if temp:
        lines.append(f"  DVC                 dvc exp show   (experiment {exp_name})")
    else:
        lines += ["  results table       reports/results.md   (figures in reports/figures/)",
                  "  DVC                 dvc metrics show ; dvc plots show ; dvc exp show"]
    lines.append(f"  MLflow runs         {runs_url(experiment_id, uri)}")
    if not uri.startswith(("http://", "https://")):  # a local store: the UI is `mlflow ui`, started by the user
        lines.append(f"                      (start the UI first: mlflow ui --backend-store-uri {uri})")
    return "\n".join(lines)


def _variant_summary(name: str, metrics: dict[str, Any], overrides: list[str]) -> str:
    """The headline of a variant that ran in a temporary copy (its report went with the copy)."""
    def top1(model: str) -> str:
        value = (metrics.get(model) or {}).get("top1")
        return f"{model} {100 * value:.2f} %" if isinstance(value, (int, float)) else f"{model} -"

    gain = metrics.get("distillation_gain")
    gain_text = f", distillation gain {100 * gain:+.2f} points" if isinstance(gain, (int, float)) else ""
    keep = " ".join(f"-S {shlex.quote(o)}" for o in overrides)
    return (f"DVC experiment {name} ({' '.join(overrides) or 'no overrides'}), test top-1: "
            f"{', '.join(top1(m) for m in ('teacher', 'baseline', 'student'))}{gain_text}.\n"
            f"It ran in a temporary copy: params.yaml, dvc.lock and the outputs here are as they were. Compare: "
            f"`dvc exp show`; keep it: `python -m flows pipeline --apply {keep}`.")


def experiment_files(root: Path, names: list[str], files: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """The metrics ``files`` of each named DVC experiment of this commit: ``{name: {file: data}}`` (an experiment
    or a file that is not there is left out).

    Read from the experiment's commit, which DVC keeps as the git ref ``refs/exps/<commit[:2]>/<commit[2:]>/<name>``
    (DVC's documented layout: "experiments are custom Git references"), with ``git show``: milliseconds, where
    ``dvc exp show --json`` takes seconds in a repository with many experiments (each variant of a sweep reads it).
    """
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    if head.returncode != 0:
        raise StageFailed(f"`git rev-parse HEAD` failed in {root}: {head.stderr.strip()}")
    sha = head.stdout.strip()
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        ref = f"refs/exps/{sha[:2]}/{sha[2:]}/{name}"
        for path in files:
            res = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=root, capture_output=True, text=True,
                                 check=False)
            if res.returncode == 0:
                found.setdefault(name, {})[path] = json.loads(res.stdout)
    return found


def experiment_metrics(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``metrics/evaluate.json`` of each named DVC experiment, read with ``dvc exp show --json``."""
    found = {name: files.get("metrics/evaluate.json") or {}
             for name, files in experiment_files(root, names, ["metrics/evaluate.json"]).items()}
    missing = [n for n in names if not found.get(n)]
    if missing:
        raise StageFailed(f"DVC has no evaluate metrics for experiment(s) {', '.join(missing)}")
    return found
