"""Fault injection for the stage processes the reliability tests start: a ``distill.callbacks`` plug-in.

The tests register this module as an entry point (``fault_plugin`` in conftest.py: a folder on ``PYTHONPATH``
with a ``.dist-info`` that names it), so every ``python -m flows stage`` they start hands the engine the
callback :func:`make` returns. What it does comes from the test, in ``DISTILL_TEST_FAULT``:

``[<stage>:]<action>@<step>``, fired once per process when ``<step>`` optimizer steps are done:

* ``kill``: SIGKILL this very process (a real crash);
* ``raise``: raise a ``RuntimeError`` (a Prefect retry runs in the same process: it does not fire again);
* ``nan``: write NaN into the model's weights (the next loss is NaN);
* ``wait``: touch ``$DISTILL_TEST_FAULT_FILE.waiting``, then block until ``$DISTILL_TEST_FAULT_FILE`` exists.

With ``DISTILL_TEST_STEPS_FILE`` every process also keeps ``<stage> <starts> <last global step>`` up to date in
``$DISTILL_TEST_STEPS_FILE.<pid>`` after each step, where ``<starts>`` lists the first global step of each training
the process ran (a Prefect retry trains again in the same process), so a test can prove a resume happened (the
first step of a resumed training is past the steps its saved epochs already did) however the process ended.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional


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
