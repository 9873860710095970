"""CNN teachers.

DeiT (Touvron et al. 2021, Table 2) found that a convnet teacher gives a better transformer
student than a transformer teacher of the same accuracy, most likely through the inductive bias
it passes on. Two kinds are offered:

* ``resnet_small``: a CIFAR-style ResNet (He et al. 2016) for 8-64 px images: a 3x3 stem, three
  stages of BasicBlocks at widths ``w, 2w, 4w`` with strides 1, 2, 2, global pooling, a linear head.
* any torchvision classification model by name (``resnet18``, ``convnext_tiny``, ...), built with
  ``num_classes`` set and no downloaded weights; local weights can be loaded from a file.

A teacher used for distillation is frozen with :func:`freeze`: ``eval()`` and no gradients. It is
never part of what ``accelerate.prepare`` wraps, so DDP never syncs it and ``student.train()``
never flips its BatchNorm back to training mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ResNetSmall", "build_teacher", "freeze", "load_weights_file", "TEACHER_ARCHS"]

TEACHER_ARCHS = ("resnet_small",)  # plus every name in torchvision.models.list_models(module=torchvision.models)


class BasicBlock(nn.Module):
    def __init__(self, *, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

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
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, in_ch = [], width
        for i, mult in enumerate((1, 2, 4)):
            out_ch = width * mult
            layers = [BasicBlock(in_ch=in_ch if j == 0 else out_ch, out_ch=out_ch, stride=(1 if i == 0 else 2) if j == 0 else 1)
                      for j in range(blocks)]
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
    """Lets a 3-channel torchvision model take 1-channel images by repeating the channel."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


def build_teacher(arch: str, *, num_classes: int, in_chans: int = 3, width: int = 32, blocks: int = 2) -> nn.Module:
    """Build an untrained teacher.

    Args:
        arch: ``'resnet_small'`` or a torchvision classification model name.
        num_classes: output classes.
        in_chans: input channels.
        width: base width (``resnet_small`` only).
        blocks: blocks per stage (``resnet_small`` only).

    Raises:
        ValueError: unknown architecture, listing the valid names.
    """
    if arch == "resnet_small":
        return ResNetSmall(num_classes=num_classes, in_chans=in_chans, width=width, blocks=blocks)
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ValueError(f"unknown teacher arch {arch!r}; use 'resnet_small' or a torchvision classification model: "
                         f"{', '.join(sorted(names))}")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    return _GrayToRGB(model) if in_chans == 1 else model


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is corrupt or not a state dict (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file not found: {path} (set teacher.pretrained_path to an existing file or null)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure means a bad file
        raise ValueError(f"cannot read weights from {path}: {err}. Re-export them with torch.save(model.state_dict()) "
                         "or safetensors.") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def load_pretrained(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load local weights into ``model``; classifier tensors whose shape differs are skipped (fine-tuning).

    Returns:
        ``{"skipped": [...], "missing": [...]}`` for logging.
    """
    state = load_weights_file(path)
    target = model.model if isinstance(model, _GrayToRGB) else model
    own = target.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(kept))
    result = target.load_state_dict(kept, strict=False)
    if len(kept) == 0:
        raise ValueError(f"{path}: none of its tensors match teacher {type(target).__name__}; wrong architecture?")
    return {"skipped": skipped, "missing": sorted(result.missing_keys)}


def freeze(model: nn.Module) -> nn.Module:
    """Put a teacher in inference mode for good: ``eval()`` and ``requires_grad_(False)``."""
    model.eval()
    model.requires_grad_(False)
    return model
