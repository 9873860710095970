"""Self-describing model checkpoints.

A checkpoint is one ``.safetensors`` file: the weights plus string metadata holding the model kind,
the config that rebuilds it, the normalisation its inputs expect and the resolved parameters of the stage that
trained it (nanoGPT's habit: a checkpoint rebuilds its model alone, no ``params.yaml`` needed). This module is the
format only: each kind of model has its own loader, which passes its builder to :func:`load_checkpoint`
(:func:`distill.teachers.load_teacher`, :func:`distill.models.deit.load_deit`), so loading a teacher does not
import the student's code, nor the other way round. safetensors never unpickles, so loading a checkpoint cannot
run code. safetensors has no checksum of its own: a flipped bit inside a tensor loads silently. So the metadata
records the sha256 of the weights (:func:`weights_sha256`), and :func:`load_checkpoint` refuses a checkpoint whose
weights no longer match it, naming the file and the stage that rebuilds it: a stage run outside DVC (which
checks the file's md5) then cannot build on a damaged teacher.

Writes go through :func:`distill.io.atomic_replace` (temporary file, ``fsync``, rename, ``fsync`` of the
folder): a crash leaves the old checkpoint or the new one, never half a file. The same weights and metadata give
the same bytes: the header is written in a canonical order (safetensors writes its metadata map in a random order
per save, safetensors/safetensors#584), and nothing run-dependent (wall-clock timings) goes into the metadata, so
DVC sees identical weights as an unchanged output and reruns nothing downstream.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.io import atomic_replace

__all__ = ["CheckpointError", "checkpoint_writer", "load_checkpoint", "read_metadata", "save_model", "weights_sha256"]

FORMAT_VERSION = "2"  # 2: the metadata records weights_sha256 (version 1 files load without the check)


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, or not one of ours."""


def save_model(path: str | Path, model: nn.Module, *, kind: str, config: dict[str, Any],
               extra: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights and everything needed to rebuild it.

    Args:
        path: target ``.safetensors`` file.
        model: the (unwrapped) model.
        kind: ``'deit'`` or ``'teacher'`` (the loader that may rebuild it).
        config: keyword config that the kind's builder rebuilds the model from.
        extra: JSON-serialisable extras (normalisation, params, data fingerprint, metrics ...).
    """
    atomic_replace(path, checkpoint_writer(model, kind=kind, config=config, extra=extra))


def checkpoint_writer(model: nn.Module, *, kind: str, config: dict[str, Any],
                      extra: dict[str, Any] | None = None) -> Callable[[str], None]:
    """:func:`save_model`'s file as a writer for :func:`distill.io.replace_together` (a stage's outputs as one
    set): the weights are copied and serialised now, the returned function writes them to the path it is given."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "format": "distill-checkpoint",
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": json.dumps(config, sort_keys=True),
        "extra": json.dumps(extra or {}, sort_keys=True, default=str),
        "weights_sha256": weights_sha256(state),
    }
    data = save(state, metadata=meta)
    return lambda tmp: _write_canonical(tmp, data)


def _write_canonical(path: str, data: bytes) -> None:
    """Write safetensors ``data`` with its JSON header re-serialised with sorted keys, so equal content gives equal
    bytes (safetensors/safetensors#584: the ``__metadata__`` map comes out in a random order; pinned by
    tests/test_stage_outputs.py). The format allows any key order and pads the header with spaces to a multiple
    of 8 bytes; tensor offsets count from the end of the header, so they stay valid."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.write(memoryview(data)[8 + n:])


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
            "format_version": meta["format_version"], "weights_sha256": meta.get("weights_sha256")}


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict: each tensor's name, dtype, shape and bytes, in name order (device-independent)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _check_weights(path: str | Path, state: Mapping[str, torch.Tensor], info: dict[str, Any]) -> None:
    """The weights read back must be the ones saved (version 1 checkpoints recorded no checksum)."""
    recorded = info.get("weights_sha256")
    if recorded is None or weights_sha256(state) == recorded:
        return
    stage = info["extra"].get("stage") or "<stage>"
    raise CheckpointError(f"checkpoint {path} is corrupt: its weights do not match the sha256 recorded when it was "
                          f"saved (a damaged or edited file). Delete it and rerun the stage that produces it "
                          f"(`dvc repro -f {stage}`, or `dvc checkout {path}` if DVC's cache holds a good copy).")


def load_checkpoint(path: str | Path, build: Callable[[dict[str, Any]], nn.Module], *, kind: str,
                    map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model of ``kind`` from a checkpoint alone: ``build(config)``, then the checked weights.

    Args:
        path: the ``.safetensors`` checkpoint.
        build: the kind's builder, from the saved config to an untrained model.
        kind: what the checkpoint must hold (``'deit'``, ``'teacher'``).
        map_location: where the weights are read to.

    Returns:
        ``(model, info)`` with ``info = {"kind", "config", "extra", "format_version", "weights_sha256"}``; the model
        is in eval mode.

    Raises:
        CheckpointError: the file is missing, corrupt (its weights differ from the recorded sha256), holds another
            kind of model, or its weights do not fit its config.
    """
    from safetensors.torch import load_file

    info = read_metadata(path)
    if info["kind"] != kind:
        raise CheckpointError(f"checkpoint {path} holds a {info['kind']!r} model, not a {kind!r} one; load it with "
                              f"the loader of its kind")
    try:
        state = load_file(str(path), device=str(map_location))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({err}). "
                              "Rerun the stage that produces it.") from None
    _check_weights(path, state, info)
    try:
        model = build(info["config"])
    except (ValueError, TypeError) as err:  # a config this code cannot build
        raise CheckpointError(f"checkpoint {path}: cannot rebuild its model ({err})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: weights do not match its own config: {err}") from None
    return model.eval(), info
