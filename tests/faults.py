"""Fault injection into the product's own training loop, for the tests only: the product has no hook for it.

Every training of a stage goes through one call, ``fit`` as :mod:`distill.stages._training` calls it. The tests add
their engine callbacks (:class:`distill.engine.Callback`) to that call:

* in the test process, with :func:`injected` (a context manager);
* in the stage processes a test starts, through ``tests/plugins/sitecustomize.py``: the fixture ``fault_plugin``
  (tests/conftest.py) puts that folder on ``PYTHONPATH``, so Python loads it at start-up in every process of the
  test (the stage, DVC's, a launched group's ranks). It installs :func:`install_on_import`, which adds the
  callback :func:`make` returns for the stage once ``distill.stages._training`` is imported. What it does comes
  from the test, in ``DISTILL_TEST_FAULT``:

``[<stage>:]<action>@<step>``, fired once per process when ``<step>`` optimizer steps are done:

* ``kill``: SIGKILL this very process (a real crash);
* ``raise``: raise a ``RuntimeError`` (a Prefect retry runs in the same process: it does not fire again);
* ``nan``: write NaN into the model's weights (the next loss is NaN);
* ``wait``: touch ``$DISTILL_TEST_FAULT_FILE.waiting``, then block until ``$DISTILL_TEST_FAULT_FILE`` exists.

With ``DISTILL_TEST_FAULT_ONCE=<path>`` the fault fires in one process of the whole test only, the first to reach
it (it creates ``<path>``): a retry in a new process then goes on.

With ``DISTILL_TEST_STEPS_FILE`` every process also keeps ``<stage> <starts> <last global step>`` up to date in
``$DISTILL_TEST_STEPS_FILE.<pid>`` after each step, where ``<starts>`` lists the first global step of each training
the process ran (a Prefect retry trains again in the same process), so a test can prove a resume happened (the
first step of a resumed training is past the steps its saved epochs already did) however the process ended.

If the product's training stops going through ``distill.stages._training.fit``, no fault fires and the tests that
rely on one fail: they never pass by not injecting.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

#: The module whose ``fit`` every stage's training calls.
TRAINING = "distill.stages._training"


class Fault:
    def __init__(self, stage: str, action: Optional[str], step: int) -> None:
        self.stage, self.action, self.step, self.fired = stage, action, step, False
        self.starts: list[int] = []
        self.last = 0
        self.steps_file = os.environ.get("DISTILL_TEST_STEPS_FILE")

    def on_step_end(self, info: Any) -> None:
        if not self.starts or info.global_step <= self.last:  # a new training (a retry starts over or resumes)
            self.starts.append(info.global_step)
        self.last = info.global_step
        if self.steps_file:
            starts = ",".join(map(str, self.starts))
            Path(f"{self.steps_file}.{os.getpid()}").write_text(f"{self.stage} {starts} {info.global_step}\n")
        if self.action is None or self.fired or info.global_step != self.step:
            return
        self.fired = True
        once = os.environ.get("DISTILL_TEST_FAULT_ONCE")
        if once:  # once for the whole test, not once per process: the first process to get here creates the file
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        print(f"[{self.stage}] injected fault: {self.action} after {self.step} steps", file=sys.stderr, flush=True)
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "raise":
            raise RuntimeError(f"[{self.stage}] injected fault after {self.step} steps")
        elif self.action == "nan":
            import torch

            with torch.no_grad():
                for p in info.model.parameters():
                    p.fill_(float("nan"))
        elif self.action == "wait":
            release = Path(os.environ["DISTILL_TEST_FAULT_FILE"])
            Path(f"{release}.waiting").touch()
            while not release.exists():
                time.sleep(0.1)


def make(stage: str) -> Optional[Fault]:
    """The callback for ``stage``, or None when the test asked for nothing here."""
    spec = os.environ.get("DISTILL_TEST_FAULT", "")
    target, _, rule = spec.rpartition(":")
    action, _, step = rule.partition("@")
    if spec and (not target or target == stage) and step.isdigit():
        return Fault(stage, action, int(step))
    if os.environ.get("DISTILL_TEST_STEPS_FILE"):
        return Fault(stage, None, 0)
    return None


def _adding(fit: Callable[..., Any], callbacks: Callable[[str], list[Any]]) -> Callable[..., Any]:
    """``fit`` that also calls ``callbacks(<the run's name>)`` (the stage's name: the product passes it as desc)."""
    def fit_with_callbacks(task: Any, **kwargs: Any) -> Any:
        kwargs["callbacks"] = [*kwargs.get("callbacks", ()), *callbacks(kwargs.get("desc", "train"))]
        return fit(task, **kwargs)

    return fit_with_callbacks


@contextlib.contextmanager
def injected(*callbacks: Any) -> Iterator[None]:
    """Every stage training run in this process inside the block also calls ``callbacks``."""
    import distill.stages._training as training

    real = training.fit
    training.fit = _adding(real, lambda _stage: list(callbacks))
    try:
        yield
    finally:
        training.fit = real


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``hook(module)`` right after the module ``name`` is first executed (then steps out of the way)."""

    def __init__(self, name: str, hook: Callable[[ModuleType], None]) -> None:
        self.name, self.hook = name, hook

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            self.hook(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install_on_import() -> None:
    """In a process the test started: once the product's training module is imported, its ``fit`` also calls the
    fault of ``DISTILL_TEST_FAULT`` for the stage (one per stage and process: a retry does not fire it again)."""
    if not (os.environ.get("DISTILL_TEST_FAULT") or os.environ.get("DISTILL_TEST_STEPS_FILE")):
        return
    faults: dict[str, Optional[Fault]] = {}

    def for_stage(stage: str) -> list[Any]:
        if stage not in faults:
            faults[stage] = make(stage)
        return [faults[stage]] if faults[stage] is not None else []

    def hook(module: ModuleType) -> None:
        module.fit = _adding(module.fit, for_stage)  # type: ignore[attr-defined]

    sys.meta_path.insert(0, _AfterImport(TRAINING, hook))
