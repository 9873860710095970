"""Starting a DeiT from weights trained elsewhere: timm's and facebookresearch/deit's releases, or our own students.

The weights are fitted to the model being built (:func:`adapt_state_dict`): the position embedding is resampled to
another patch grid (:func:`resample_pos_embed`), the patch kernel to another patch size (:func:`resample_patch_embed`,
FlexiViT's PI-resize) or channel count (:func:`adapt_input_channels`), a class-token-only checkpoint gets a
distillation token, and a head of another class count is new. :func:`load_pretrained_deit` reads a file
(:mod:`distill.weights`) and loads what was fitted, every tensor of the model included. Only the stages that start a
student (student, baseline) import this module; a model rebuilt from our own checkpoint needs none of it
(:func:`distill.models.deit.load_deit`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.checkpoint import CheckpointError, read_metadata
from distill.models.deit import DeiT
from distill.weights import diff_state, load_weights_file, strip_wrapper_prefixes

__all__ = ["adapt_input_channels", "adapt_state_dict", "load_pretrained_deit", "resample_patch_embed",
           "resample_pos_embed"]


def resample_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    *,
    old_grid: tuple[int, int] | None = None,
    antialias: bool | None = None,
) -> Tensor:
    """Resize the patch part of a position embedding to another patch grid.

    The prefix tokens (cls, dist) have no spatial position and are kept unchanged; the patch embeddings are
    treated as a ``D``-channel image and resized with bicubic interpolation (``align_corners=False``), as in
    DeiT's fine-tuning at 384 px and timm's ``resample_abs_pos_embed``.

    Args:
        pos_embed: ``(1, P + H*W, D)`` with ``P = num_prefix_tokens``.
        new_grid: Target grid ``(rows, cols)``.
        num_prefix_tokens: Number of leading non-patch tokens (2 for DeiT-distilled, 1 for ViT).
        old_grid: Source grid; inferred as square when None.
        antialias: Low-pass filter before resizing; None means "only when shrinking" (where aliasing occurs).
            Upsampling then equals DeiT's ``main.py`` (plain bicubic, a=-0.75); timm's ``resample_abs_pos_embed``
            always passes ``antialias=True``, which for upsampling switches to PIL's bicubic (a=-0.5): pass
            ``antialias=True`` to reproduce timm exactly.

    Returns:
        ``(1, P + rows*cols, D)`` in ``pos_embed``'s dtype.

    Raises:
        ValueError: If the shapes are inconsistent or the old grid cannot be inferred.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, D), got {tuple(pos_embed.shape)}")
    num_old = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(max(num_old, 0))
        if num_old <= 0 or side * side != num_old:
            raise ValueError(
                f"cannot infer a square patch grid from {num_old} patch positions "
                f"({pos_embed.shape[1]} tokens minus {num_prefix_tokens} prefix tokens); pass old_grid"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_old:
        raise ValueError(f"old_grid {old_grid} does not match the {num_old} patch positions in pos_embed")
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return pos_embed

    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, H, W), row-major
    if antialias is None:
        antialias = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    # float32 for the interpolation: bicubic is not implemented for half precision on every device.
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False, antialias=antialias)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)  # (1, P + rows*cols, D)


def resample_patch_embed(weight: Tensor, new_size: tuple[int, int]) -> Tensor:
    """Resize the patch-embedding kernel to another patch size (FlexiViT, Beyer et al. 2023).

    Plain interpolation of the kernel would change what it computes. FlexiViT's "PI-resize" instead picks the
    kernel ``w'`` that best keeps every patch token when the image is resized with the patch:
    ``<resize(x), w'> ~ <x, w>``. With ``R`` the matrix of the bicubic (antialiased) resize, that is
    ``w' = pinv(R^T) w``; exact when upsampling the patch, least-squares when shrinking it. The same
    computation as timm's ``resample_patch_embed`` (bicubic, ``antialias=True``), without importing timm.

    Args:
        weight: Conv kernel ``(D, C, p, p)``.
        new_size: Target patch ``(height, width)``.

    Returns:
        ``(D, C, *new_size)`` in ``weight``'s dtype.
    """
    old_size = tuple(weight.shape[-2:])
    new_size = (int(new_size[0]), int(new_size[1]))
    if old_size == new_size:
        return weight
    n_old = old_size[0] * old_size[1]
    basis = torch.eye(n_old, dtype=torch.float32, device=weight.device).reshape(n_old, 1, *old_size)
    resized = F.interpolate(basis, size=new_size, mode="bicubic", antialias=True, align_corners=False)
    resize = resized.reshape(n_old, -1)  # (old pixels, new pixels) = R^T: row i is basis pixel i, resized
    pinv = torch.linalg.pinv(resize)  # (new pixels, old pixels)
    d, c = weight.shape[:2]
    out = weight.reshape(d, c, n_old).float() @ pinv.T  # (D, C, new pixels)
    return out.reshape(d, c, *new_size).to(weight.dtype)


def adapt_input_channels(weight: Tensor, in_chans: int) -> Tensor:
    """Fit the patch-embedding kernel ``(D, C, p, p)`` to ``in_chans`` input channels.

    RGB to 1 channel sums the kernel over the colours: on a gray image fed as three equal channels the
    RGB model computes exactly ``sum_c w_c * x``, so the summed kernel sees a gray image as the pretrained
    model saw its gray version (timm's ``adapt_input_conv`` does the same). 1 channel to C repeats the kernel
    divided by C: a gray image repeated C times then gives the same output.

    Raises:
        ValueError: Any other pair of channel counts.
    """
    c = weight.shape[1]
    if c == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)  # (D, 1, p, p)
    if c == 1:
        return weight.expand(-1, in_chans, -1, -1) / in_chans  # (D, C, p, p)
    raise ValueError(f"patch_embed.proj.weight: the checkpoint takes {c} input channels, the model {in_chans}; "
                     "only 3 -> 1 (summed) and 1 -> C (repeated) can be converted")


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _depth(state: Mapping[str, Tensor]) -> int | None:
    ids = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return max(ids) + 1 if ids else None


def adapt_state_dict(state_dict: Mapping[str, Tensor], model: DeiT) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Fit DeiT or ViT weights (ours, timm's, facebookresearch/deit's) to ``model``.

    What is adapted, and how:

    * patch grid (image size): ``pos_embed`` resampled by :func:`resample_pos_embed` (bicubic; the prefix tokens'
      slots are kept exactly);
    * patch size: the kernel resampled by :func:`resample_patch_embed` (FlexiViT PI-resize), the grid as above;
    * input channels 3 -> 1 or 1 -> C: :func:`adapt_input_channels`;
    * one prefix token (a plain ViT/DeiT) into a distilled model: ``dist_token`` and its position slot are copies of
      the class token's, and ``head_dist`` a copy of ``head`` (when the class count is kept). The two tokens then stay
      equal through every block, so from the first step the distillation head predicts what the pretrained class
      head predicts, and the two heads' different targets (labels vs teacher) make them diverge as they train; DeiT
      reports the trained tokens end up close anyway (cosine 0.93 at the output). The start is not exactly the
      checkpoint's function: every query sees the class token's key twice, which raises its attention weight ``a``
      to ``2a / (1 + a)``. A fresh random token (DeiT's init) would perturb every block's attention by an arbitrary
      amount instead, and its head would start from nothing;
    * a distilled checkpoint into a class-token-only model: ``dist_token``, its position slot and ``head_dist``
      are dropped;
    * another class count, or no head in the file (a feature-only checkpoint): ``head``/``head_dist`` are new. They
      keep the values ``model`` was built with (DeiT's init: truncated normal std 0.02, bias 0, drawn from the
      build seed), so call this on a freshly built model;
    * ``pre_logits.*`` (the representation layer of old ViT checkpoints, unused by DeiT) is dropped, as timm does.

    Other differences cannot be adapted and are errors naming the key and both shapes: ``embed_dim``, ``depth``,
    ``mlp_ratio``, ``qkv_bias``. ``num_heads`` leaves no trace in the weights (``qkv`` is ``(3D, D)`` for any head
    count), so it is checked only by :func:`load_pretrained_deit` against our own checkpoints' saved config.

    Args:
        state_dict: Weights with timm's key names (wrapper prefixes already removed).
        model: The model the weights are for.

    Returns:
        ``(state, report)``: a new dict that ``model.load_state_dict(state)`` accepts when the architectures agree
        (entries not adapted are shared, not copied), and ``report`` with ``resampled`` (``{key: "old -> new
        shape"}``), ``converted`` (channels), ``copied`` (``{target: source}``), ``dropped`` and ``reinitialised``
        (key lists).

    Raises:
        ValueError: Another embed_dim or depth, an unconvertible channel count, or a ``pos_embed`` without one slot
            per prefix token plus a square patch grid.
    """
    state = dict(state_dict)
    own = model.state_dict()
    report: dict[str, Any] = {"resampled": {}, "converted": {}, "copied": {}, "dropped": [], "reinitialised": []}
    for key in ("cls_token", "pos_embed", "norm.weight"):
        if key in state and state[key].shape[-1] != model.embed_dim:
            raise ValueError(f"{key}: the checkpoint has shape {_shape(state[key])}, the model {_shape(own[key])}: "
                             f"the checkpoint's embed_dim is {state[key].shape[-1]}, the model's {model.embed_dim}; "
                             "build the student with the checkpoint's embed_dim (and its depth and num_heads)")
    depth = _depth(state)
    if depth is not None and depth != model.config.depth:
        raise ValueError(f"blocks: the checkpoint has {depth} blocks (blocks.0 ... blocks.{depth - 1}), the model "
                         f"{model.config.depth}; build the student with depth={depth}")

    key = "patch_embed.proj.weight"
    if key in state:
        weight = state[key]
        if weight.shape[2:] != own[key].shape[2:]:
            weight = resample_patch_embed(weight, own[key].shape[2:])
            report["resampled"][key] = f"{_shape(state[key])} -> {_shape(weight)}"
        if weight.shape[1] != own[key].shape[1]:
            converted = adapt_input_channels(weight, own[key].shape[1])
            report["converted"][key] = f"{weight.shape[1]} -> {converted.shape[1]} input channels"
            weight = converted
        state[key] = weight

    src_prefix = 2 if "dist_token" in state else 1
    if "pos_embed" in state:
        pos = state["pos_embed"]
        try:
            resampled = resample_pos_embed(pos, model.grid_size, src_prefix)  # (1, P + rows*cols, D)
        except ValueError as err:
            raise ValueError(f"pos_embed {_shape(pos)}: {err} (only layouts with one position slot per prefix "
                             "token, as DeiT and timm's default ViT, can be loaded)") from None
        if resampled is not pos:
            report["resampled"]["pos_embed"] = f"{_shape(pos)} -> {_shape(resampled)}"
        if src_prefix == 1 and model.distilled:
            resampled = torch.cat([resampled[:, :1], resampled[:, :1], resampled[:, 1:]], dim=1)  # cls slot twice
            report["copied"]["pos_embed[:, 1]"] = "pos_embed[:, 0]"
        elif src_prefix == 2 and not model.distilled:
            resampled = torch.cat([resampled[:, :1], resampled[:, 2:]], dim=1)  # without the dist slot
            report["dropped"].append("pos_embed[:, 1]")
        state["pos_embed"] = resampled
    if model.distilled and src_prefix == 1 and "cls_token" in state:
        state["dist_token"] = state["cls_token"].clone()
        report["copied"]["dist_token"] = "cls_token"

    heads = [k for k in own if k.startswith(("head.", "head_dist."))]
    if "head.weight" not in state or state["head.weight"].shape[0] != model.num_classes:
        state.update({k: own[k] for k in heads})  # the model's own initialisation
        report["reinitialised"] = heads
    elif model.distilled and "head_dist.weight" not in state:
        state.update({k.replace("head.", "head_dist.", 1): state[k] for k in ("head.weight", "head.bias")})
        report["copied"].update({"head_dist.weight": "head.weight", "head_dist.bias": "head.bias"})
    for k in [k for k in state if k not in own and k.startswith(("dist_token", "head_dist.", "pre_logits."))]:
        del state[k]
        report["dropped"].append(k)
    return state, report


def load_pretrained_deit(model: DeiT, source: str | Path | Mapping[str, Tensor]) -> dict[str, Any]:
    """Start ``model`` (distilled, or the baseline's class-token-only variant) from pretrained DeiT/ViT weights.

    Accepts the official facebookresearch/deit ``.pth`` files (``{"model": state_dict}``), timm's safetensors
    (``VisionTransformerDistilled`` or ``VisionTransformer``, e.g. ``deit_tiny_distilled_patch16_224``,
    ``deit_small_patch16_224``, ``vit_tiny_patch16_224``), and our own student checkpoints; wrappings and prefixes as
    in :mod:`distill.weights`. The weights are fitted by :func:`adapt_state_dict` (image and patch size, channels,
    prefix tokens, class count), then every tensor of the model must be loaded.

    Args:
        model: A freshly built :class:`DeiT` (new heads keep its initialisation).
        source: A weights file (``.safetensors`` or a torch file, read with ``weights_only=True``) or a state dict.

    Returns:
        ``adapt_state_dict``'s report plus ``source`` and ``prefixes_removed``, for logging.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Unreadable file, or weights of another architecture; the message names the file, the key and
            both shapes (or both ``num_heads``).
    """
    where = "state dict" if isinstance(source, Mapping) else str(source)
    own = model.state_dict()
    state, removed = strip_wrapper_prefixes(source if isinstance(source, Mapping) else load_weights_file(source), own)
    try:
        saved = None if isinstance(source, Mapping) else _saved_config(source)
        if saved and "num_heads" in saved and saved["num_heads"] != model.config.num_heads:
            raise ValueError(f"the checkpoint was saved with num_heads={saved['num_heads']}, the model has "
                             f"{model.config.num_heads}; build the student with num_heads={saved['num_heads']}")
        state, report = adapt_state_dict(state, model)
        diff = diff_state(state, own)
        if not diff.ok:
            raise ValueError(f"{diff.describe()}; the checkpoint is another architecture (mlp_ratio, qkv_bias or "
                             "a model other than DeiT/ViT?)")
    except ValueError as err:
        raise ValueError(f"cannot start the student from {where}: {err}") from None
    model.load_state_dict(state, strict=True)
    return {"source": where, "prefixes_removed": removed, **report}

def _saved_config(path: str | Path) -> dict[str, Any] | None:
    """The model config saved in one of our own checkpoints (:mod:`distill.checkpoint`), or None for another file."""
    if Path(path).suffix != ".safetensors":
        return None
    try:
        return read_metadata(path)["config"]
    except CheckpointError:  # a safetensors file of someone else's: no config of ours
        return None
