"""Run one stage by name, with exactly the parameters ``dvc.yaml`` declares for it.

``dvc.yaml`` is the single definition of the stage graph: the stages are its entries whose command is
``python -m flows stage <name>``, in the order they are written (a valid run order), and each one's
``params`` list is all it may read (:class:`distill.config.ParamsView`).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Sequence

import yaml

from distill.config import Params, ParamsError, ParamsView, Paths, declared_params
from distill.tracking import NO_TRACKING, Tracker

__all__ = ["STAGE_COMMAND", "pipeline_stages", "stage_view", "run_stage"]

STAGE_COMMAND = re.compile(r"^python -m flows stage (\w+)$")


def pipeline_stages(dvc_yaml: str | Path) -> list[str]:
    """The stages of ``dvc.yaml`` that run a library stage, in the order the file lists them."""
    try:
        stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise ParamsError(f"{dvc_yaml}: cannot read the stage graph ({type(err).__name__}: {err})") from None
    names = []
    for name, spec in stages.items():
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
              dvc_yaml: str | Path | None = None, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run ``distill.stages.<stage>.run`` with its declared parameters.

    Args:
        stage: the stage's name (its module in ``distill.stages``).
        params: the validated parameters (wrapped in the stage's view), or a view already made.
        paths: the project layout to read and write.
        tracker: where the stage logs (MLflow, or nothing).
        dvc_yaml: the stage graph (default: ``paths.root / "dvc.yaml"``).
        callbacks: training callbacks passed to the engine (tests inject faults through them).

    Returns:
        The stage's summary (metrics and small values).
    """
    view = params if isinstance(params, ParamsView) else stage_view(stage, params, dvc_yaml or paths.root / "dvc.yaml")
    try:
        module = importlib.import_module(f"distill.stages.{stage}")
    except ModuleNotFoundError as err:
        if err.name != f"distill.stages.{stage}":
            raise
        raise ParamsError(f"no stage named {stage!r}: there is no module distill/stages/{stage}.py") from None
    return module.run(view, paths, tracker, callbacks=callbacks)
