"""Pre-flight: every value a stage would reject, checked before DVC runs any stage.

DVC deletes a stage's outputs before it runs the stage's command (outside ``persist``), so an error that a stage
finds late costs that stage's outputs (all of ``data/prepared`` for a bad data setting; outside DVC's run-cache,
after a fresh clone and ``dvc pull``, they are gone). What a stage would reject is therefore checked here first,
against the registries the values come from, without building a real model or decoding an image:

* the params themselves (:func:`distill.config.load_params`: keys, types, ranges);
* ``student.model``: a known DeiT preset, and a config DeiT can have at ``data.image_size`` (the patch size
  divides the image size, the heads divide the width);
* ``teacher.arch``: ``resnet_small``, a torchvision classification model or ``timm/<name>`` that timm knows, and
  one that takes ``teacher.input_size`` (or ``data.image_size``) pixels (a forward pass on the meta device);
* ``data``: ``data.root`` exists (a DVC dependency of the data stage: DVC itself would stop on it with a bare
  ``[Errno 2]``), and the dataset's files and splits are what the data stage needs (its own planning step);
* ``teacher.pretrained_path`` and ``student.model.pretrained_path``: files inside ``models/pretrained/<role>/``;
* the MLflow tracking server, when ``MLFLOW_TRACKING_URI`` names one: it answers.

One function, :func:`preflight`, used in two places: DVC's first stage, ``check_params`` (``python -m
distill.preflight``; its deps are ``params.yaml``, ``${data.root}``, the pretrained folders and this module's
imports, so it runs again whenever one of them changes), and ``python -m flows pipeline`` / ``seeds``, before
they start DVC (which also covers what DVC does not watch: the tracking server in the environment).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from distill.config import Params, ParamsError, Paths, load_params
from distill.models.deit_config import student_config
from distill.prepare import SplitSpec, check_source
from distill.teachers import check_arch, check_input_size
from distill.tracking import TrackingUnavailableError, check_tracking_server, tracking_uri
from distill.weights import pretrained_file

__all__ = ["PreflightError", "main", "preflight"]


class PreflightError(ParamsError):
    """A value that a stage would reject, found before any stage runs (one line per problem)."""


def preflight(params: Params, root: str | Path = ".", *, source: str = "params.yaml", tracking: bool = True) -> None:
    """Check everything a stage would reject in ``params``, for the project at ``root``.

    Args:
        params: the validated parameters (with any ``-S`` overrides applied).
        root: the project root (``data.root`` and the pretrained paths are relative to it).
        source: where the params came from, for the message.
        tracking: also check the tracking server (when one is configured).

    Raises:
        PreflightError: naming every problem, its key and what to do.
    """
    paths = Paths(Path(root))
    problems = [*_student(params), *_teacher(params), *_data(params, paths), *_pretrained(params, paths)]
    if tracking:
        problems += _tracking(paths)
    if problems:
        raise PreflightError(f"{source} asks for what a stage would reject (found before DVC ran any stage, so no "
                             "output was deleted):\n" + "\n".join(f"  - {p}" for p in problems))


def _student(params: Params) -> list[str]:
    try:  # the data's channels and classes do not change what can be refused here
        student_config(params.student.model, image_size=params.data.image_size, channels=3, num_classes=2,
                       distilled=True)
    except ValueError as err:
        return [str(err)]
    return []


def _teacher(params: Params) -> list[str]:
    t = params.teacher
    size = t.input_size or params.data.image_size
    try:
        check_arch(t.arch)
        check_input_size(t.arch, size)
    except (ValueError, ImportError) as err:
        return [f"teacher.arch = {t.arch!r}: {err}"]
    return []


def _data(params: Params, paths: Paths) -> list[str]:
    d = params.data
    root = Path(d.root) if Path(d.root).is_absolute() else paths.root / d.root
    if not root.is_dir():
        unused = " (digits does not read it, but DVC does: keep an empty folder there)" if d.name == "digits" else ""
        return [f"data.root = {d.root!r}: no such folder {Path(os.path.abspath(root))}. dvc.yaml lists it as a "
                f"dependency of the data stage, so DVC needs it to exist{unused}; create it, or set data.root to "
                "your data's folder"]
    try:
        with _quiet("distill.prepare"):  # the data stage itself warns about small classes, once
            check_source(d.name, root=root, download=d.download, split=SplitSpec.of(d, params.seed))
    except (OSError, ValueError) as err:  # DatasetNotFoundError is a FileNotFoundError
        return [f"data ({d.name} at {d.root}): {err}"]
    return []


def _pretrained(params: Params, paths: Paths) -> list[str]:
    problems = []
    for role, value in (("teacher", params.teacher.pretrained_path), ("student", params.student.model.pretrained_path)):
        if value:
            try:
                pretrained_file(paths, role, value)
            except (ValueError, OSError) as err:
                problems.append(str(err))
    return problems


def _tracking(paths: Paths) -> list[str]:
    try:
        check_tracking_server(tracking_uri(paths.root))
    except TrackingUnavailableError as err:
        return [str(err)]
    return []


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Drop the records of ``logger`` for the duration (what the stage will say anyway)."""
    log = logging.getLogger(logger)
    drop = logging.Filter(name="\0")  # a filter that matches no logger name: every record is dropped
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def main(argv: list[str] | None = None) -> int:
    """``python -m distill.preflight [params.yaml] [--stamp FILE]``: check, print the error and exit 2 if bad.

    The pipeline's first DVC stage (``check_params``): it runs before every other one, so a bad value stops the
    pipeline before DVC deletes any stage's outputs. ``--stamp`` writes a file whose content never changes, so a
    valid edit reruns nothing by itself.
    """
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m distill.preflight",
                                 description="Check params.yaml for every value a stage would reject.")
    ap.add_argument("params", nargs="?", default="params.yaml")
    ap.add_argument("--stamp", default=None, help="write this file when the params are valid (a DVC output)")
    args = ap.parse_args(argv)
    try:
        preflight(load_params(args.params), Path(args.params).resolve().parent, source=args.params)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.stamp:
        Path(args.stamp).write_text("params valid\n")
    print(f"{args.params}: valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
