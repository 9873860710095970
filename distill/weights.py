"""Reading weights trained elsewhere: one reader for the teacher and the student.

A weights file is ``.safetensors`` or a torch file read with ``torch.load(weights_only=True)``, so a hostile
file cannot run code. Files trained elsewhere come in a few common wrappings, all accepted:

* a nested dict: ``{"model": state_dict}`` (facebookresearch/deit releases), ``{"state_dict": ...}`` (timm's
  ``train.py``, Lightning), ``{"module": ...}``, plus other entries (epoch, optimizer, ``args``) that are ignored;
  an ``argparse.Namespace`` under ``args`` (timm and DeiT training scripts save one) is allowed to unpickle;
* key prefixes from wrappers: ``module.`` (DDP), ``_orig_mod.`` (``torch.compile``) and ``model.`` (our own
  ``_GrayToRGB``/``InputAdapter`` teacher wrappers, possibly twice); :func:`strip_wrapper_prefixes` removes a
  prefix only when every key carries it and the result fits the target model better.

:func:`diff_state` compares a state dict with a model's and names what is missing, extra or of another shape,
so every loader can say exactly which key failed and why.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill.config import Paths

__all__ = ["StateDiff", "diff_state", "format_keys", "load_weights_file", "pretrained_file", "pretrained_key",
           "strip_wrapper_prefixes"]

NESTED_KEYS = ("state_dict", "model", "module")  # where training scripts put the weights inside a checkpoint dict
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects.

    Args:
        path: The file.

    Returns:
        ``{name: tensor}``, unwrapped from ``{"model": ...}``/``{"state_dict": ...}``/``{"module": ...}``.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: The file is corrupt, needs unpickling of code, or holds no state dict (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (point the pretrained_path param at an existing "
                                "file, or set it to null)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # An argparse.Namespace holds only attributes: safe to allow, and DeiT/timm training checkpoints carry one.
        allow = getattr(torch.serialization, "safe_globals", None)
        with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
            state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means a bad file
        raise ValueError(f"cannot read weights from {path}: {err}. Re-export them with torch.save(model.state_dict()) "
                         "or safetensors.") from None
    while isinstance(state, dict) and not _all_tensors(state):
        inner = next((state[k] for k in NESTED_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict) or not state or not _all_tensors(state):
        found = f"a dict with keys {format_keys(state)}" if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} does not hold a state dict of tensors (found {found}; expected one at the top or "
                         f"under one of {', '.join(NESTED_KEYS)})")
    return state


def pretrained_key(role: str) -> str:
    """The param that names ``role``'s pretrained weights file."""
    return "teacher.pretrained_path" if role == "teacher" else "student.model.pretrained_path"


def pretrained_file(paths: Paths, role: str, value: str) -> Path:
    """``<role>.pretrained_path`` as a path, once it is sure DVC watches it: it lies in ``models/pretrained/<role>/``.

    The check is on the path as written (made absolute, ``..`` folded), not on where a symbolic link points: a link
    in that folder is accepted (DVC hashes what it points to, so an edit of the target reruns the stages), a path
    outside the folder is refused.

    Raises:
        ValueError: the path lies outside the folder (names the param and what to do).
        FileNotFoundError: no such file (a dangling link included).
    """
    folder = paths.pretrained(role)
    path = Path(os.path.abspath(paths.root / value))  # lexical: no symlink resolution
    if not path.is_relative_to(os.path.abspath(folder)):
        raise ValueError(f"{pretrained_key(role)} = {value!r} lies outside {folder}/, which dvc.yaml lists as the "
                         "dependency of the stages that read it: DVC would not rerun them when the file changes. Move "
                         f"or link the file into {folder}/ (and `dvc add` it there).")
    if not path.is_file():
        raise FileNotFoundError(f"{pretrained_key(role)} = {value!r}: no such file {path}")
    return path


def _all_tensors(state: Mapping[str, Any]) -> bool:
    return all(isinstance(v, Tensor) for v in state.values())


def strip_wrapper_prefixes(state: Mapping[str, Tensor], keys: Collection[str]) -> tuple[dict[str, Tensor], list[str]]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, ``model.``) that stand between ``state`` and ``keys``.

    A prefix is removed only when every key of ``state`` carries it and more keys then match ``keys``, so a model
    whose own parameters start with ``model.`` keeps them.

    Args:
        state: Weights as read from a file.
        keys: The target model's state-dict keys.

    Returns:
        ``(state, prefixes)``: the renamed weights and the prefixes removed, in order.
    """
    keys = set(keys)
    out, removed = dict(state), []
    while True:
        hits = len(keys.intersection(out))
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                stripped = {k[len(prefix):]: v for k, v in out.items()}
                if len(keys.intersection(stripped)) > hits:
                    out, removed = stripped, [*removed, prefix]
                    break
        else:
            return out, removed


@dataclass
class StateDiff:
    """How a state dict differs from a model's.

    Attributes:
        missing: Model keys the weights lack (BatchNorm's ``num_batches_tracked`` counters are not counted:
            ``load_state_dict`` fills them in).
        unexpected: Weight keys the model does not have.
        mismatched: ``{key: (shape in the weights, shape in the model)}``.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every tensor loads strictly."""
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """One line per kind of difference, each naming the keys (and shapes)."""
        lines = []
        if self.mismatched:
            shapes = [f"{k}: file {list(a)} vs model {list(b)}" for k, (a, b) in self.mismatched.items()]
            lines.append(f"shapes differ for {format_keys(shapes)}")
        if self.missing:
            lines.append(f"missing from the file: {format_keys(self.missing)}")
        if self.unexpected:
            lines.append(f"not in the model: {format_keys(self.unexpected)}")
        return "; ".join(lines)


def diff_state(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> StateDiff:
    """Compare weights with a model's own state dict (``model.state_dict()``)."""
    return StateDiff(  # in the model's order (stem first), which tells more than the file's (often sorted)
        missing=[k for k in own if k not in state and not k.endswith("num_batches_tracked")],
        unexpected=sorted(k for k in state if k not in own),
        mismatched={k: (tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
                    if k in state and state[k].shape != v.shape},
    )


def format_keys(keys: Collection[str], limit: int = 8) -> str:
    """``a, b, c`` with at most ``limit`` entries, then ``... (N more)``."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
