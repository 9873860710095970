"""The DeiT that the student and baseline stages train: built for the data from ``student.model`` (a preset and its
overrides, :func:`distill.models.deit_config.student_config`), initialised from the run's seed, and started from
``student.model.pretrained_path`` when one is set (:func:`distill.models.deit_pretrained.load_pretrained_deit`).
The teacher stage does not import it: a DeiT edit never retrains the teacher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from distill.config import ParamsView, Paths
from distill.data import DatasetMeta
from distill.models.deit import DeiT
from distill.models.deit_config import DeiTConfig, student_config
from distill.models.deit_pretrained import load_pretrained_deit
from distill.stages._training import build_seeded
from distill.tracking import Tracker
from distill.weights import pretrained_file

__all__ = ["build_student"]


def build_student(model: ParamsView, meta: DatasetMeta, paths: Paths, *, distilled: bool, seed: int,
                  tracker: Tracker) -> tuple[nn.Module, dict[str, Any], list[Path]]:
    """A DeiT for this dataset, started from ``student.model.pretrained_path`` when one is set.

    Returns:
        The model, its config, and the weights file it started from (a resume-key input), if any.
    """
    cfg = student_config(model, image_size=meta.image_size, channels=meta.channels, num_classes=meta.num_classes,
                         distilled=distilled)
    net = build_seeded(lambda: DeiT(DeiTConfig.from_dict(cfg)), seed)
    if not model.pretrained_path:
        return net, cfg, []
    weights = pretrained_file(paths, "student", model.pretrained_path)
    tracker.log_dict(load_pretrained_deit(net, weights), "pretrained_load.json")
    return net, cfg, [weights]
