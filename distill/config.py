"""Typed, validated pipeline parameters (``params.yaml``).

``params.yaml`` is the single source of every hyperparameter, grouped by stage. It is loaded into
the pydantic models below, which forbid unknown keys and check types and ranges, so a typo fails
before any work with a message that names the key, the bad value and what is allowed.

Runtime flags that depend on the machine (precision, CPU-only, number of processes) are *not*
parameters: they come from accelerate's config, the environment or the CLI, so the same
``params.yaml`` runs on a laptop and on a GPU cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ParamsError",
    "AugmentParams",
    "DataParams",
    "TrainParams",
    "TeacherParams",
    "SoftLabelParams",
    "StudentModelParams",
    "StudentParams",
    "BaselineParams",
    "EvaluateParams",
    "Params",
    "load_params",
    "parse_params",
    "apply_overrides",
    "STAGES",
    "Paths",
]

# The pipeline's stages, in order (dvc.yaml holds the graph), each with its group in params.yaml.
STAGES = ("data", "teacher", "soft_labels", "student", "baseline", "evaluate")


@dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes, relative to the project root (mirrors ``dvc.yaml``)."""

    root: Path = Path(".")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def data(self) -> Path:
        return self.root / "data" / "prepared"

    def model(self, name: str) -> Path:
        return self.root / "models" / f"{name}.safetensors"

    @property
    def soft_labels(self) -> Path:
        return self.root / "soft_labels"

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    def curves(self, stage: str) -> Path:
        return self.root / "plots" / f"{stage}.csv"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def state(self, stage: str, key: str) -> Path:
        """Resume state: outside every DVC output, so ``dvc repro`` does not delete it before a rerun."""
        return self.root / ".state" / stage / key


class ParamsError(ValueError):
    """Raised when ``params.yaml`` has an unknown key, a wrong type or an out-of-range value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class AugmentParams(_Strict):
    """Random-resized-crop (+ optional flip) applied to training images, replayable from its parameters."""

    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: bool = False

    @model_validator(mode="after")
    def _check(self) -> "AugmentParams":
        lo, hi = self.scale
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        rlo, rhi = self.ratio
        if not (0.0 < rlo <= rhi):
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio}")
        return self


class DataParams(_Strict):
    name: Literal["digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder"] = "digits"
    root: Optional[str] = Field(default=None, description="dataset root for torchvision datasets / imagefolder")
    download: bool = False
    image_size: int = Field(default=16, ge=4, le=1024)
    val_fraction: float = Field(default=0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(default=0.2, gt=0.0, lt=0.5)
    max_per_class: Optional[int] = Field(default=None, ge=1)
    unlabeled: bool = Field(default=False, description="keep the training images above max_per_class, without "
                            "their labels, as an unlabeled transfer set: only the distilled student learns from them")
    augment: AugmentParams = AugmentParams()

    @model_validator(mode="after")
    def _check_root(self) -> "DataParams":
        if self.name == "imagefolder" and not self.root:
            raise ValueError("data.root is required when data.name is 'imagefolder' (root/<class>/<images>)")
        if self.unlabeled and self.max_per_class is None:
            raise ValueError("data.unlabeled keeps the training images above data.max_per_class as an unlabeled "
                             "transfer set; set data.max_per_class (e.g. 50) or data.unlabeled: false")
        return self


class TrainParams(_Strict):
    """One training recipe, shared by teacher, baseline and student (the one engine reads it)."""

    epochs: int = Field(default=30, ge=1, le=10_000)
    batch_size: int = Field(default=64, ge=1, description="per process")
    lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="peak learning rate at this batch size on one process")
    min_lr: float = Field(default=1e-5, ge=0.0)
    weight_decay: float = Field(default=0.05, ge=0.0, le=1.0)
    warmup_epochs: int = Field(default=5, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0.0, lt=1.0)
    grad_clip: Optional[float] = Field(default=1.0, gt=0.0)
    grad_accum: int = Field(default=1, ge=1)
    scale_lr: bool = Field(default=True, description="scale lr linearly with processes x grad_accum")
    mixup: float = Field(default=0.0, ge=0.0, le=10.0,
                         description="mixup of training views: weights drawn from Beta(mixup, mixup); 0 = off")

    @model_validator(mode="after")
    def _check(self) -> "TrainParams":
        if self.warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


class TeacherParams(_Strict):
    arch: str = Field(default="resnet_small", description="'resnet_small' or any torchvision classification model name")
    width: int = Field(default=32, ge=4, le=512, description="base width of resnet_small")
    blocks: int = Field(default=2, ge=1, le=8, description="BasicBlocks per stage of resnet_small")
    pretrained_path: Optional[str] = None
    train: TrainParams = TrainParams(lr=2e-3, weight_decay=5e-4, warmup_epochs=2)


class SoftLabelParams(_Strict):
    views: int = Field(default=8, ge=1, le=1024, description="augmented views stored per training image (K)")
    topk: Optional[int] = Field(default=None, ge=1, description="store only the top-k logits per view")
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = Field(default=256, ge=1)


class StudentModelParams(_Strict):
    preset: str = "deit_micro"
    patch_size: Optional[int] = Field(default=None, ge=1)
    embed_dim: Optional[int] = Field(default=None, ge=8)
    depth: Optional[int] = Field(default=None, ge=1)
    num_heads: Optional[int] = Field(default=None, ge=1)
    mlp_ratio: Optional[float] = Field(default=None, gt=0.0)
    drop_path_rate: float = Field(default=0.1, ge=0.0, lt=1.0)
    drop_rate: float = Field(default=0.0, ge=0.0, lt=1.0)

    def overrides(self) -> dict[str, Any]:
        """Config fields to override on the preset (None means: keep the preset's value)."""
        keys = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "drop_path_rate", "drop_rate")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class StudentParams(_Strict):
    model: StudentModelParams = StudentModelParams()
    train: TrainParams = TrainParams()
    distillation: Literal["none", "soft", "hard"] = "hard"
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    tau: float = Field(default=1.0, gt=0.0, le=100.0)
    teacher_mode: Literal["stored", "online"] = "stored"


class BaselineParams(_Strict):
    """The same student, same recipe and budget (``student.model`` / ``student.train``), labels only."""

    dist_token: bool = Field(
        default=False,
        description="False: class token only (DeiT 'no distillation'); True: keep both tokens, both heads on labels",
    )
    budget: Literal["steps", "epochs"] = Field(
        default="steps",
        description="steps: as many optimizer steps as the student (when the student also trains on unlabeled "
                    "images, the baseline's epochs and warm-up are scaled up); epochs: the same number of epochs",
    )


class EvaluateParams(_Strict):
    batch_size: int = Field(default=256, ge=1)
    ece_bins: int = Field(default=15, ge=2, le=100)
    throughput_batch_size: int = Field(default=64, ge=1)
    throughput_iters: int = Field(default=20, ge=1)
    register_model: bool = True
    model_name: str = Field(default="deit-student", min_length=1)


class Params(_Strict):
    seed: int = Field(default=0, ge=0)
    data: DataParams = DataParams()
    teacher: TeacherParams = TeacherParams()
    soft_labels: SoftLabelParams = SoftLabelParams()
    student: StudentParams = StudentParams()
    baseline: BaselineParams = BaselineParams()
    evaluate: EvaluateParams = EvaluateParams()


def _format_errors(err: ValidationError, raw: dict[str, Any], source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            allowed = _allowed_keys(parent)
            lines.append(f"  - {loc}: unknown key; allowed keys here: {', '.join(allowed)}")
            continue
        value = _lookup(raw, e["loc"])
        shown = "" if value is _MISSING else f" = {value!r}"
        lines.append(f"  - {loc}{shown}: {e['msg']}")
    return "\n".join(lines)


_MISSING = object()


def _lookup(raw: Any, loc: tuple) -> Any:
    cur = raw
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, (list, tuple)) and isinstance(part, int) and part < len(cur):
            cur = cur[part]
        else:
            return _MISSING
    return cur


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def parse_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a params mapping.

    Args:
        raw: the mapping read from YAML (``None`` means all defaults).
        source: name of where it came from, used in error messages.

    Returns:
        The validated, frozen :class:`Params`.

    Raises:
        ParamsError: naming every bad key, its value and what is allowed.
    """
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of stage name to parameters, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, raw, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate ``params.yaml``.

    Raises:
        ParamsError: file missing, not YAML, or invalid values (message names the key).
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, source=str(path))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (DVC's ``-S`` syntax; values parsed as YAML) to a params mapping.

    Args:
        raw: params as read from YAML (not modified).
        overrides: e.g. ``["student.alpha=0.7", "data.augment.scale=[0.2, 1.0]"]``.

    Returns:
        A new mapping; validate it with :func:`parse_params`, which names any unknown key.

    Raises:
        ParamsError: an override without ``=``, or one that descends into a non-mapping value.
    """
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r} is not of the form key.path=value")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {item!r}: {part} is not a group of parameters")
        node[leaf] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m distill.config [params.yaml] [--stamp FILE]``: validate, print the error and exit 2 if bad.

    The pipeline's first DVC stage: DVC deletes a stage's outputs before running its command, so params must be
    checked in a stage that runs before every other one, or a typo would cost the outputs of the stage it
    reaches. ``--stamp`` writes a file whose content never changes, so a valid edit reruns nothing by itself.
    """
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m distill.config", description="Validate params.yaml.")
    ap.add_argument("params", nargs="?", default="params.yaml")
    ap.add_argument("--stamp", default=None, help="write this file when the params are valid (a DVC output)")
    args = ap.parse_args(argv)
    try:
        load_params(args.params)
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.stamp:
        Path(args.stamp).write_text("params valid\n")
    print(f"{args.params}: valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
