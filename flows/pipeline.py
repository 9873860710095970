"""The whole pipeline as one Prefect flow, run *through DVC*.

The stage graph is written down once, in ``dvc.yaml``. This flow runs ``dvc repro`` (or, with
parameter overrides, ``dvc exp run -S key=value ...``), so DVC alone decides which stages are out of
date; every stage DVC runs is itself a Prefect flow run (``python -m flows stage <name>``).

It also opens the MLflow *parent* run of this execution and hands its id to the stage processes
(``DISTILL_PARENT_RUN_ID``), hands them this flow's Prefect API URL so they do not each start a
temporary Prefect server (about 10 s each), and keeps a stage server (:mod:`flows.stage_server`) so
that each stage process starts with torch, Prefect and MLflow already imported.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger

from distill.config import apply_overrides, load_params, parse_params
from distill.tracking import MlflowTracker, create_pipeline_run, open_experiment, tracking_uri
from flows.stage_server import warm_stages
from flows.stages import publish_report


class StageFailed(RuntimeError):
    """A DVC command run by the pipeline exited non-zero."""


def log_line(raw: bytes) -> str:
    """The text of one output line worth logging: what is left after the last carriage return.

    A progress bar redraws itself with ``\\r`` and no newline, so a line of a stage's output holds every
    redraw and then the real line (or nothing, when the bar erased itself).
    """
    return raw.decode(errors="replace").rstrip("\r\n").rsplit("\r", 1)[-1].rstrip()


def _stream(cmd: list[str], *, cwd: Path, env: dict[str, str], logger: Any) -> list[str]:
    """Run ``cmd``, logging its output line by line into the flow run; returns the lines. Fails on non-zero exit."""
    logger.info("$ %s", " ".join(cmd))
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for raw in proc.stdout:  # bytes, split on "\n" only (text mode would split on "\r" too)
        line = log_line(raw)
        if line:
            logger.info(line)  # the flow run's log, which Prefect also echoes to the console
            lines.append(line)
    rc = proc.wait()
    if rc != 0:
        raise StageFailed(f"`{' '.join(cmd)}` exited with status {rc}; see the log above for the failing stage")
    return lines


def _api_url() -> Optional[str]:
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return str(client.api_url)
    except Exception:  # noqa: BLE001 - no API at all: stages fall back to their own
        return None


def _open_parent_run(root: Path, overrides: list[str], exp_name: Optional[str]) -> str:
    client, experiment_id = open_experiment(root)
    return create_pipeline_run(client, experiment_id, root, run_name=exp_name or "pipeline",
                               tags={"overrides": " ".join(overrides), "dvc_exp_name": exp_name or "",
                                     "prefect_flow_run_id": _flow_run_id()})


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


@flow(name="distill-pipeline", log_prints=True, persist_result=False)
def pipeline_flow(overrides: Optional[list[str]] = None, project_root: str = ".", exp_name: Optional[str] = None,
                  force: bool = False, temp: bool = False) -> dict[str, Any]:
    """Run the pipeline through DVC.

    Args:
        overrides: ``key=value`` parameter overrides (e.g. ``student.distillation=soft``); when given,
            the run is a DVC experiment (``dvc exp run -S ...``): DVC saves it as an experiment ref, and the
            workspace is left with its params and results (``dvc exp apply`` / ``git checkout`` to go back).
        project_root: the DVC repository.
        exp_name: experiment name (with overrides).
        force: rerun every stage (``dvc repro -f``).
        temp: run the experiment in a temporary copy (``dvc exp run --temp``): the workspace keeps its params and
            results, and the experiment's metrics are read with ``dvc exp show``.

    Returns:
        ``{"evaluate": <metrics/evaluate.json or {}>, "mlflow_parent_run_id": ...}``.
    """
    import json

    logger = get_run_logger()
    root = Path(project_root).resolve()
    overrides = list(overrides or [])
    # A deployment run starts here, not in the CLI: check params and overrides before anything is opened or run.
    parse_params(apply_overrides(load_params(root / "params.yaml").model_dump(mode="json"), overrides),
                 source="params.yaml with the overrides " + " ".join(overrides) if overrides else "params.yaml")
    env = dict(os.environ)
    parent = _open_parent_run(root, overrides, exp_name)
    # Through MlflowTracker: a tracking outage during the run must not fail a pipeline whose stages finished.
    parent_run = MlflowTracker(parent, uri=tracking_uri(root))
    status = "FAILED"
    try:
        env["DISTILL_PARENT_RUN_ID"] = parent
        env["MLFLOW_TRACKING_URI"] = tracking_uri(root)  # stages log to this store even from an experiment's temp dir
        api = _api_url()
        if api:
            env["PREFECT_API_URL"] = api
        if overrides or exp_name or temp:
            cmd = (["dvc", "exp", "run"] + (["--temp"] if temp else []) + [a for o in overrides for a in ("-S", o)]
                   + (["--name", exp_name] if exp_name else []))
        else:
            cmd = ["dvc", "repro"]
        if force:
            cmd.append("-f")
        with warm_stages(root, env) as extra:
            lines = _stream(cmd, cwd=root, env={**env, **extra}, logger=logger)
        ran = [m.group(1) for m in map(re.compile(r"Ran experiment\(s\): (\S+)").search, lines) if m]
        if ran:  # DVC names experiments it runs unnamed: record the name on the parent run too
            parent_run.set_tags({"dvc_exp_name": ran[-1]})
        status = "FINISHED"
    finally:
        parent_run.terminate(status)

    result: dict[str, Any] = {"mlflow_parent_run_id": parent}
    metrics_file = root / "metrics" / "evaluate.json"
    in_workspace = not temp
    if metrics_file.is_file() and in_workspace:
        result["evaluate"] = json.loads(metrics_file.read_text())
    if in_workspace:
        publish_report(root)
    return result
