"""Run one stage by name, with exactly the parameters ``dvc.yaml`` declares for it.

``dvc.yaml`` is the single definition of the stage graph: the stages are its entries whose command is
``python -m flows stage <name>``, in the order they are written (a valid run order), and each one's
``params`` list is all it may read (:class:`distill.config.ParamsView`).

Finished resume states: a training stage keeps its resume state after it has written its outputs, marked
finished (:func:`mark_finished`: the md5 of each output, as DVC records it), because until DVC has recorded the
stage in ``dvc.lock`` the work is not safe: a failure after the outputs (a dead Prefect API, an input deleted
meanwhile) fails the stage for DVC, which deletes the outputs on the rerun. The rerun, with the same resume key,
then finds the last epoch's state and writes the outputs from it without training. A finished state goes once
``dvc.lock`` records exactly its outputs: every stage process sweeps them first (:func:`discard_recorded_states`),
so the next stage of the same ``dvc repro`` removes the state of the one before.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import yaml

from distill.config import Params, ParamsError, ParamsView, Paths, declared_params, dvc_stages
from distill.io import atomic_write_json, discard_dir, file_md5
from distill.tracking import NO_TRACKING, Tracker

__all__ = ["FINISHED", "STAGE_COMMAND", "discard_recorded_states", "mark_finished", "pipeline_stages", "stage_view",
           "run_stage"]

#: The file in a resume state folder that says its training is done and its outputs written (and their md5).
FINISHED = "finished.json"

STAGE_COMMAND = re.compile(r"^python -m flows stage (\w+)$")


def pipeline_stages(dvc_yaml: str | Path) -> list[str]:
    """The stages of ``dvc.yaml`` that run a library stage, in the order the file lists them."""
    names = []
    for name, spec in dvc_stages(dvc_yaml).items():
        match = STAGE_COMMAND.match(str(spec.get("cmd", "")).strip())
        if match:
            if match.group(1) != name:
                raise ParamsError(f"{dvc_yaml}: stage {name} runs `{spec['cmd']}`; the name must match")
            names.append(name)
    return names


def stage_view(stage: str, params: Params, dvc_yaml: str | Path) -> ParamsView:
    """``params`` as stage ``stage`` may read them: only what ``dvc.yaml`` declares for it."""
    return ParamsView(params, stage=stage, declared=declared_params(stage, dvc_yaml))


def run_stage(stage: str, params: Params | ParamsView, paths: Paths, tracker: Tracker = NO_TRACKING, *,
              dvc_yaml: str | Path | None = None) -> dict[str, Any]:
    """Run ``distill.stages.<stage>.run`` with its declared parameters.

    Args:
        stage: the stage's name (its module in ``distill.stages``).
        params: the validated parameters (wrapped in the stage's view), or a view already made.
        paths: the project layout to read and write.
        tracker: where the stage logs (MLflow, or nothing).
        dvc_yaml: the stage graph (default: ``paths.root / "dvc.yaml"``).

    Returns:
        The stage's summary (metrics and small values).
    """
    view = params if isinstance(params, ParamsView) else stage_view(stage, params, dvc_yaml or paths.root / "dvc.yaml")
    if os.environ.get("RANK", "0") == "0":  # one process of a launched group sweeps
        discard_recorded_states(paths)
    try:
        module = importlib.import_module(f"distill.stages.{stage}")
    except ModuleNotFoundError as err:
        if err.name != f"distill.stages.{stage}":
            raise
        raise ParamsError(f"no stage named {stage!r}: there is no module distill/stages/{stage}.py") from None
    return module.run(view, paths, tracker)


def mark_finished(state_dir: Path, paths: Paths, outputs: Sequence[Path]) -> None:
    """Record in a training's resume state that its outputs are written, with their md5 (DVC's hash of a file)."""
    record = {"outputs": {os.path.relpath(p, paths.root): file_md5(p) for p in outputs}}
    atomic_write_json(Path(state_dir) / FINISHED, record)


def _recorded_outputs(paths: Paths) -> dict[str, dict[str, str]]:
    """``dvc.lock``'s md5 of every file output, per stage (nothing if there is no readable lock)."""
    try:
        lock = yaml.safe_load((paths.root / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    stages = lock.get("stages") if isinstance(lock, dict) else None
    return {name: {o["path"]: o["md5"] for o in (entry or {}).get("outs") or [] if "path" in o and "md5" in o}
            for name, entry in (stages or {}).items()}


def discard_recorded_states(paths: Paths) -> list[Path]:
    """Delete every finished resume state whose outputs ``dvc.lock`` records as they were written.

    Returns:
        The state folders deleted.
    """
    recorded = _recorded_outputs(paths)
    gone = []
    for marker in sorted((paths.root / ".state").glob(f"*/*/{FINISHED}")):
        stage, folder = marker.parent.parent.name, marker.parent
        try:
            outputs = json.loads(marker.read_text())["outputs"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a marker being written, or damaged: keep the state, it is only disk space
        if outputs and all(recorded.get(stage, {}).get(p) == md5 for p, md5 in outputs.items()):
            discard_dir(folder)
            gone.append(folder)
    return gone
