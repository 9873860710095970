"""Self-describing model checkpoints.

A checkpoint is one ``.safetensors`` file: the weights plus string metadata holding the model kind,
the config that rebuilds it, the normalisation its inputs expect and the resolved parameters of the
stage that trained it (nanoGPT's habit: a checkpoint rebuilds its model alone, no ``params.yaml``
needed). safetensors never unpickles, so loading a checkpoint cannot run code.

Writes are atomic (temporary file in the same folder, then ``os.replace``): a crash leaves the old
checkpoint or none, never half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "save_model", "load_model", "read_metadata", "file_sha256", "atomic_write_bytes",
           "atomic_write_text", "atomic_write_json", "build_model"]

FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, or not one of ours."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (used to tie soft labels and metrics to the exact checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the result the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented, key-sorted JSON, atomically (metrics files DVC compares)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def build_model(kind: str, config: dict[str, Any], *, seed: int | None = None) -> nn.Module:
    """Rebuild an untrained model from a checkpoint's ``kind`` and ``config``.

    Args:
        kind: ``'deit'`` or ``'teacher'``.
        config: the keyword config saved in the checkpoint.
        seed: initialise the weights from this seed, leaving the global RNG as it was. Training
            stages pass ``params.seed``: without it the initialisation depends on whatever the global
            RNG holds, and two processes with the same params train different models.
    """
    if seed is None:
        return _build_model(kind, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_model(kind, config)


def _build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    if kind == "deit":
        from distill.models.deit import DeiT, DeiTConfig

        return DeiT(DeiTConfig.from_dict(config))
    if kind == "teacher":
        from distill.teachers import build_teacher

        cfg = dict(config)
        return build_teacher(cfg.pop("arch"), **cfg)
    raise CheckpointError(f"unknown model kind {kind!r} in checkpoint (expected 'deit' or 'teacher')")


def save_model(path: str | Path, model: nn.Module, *, kind: str, config: dict[str, Any],
               extra: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights and everything needed to rebuild it.

    Args:
        path: target ``.safetensors`` file.
        model: the (unwrapped) model.
        kind: ``'deit'`` or ``'teacher'``.
        config: keyword config that :func:`build_model` rebuilds the model from.
        extra: JSON-serialisable extras (normalisation, params, data fingerprint, metrics ...).
    """
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "format": "distill-checkpoint",
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": json.dumps(config, sort_keys=True),
        "extra": json.dumps(extra or {}, sort_keys=True, default=str),
    }
    _atomic_replace(Path(path), lambda tmp: save_file(state, tmp, metadata=meta))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint's metadata without loading weights.

    Raises:
        CheckpointError: missing, truncated or foreign file (the message names it and how to fix it).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. Run the stage that produces it (e.g. `dvc repro`).")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - any reader failure means a bad file
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({err}). Delete it and rerun the stage "
                              "that produces it (`dvc repro -f <stage>`).") from None
    if meta.get("format") != "distill-checkpoint":
        raise CheckpointError(f"{path} is a safetensors file but not a distill checkpoint (no metadata); "
                              "load raw weights with teacher.pretrained_path instead")
    return {"kind": meta["kind"], "config": json.loads(meta["config"]), "extra": json.loads(meta["extra"]),
            "format_version": meta["format_version"]}


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint alone.

    Returns:
        ``(model, info)`` with ``info = {"kind", "config", "extra"}``; the model is in eval mode.

    Raises:
        CheckpointError: the file is missing, corrupt, or its weights do not fit its config.
    """
    from safetensors.torch import load_file

    info = read_metadata(path)
    try:
        state = load_file(str(path), device=str(map_location))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({err}). Rerun the stage that produces it.") from None
    model = build_model(info["kind"], info["config"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: weights do not match its own config: {err}") from None
    return model.eval(), info
