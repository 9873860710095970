"""What a stage runs on: the :class:`accelerate.Accelerator`, the one place that knows devices, processes and precision.

Each stage that runs a model makes its own accelerator here and hands it down (to the training loop, the soft-label
store's generation, the evaluation), so the loop itself never decides what it runs on. Precision, device and process
count come from ``accelerate launch`` / ``accelerate config`` / the environment, never from ``params.yaml``; what
they were is recorded with the stage's MLflow run (:func:`log_runtime`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from distill.tracking import Tracker

__all__ = ["log_runtime", "make_accelerator"]


def make_accelerator(*, grad_accum: int = 1, cpu: bool | None = None) -> Any:
    """Create the :class:`accelerate.Accelerator`.

    Precision, device and process count come from ``accelerate launch`` / ``accelerate config`` /
    the environment (``ACCELERATE_MIXED_PRECISION``, ``ACCELERATE_USE_CPU``), never from params.

    Args:
        grad_accum: batches accumulated per optimizer step (a training recipe's ``grad_accum``).
        cpu: force the CPU (None: as the environment says).
    """
    from accelerate import Accelerator

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if cpu is None:
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: accelerate forms the (gloo)
        # process group only when told to use the CPU; otherwise every rank would train alone.
        cpu = cpu or (world > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(gradient_accumulation_steps=grad_accum, cpu=cpu)
    if world > 1 and accelerator.num_processes != world:
        raise RuntimeError(f"{world} processes were launched (WORLD_SIZE) but accelerate formed a group of "
                           f"{accelerator.num_processes}: set ACCELERATE_USE_CPU=1 on machines without GPUs")
    return accelerator


def log_runtime(tracker: Tracker, accelerator: Any) -> None:
    """What accelerate runs the stage on, as params of its MLflow run: the process count and the precision change
    the steps and the learning rate (``scale_lr``), the device the speed, yet none of them is in ``params.yaml``."""
    tracker.log_params({"runtime": {"num_processes": accelerator.num_processes,
                                    "mixed_precision": str(accelerator.mixed_precision),
                                    "device": str(accelerator.device),
                                    "distributed_type": str(accelerator.distributed_type.value)}})
