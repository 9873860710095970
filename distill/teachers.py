"""CNN teachers: built here, trained by the pipeline, or trained elsewhere and used as they are.

DeiT (Touvron et al. 2021, Table 2) found that a convnet teacher gives a better transformer
student than a transformer teacher of the same accuracy, most likely through the inductive bias
it passes on. Three kinds of architecture (``teacher.arch``):

* ``resnet_small``: a CIFAR-style ResNet (He et al. 2016) for 8-64 px images: a 3x3 stem, three
  stages of BasicBlocks at widths ``w, 2w, 4w`` with strides 1, 2, 2, global pooling, a linear head.
* any torchvision classification model by name (``resnet18``, ``convnext_tiny``, ...);
* any timm model as ``timm/<name>`` (``timm/resnet18``, ``timm/convnext_atto``, ``timm/resnet18.a1_in1k``).
  timm is imported only when such a name is used (it is an optional dependency: ``pip install timm``).

All are built with ``num_classes`` set and never download weights; the trained teacher is rebuilt from its
checkpoint by :func:`load_teacher` (which imports no student code). Weights trained elsewhere come from a
local file (:func:`load_teacher_weights`, reading through :mod:`distill.weights`) in one of two modes:

* fine-tuning (``teacher.train.epochs >= 1``, ``strict=False``): every tensor that fits is loaded; a
  classifier of another class count keeps the freshly built model's initialisation and is trained;
* used as it is (``teacher.train.epochs: 0``, ``strict=True``): every tensor must load, including a head
  with the dataset's class count, or the error names the file, the keys, the shapes and what to do.

A teacher trained elsewhere expects its own input normalisation and size; :class:`InputAdapter` turns the
pipeline's input (normalised with the dataset's mean/std at ``data.image_size``) into exactly that.

1-channel data with a 3-channel torchvision or timm model goes through :class:`_GrayToRGB` (the channel is
repeated), so the model keeps its 3-channel stem and 3-channel pretrained weights load unchanged. timm's
``in_chans=1`` is not used: it would change the stem's shape and no RGB checkpoint would load strictly.

A teacher used for distillation is frozen where it labels views (:func:`distill.views.freeze`: ``eval()`` and no
gradients). It is never part of what ``accelerate.prepare`` wraps, so DDP never syncs it and ``student.train()``
never flips its BatchNorm back to training mode.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.checkpoint import load_checkpoint
from distill.data import DatasetMeta
from distill.weights import diff_state, format_keys, load_weights_file, strip_wrapper_prefixes

__all__ = ["TEACHER_ARCHS", "TIMM_PREFIX", "InputAdapter", "ResNetSmall", "build_teacher", "check_arch",
           "check_input_size", "load_teacher", "load_teacher_weights"]

TEACHER_ARCHS = ("resnet_small",)  # plus every torchvision classification model name, plus "timm/<any timm model>"
TIMM_PREFIX = "timm/"


class BasicBlock(nn.Module):
    def __init__(self, *, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A CIFAR-style ResNet sized for small images on a CPU.

    Args:
        num_classes: output classes.
        in_chans: input channels (1 for digits/MNIST, 3 for CIFAR).
        width: channels of the first stage (then 2x, 4x).
        blocks: BasicBlocks per stage (2 gives a ResNet-14-like net).
    """

    def __init__(self, *, num_classes: int, in_chans: int = 3, width: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages, in_ch = [], width
        for i, mult in enumerate((1, 2, 4)):
            out_ch = width * mult
            layers = [BasicBlock(in_ch=in_ch if j == 0 else out_ch, out_ch=out_ch,
                                 stride=(1 if i == 0 else 2) if j == 0 else 1) for j in range(blocks)]
            stages.append(nn.Sequential(*layers))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: every block starts as identity (Goyal et al. 2017).
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))  # (B, 4w, H/4, W/4)
        return self.fc(torch.flatten(self.pool(x), 1))


class _GrayToRGB(nn.Module):
    """Lets a 3-channel torchvision or timm model take 1-channel images by repeating the channel."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


def _stats(values: Sequence[float], name: str, *, positive: bool = False) -> Tensor:
    t = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    if t.ndim != 1 or len(t) == 0 or (positive and (t <= 0).any()):
        raise ValueError(f"{name} must be a non-empty list of {'positive ' if positive else ''}numbers, got "
                         f"{list(values)!r}")
    return t.view(1, -1, 1, 1)  # (1, C, 1, 1): broadcasts over (B, C, H, W)


class InputAdapter(nn.Module):
    """Show a teacher trained elsewhere exactly the input it was trained on.

    The pipeline feeds images normalised with the dataset's mean/std at ``data.image_size``. This module maps
    them back to ``[0, 1]`` pixels, resizes them to ``size`` (bilinear, antialiased: the usual way a pretrained
    model's inputs are resized) and normalises them with the teacher's own mean/std. With 1-channel data and
    3-channel teacher statistics, broadcasting yields 3 channels.

    The statistics are non-persistent buffers: they move with ``.to(device)`` but stay out of the state dict,
    whose keys are the inner model's under ``model.``. They are rebuilt from the checkpoint's config
    (:func:`build_teacher` takes them), so the weights file holds weights only.

    Args:
        model: The teacher.
        data_mean: Per-channel mean the pipeline normalised with (the dataset's).
        data_std: Per-channel std the pipeline normalised with.
        mean: The teacher's own per-channel mean (e.g. ImageNet's); None keeps the dataset's.
        std: The teacher's own per-channel std; None keeps the dataset's.
        size: Input side (or ``(height, width)``) the teacher expects; None keeps the pipeline's size.
    """

    def __init__(self, model: nn.Module, *, data_mean: Sequence[float], data_std: Sequence[float],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 size: int | Sequence[int] | None = None) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give the teacher's mean and std together (both null means the dataset's own)")
        self.model = model
        self.register_buffer("data_mean", _stats(data_mean, "data mean"), persistent=False)
        self.register_buffer("data_std", _stats(data_std, "data std", positive=True), persistent=False)
        self.register_buffer("mean", _stats(data_mean if mean is None else mean, "teacher mean"), persistent=False)
        self.register_buffer("std", _stats(data_std if std is None else std, "teacher std", positive=True),
                             persistent=False)
        if size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
                raise ValueError(f"teacher input size must be a positive int or (height, width), got {size!r}")
        self.size: tuple[int, int] | None = size

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.data_std + self.data_mean  # (B, C, H, W) pixels in [0, 1]
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return self.model((x - self.mean) / self.std)  # the teacher's own normalisation

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, size={self.size}"


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        return None
    return timm


def check_arch(arch: str) -> None:
    """Check that ``teacher.arch`` names an architecture, against the registry the name comes from.

    ``resnet_small``; a torchvision classification model (``torchvision.models.list_models``); ``timm/<name>``, a
    name timm knows (``timm.is_model``, pretrained tags included).

    Raises:
        ValueError: an unknown name, with the closest names (and ``timm/<name>`` when only timm has it).
        ImportError: a ``timm/`` name without timm installed.
    """
    if arch in TEACHER_ARCHS:
        return
    timm = _timm()
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX):]
        if timm is None:
            raise ImportError(f"teacher arch {arch} needs timm, which is not installed: pip install timm")
        if not timm.is_model(name):
            close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=8)
            raise ValueError(f"unknown timm model {name!r} in teacher arch {arch}"
                             + (f"; close names: {', '.join(close)}" if close else "; see timm.list_models()"))
        return
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        if timm is not None and timm.is_model(arch):
            hint = f" (timm has a model of that name: teacher.arch: {TIMM_PREFIX}{arch})"
        else:
            close = difflib.get_close_matches(arch, [*TEACHER_ARCHS, *names], n=3)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown teacher arch {arch!r}{hint}; use 'resnet_small', a torchvision classification "
                         f"model ({', '.join(sorted(names))}), or a timm model as '{TIMM_PREFIX}<name>'")


def check_input_size(arch: str, size: int) -> None:
    """Check that a torchvision or timm teacher takes ``size``-px images: one forward pass on PyTorch's meta
    device (shapes only: no memory, no arithmetic), so a ViT made for 224 px, or a convnet whose kernels outgrow
    the image, is found before any stage runs. ``resnet_small`` takes any size; a model that cannot be built or
    run on the meta device is not checked (the stage finds out).

    Raises:
        ValueError: the model rejects the size (its own message, and what to set).
    """
    if arch in TEACHER_ARCHS:
        return
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = _core_model(arch, num_classes=2).eval()
    except Exception:  # noqa: BLE001 - some constructors compute on tensors, which the meta device cannot
        return
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device="meta"))
    except NotImplementedError:
        return
    except Exception as err:  # noqa: BLE001 - any failure of the forward pass is the model refusing the shape
        if "meta" in str(err).lower():  # the meta device, not the shape
            return
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"teacher arch {arch!r} cannot take {size}-px images ({first}); set teacher.input_size to "
                         "a size it takes (e.g. 224: the pipeline's images are resized for the teacher), or change "
                         "data.image_size") from None


def _core_model(arch: str, *, num_classes: int) -> nn.Module:
    """The torchvision or timm model ``arch`` (checked by :func:`check_arch`), with fresh weights."""
    check_arch(arch)
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX):]
        try:
            return _timm().create_model(name, pretrained=False, num_classes=num_classes)
        except (RuntimeError, ValueError) as err:  # e.g. an unknown pretrained tag
            raise ValueError(f"cannot build timm model {name!r} (teacher arch {arch}): {err}") from None
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def build_teacher(arch: str, *, num_classes: int, in_chans: int = 3, width: int = 32, blocks: int = 2,
                  input: Mapping[str, Any] | None = None) -> nn.Module:  # `input`: the checkpoint config's key
    """Build an untrained teacher (no weights are ever downloaded).

    Args:
        arch: ``'resnet_small'``, a torchvision classification model name, or ``'timm/<name>'``.
        num_classes: Output classes.
        in_chans: Input channels of the data; 1 with a torchvision/timm model adds :class:`_GrayToRGB`.
        width: Base width (``resnet_small`` only).
        blocks: Blocks per stage (``resnet_small`` only).
        input: For a teacher trained elsewhere, the :class:`InputAdapter` keywords: ``data_mean``, ``data_std``
            (the dataset's), ``mean``, ``std`` (``teacher.mean``/``std``), ``size`` (``teacher.input_size``).
            None: the teacher takes the pipeline's input as it is.

    Returns:
        The model, wrapped in :class:`InputAdapter` when ``input`` is given. Saving this function's keyword
        arguments as the checkpoint config rebuilds the same module tree.

    Raises:
        ValueError: Unknown architecture (listing valid or similar names), or statistics that do not fit.
        ImportError: A ``timm/`` architecture without timm installed.
    """
    if arch == "resnet_small":
        model: nn.Module = ResNetSmall(num_classes=num_classes, in_chans=in_chans, width=width, blocks=blocks)
    else:
        model = _core_model(arch, num_classes=num_classes)
        if in_chans == 1:
            model = _GrayToRGB(model)
    if input is None:
        return model
    keys, required = set(input), {"data_mean", "data_std"}
    if not required <= keys <= required | {"mean", "std", "size"}:
        raise ValueError(f"teacher input adapter keys {sorted(keys)}: data_mean and data_std are required, mean, std "
                         "and size optional")
    data_mean, mean = input["data_mean"], input.get("mean")
    if len(data_mean) != in_chans or (mean is not None and len(mean) not in (1, 3, in_chans)):
        raise ValueError(f"teacher input statistics do not fit {in_chans}-channel data: data mean {data_mean}, "
                         f"teacher mean {mean}")
    return InputAdapter(model, **input)


def _core(model: nn.Module) -> nn.Module:
    """The network inside the :class:`InputAdapter`/:class:`_GrayToRGB` wrappers (what weight files describe)."""
    while isinstance(model, (InputAdapter, _GrayToRGB)):
        model = model.model
    return model


def _classifier_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the classifier: timm's ``get_classifier()``, else the last Linear layer."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
        head = next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)
    if head is None:
        return []
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in head.parameters() if id(p) in names]


def load_teacher_weights(model: nn.Module, path: str | Path, *, strict: bool) -> dict[str, Any]:
    """Load a local weights file into a teacher from :func:`build_teacher` (wrappers included).

    Args:
        model: The teacher.
        path: ``.safetensors`` or torch file (``torch.load(weights_only=True)``); the wrappings listed in
            :mod:`distill.weights` are accepted.
        strict: True for a teacher used as it is (``teacher.train.epochs: 0``): every tensor must load, the head
            included. False for fine-tuning: load what fits; a classifier of another shape keeps the model's
            fresh initialisation.

    Returns:
        A report for logging: ``path``, ``mode`` (``'as_is'`` or ``'fine_tune'``), ``loaded`` (tensor count),
        ``prefixes_removed``, ``skipped`` (file keys not loaded), ``missing`` (model keys not loaded) and
        ``reinitialised`` (classifier keys not loaded).

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Unreadable file; in strict mode any missing, extra or mismatched tensor; in fine-tuning mode
            no tensor that fits. The message names the file, the keys and shapes, and what to do.
    """
    target = _core(model)
    own = target.state_dict()
    state, removed = strip_wrapper_prefixes(load_weights_file(path), own)
    diff = diff_state(state, own)
    head = _classifier_keys(target)
    name = type(target).__name__
    if strict and not diff.ok:
        hint = ("Is the file for another architecture? A teacher used as it is (teacher.train.epochs: 0) must match "
                "in every tensor; with teacher.train.epochs >= 1 what fits is loaded and the rest trained")
        out_dims = {k: (a[0], b[0]) for k, (a, b) in diff.mismatched.items() if k in head and a[1:] == b[1:]}
        if out_dims and set(diff.mismatched) == set(out_dims) and not diff.missing and not diff.unexpected:
            (n_file, n_data), = set(out_dims.values())
            hint = (f"Its head ({format_keys(list(out_dims))}) has {n_file} outputs but the data has {n_data} "
                    "classes: fine-tune it with teacher.train.epochs >= 1 (the head is then re-initialised), or use "
                    f"weights whose head has {n_data} outputs")
        raise ValueError(f"{path} does not fit teacher {name} exactly: {diff.describe()}. {hint}")
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not kept:
        raise ValueError(f"{path}: none of its tensors fit teacher {name} ({diff.describe()}); is teacher.arch the "
                         "architecture the file was saved from?")
    target.load_state_dict(kept, strict=False)
    not_loaded = [k for k in own if k in diff.mismatched or k in diff.missing]  # the model's order
    return {"path": str(path), "mode": "as_is" if strict else "fine_tune", "loaded": len(kept),
            "prefixes_removed": removed, "skipped": sorted(set(state) - set(kept)), "missing": not_loaded,
            "reinitialised": [k for k in head if k in not_loaded]}


def load_teacher(path: str | Path, meta: DatasetMeta | None = None, *,
                 map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained teacher from its checkpoint alone (:func:`distill.checkpoint.load_checkpoint`).

    Args:
        path: the teacher's checkpoint (``models/teacher.safetensors``).
        meta: the data it is about to label: its class count must be the teacher's.
        map_location: where the weights are read to.

    Returns:
        ``(model, info)``; the model is in eval mode.

    Raises:
        CheckpointError: the file is missing or corrupt, or holds another kind of model.
        ValueError: a teacher of another class count than ``meta``'s (names both and the stage to rerun).
    """
    model, info = load_checkpoint(path, lambda config: build_teacher(**config), kind="teacher",
                                  map_location=map_location)
    n = info["config"].get("num_classes")
    if meta is not None and n != meta.num_classes:
        raise ValueError(f"teacher checkpoint {path} has {n} classes but dataset {meta.name!r} has "
                         f"{meta.num_classes}: retrain the teacher on this dataset (`dvc repro teacher`)")
    return model, info
