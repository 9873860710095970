"""Typed, validated pipeline parameters (``params.yaml``), and what each stage may read of them.

``params.yaml`` is the single source of every hyperparameter, grouped by stage. It is loaded into the
pydantic models below, which forbid unknown keys and check types and ranges, so a typo fails before any
work with a message that names the key, the bad value and what is allowed. The models hold **no defaults**:
every value comes from ``params.yaml``, so there is no second set of defaults that could contradict it
(a missing key is an error naming it).

What a stage reads is declared once, in ``dvc.yaml`` (``stages.<name>.params``): DVC reruns a stage when one
of those values changes. A stage receives its parameters as a :class:`ParamsView`, which lets it read only
the declared keys: reading anything else raises :class:`UndeclaredParamError`, naming the key and the stage,
so a stage can never depend on a value DVC does not watch. The view also records every key read, which
``tests/test_lineage.py`` compares with ``dvc.yaml``.

Runtime flags that depend on the machine (precision, CPU-only, number of processes) are *not* parameters:
they come from accelerate's config, the environment or the CLI, so the same ``params.yaml`` runs on a
laptop and on a GPU cluster.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ParamsError",
    "UndeclaredParamError",
    "AugmentParams",
    "DataParams",
    "TrainParams",
    "TeacherParams",
    "SoftLabelParams",
    "StudentModelParams",
    "StudentParams",
    "BaselineParams",
    "EvaluateParams",
    "ExportParams",
    "Params",
    "ParamsView",
    "load_params",
    "load_raw",
    "parse_params",
    "apply_overrides",
    "merge",
    "leaf_keys",
    "flatten",
    "declared_params",
    "dvc_stages",
    "declared_values",
    "Paths",
]


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

    def pretrained(self, role: str) -> Path:
        """Where pretrained weights for ``role`` (``teacher`` or ``student``) live: a DVC dependency of its stages."""
        return self.root / "models" / "pretrained" / role

    @property
    def served_model(self) -> Path:
        """The student as an MLflow model (pyfunc), written by the evaluate stage."""
        return self.root / "models" / "student_mlflow"

    def state(self, stage: str, key: str) -> Path:
        """Resume state: outside every DVC output, so ``dvc repro`` does not delete it before a rerun.

        ``DISTILL_STATE_DIR`` puts it elsewhere: a sweep's variant keeps it outside its ``dvc exp run --temp`` copy,
        which DVC deletes when the run fails, so that the variant's retry resumes (flows/sweep.py).
        """
        return Path(os.environ.get("DISTILL_STATE_DIR") or self.root / ".state") / stage / key


class ParamsError(ValueError):
    """Raised when ``params.yaml`` has an unknown or missing key, a wrong type or an out-of-range value."""


class UndeclaredParamError(LookupError):
    """A stage read a parameter that ``dvc.yaml`` does not list for it: DVC would not rerun it when it changes."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AugmentParams(_Strict):
    """Random-resized-crop (+ optional flip) applied to training images, replayable from its parameters."""

    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: bool

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
    name: Literal["digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder"]
    root: str = Field(min_length=1, description="folder of the raw data (a DVC dependency of the data stage)")
    download: bool
    image_size: int = Field(ge=4, le=1024)
    val_fraction: float = Field(gt=0.0, lt=0.5)
    test_fraction: float = Field(gt=0.0, lt=0.5)
    max_per_class: Optional[int] = Field(ge=1)
    pool_per_class: Optional[int] = Field(ge=1, description="training images per class used at all (seeded); the "
                                          "labeled ones (max_per_class) and the unlabeled split come from them")
    unlabeled: bool = Field(description="build the unlabeled transfer split: the training images above "
                            "max_per_class without their labels, and an image folder's root/unlabeled/")
    skip_bad_images: bool = Field(description="imagefolder: skip (and count) unreadable images instead of failing")
    augment: AugmentParams

    @model_validator(mode="after")
    def _check_unlabeled(self) -> "DataParams":
        if self.pool_per_class is not None and self.max_per_class is not None \
                and self.max_per_class > self.pool_per_class:
            raise ValueError(f"data.max_per_class ({self.max_per_class}) labeled images per class cannot come from a "
                             f"pool of data.pool_per_class ({self.pool_per_class}); raise the pool or lower the labels")
        if self.unlabeled and self.max_per_class is None and self.name != "imagefolder":
            raise ValueError("data.unlabeled keeps the training images above data.max_per_class as an unlabeled "
                             "transfer set; set data.max_per_class (e.g. 50) or data.unlabeled: false")
        return self


class TrainParams(_Strict):
    """One training recipe (the one engine reads it for teacher, baseline and student)."""

    epochs: int = Field(ge=0, le=10_000, description="0: the teacher only, used as it is (no training)")
    batch_size: int = Field(ge=1, description="per process")
    lr: float = Field(gt=0.0, le=1.0, description="peak learning rate at this batch size on one process")
    min_lr: float = Field(ge=0.0)
    weight_decay: float = Field(ge=0.0, le=1.0)
    warmup_epochs: int = Field(ge=0)
    label_smoothing: float = Field(ge=0.0, lt=1.0)
    grad_clip: Optional[float] = Field(gt=0.0)
    grad_accum: int = Field(ge=1)
    scale_lr: bool = Field(description="scale lr linearly with processes x grad_accum")
    mixup: float = Field(ge=0.0, le=10.0, description="mixup of training views, Beta(mixup, mixup); 0 = off")

    @model_validator(mode="after")
    def _check(self) -> "TrainParams":
        if self.epochs > 1 and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self


class TeacherParams(_Strict):
    arch: str = Field(min_length=1, description="'resnet_small', a torchvision model name, or 'timm/<name>'")
    width: int = Field(ge=4, le=512, description="base width of resnet_small")
    blocks: int = Field(ge=1, le=8, description="BasicBlocks per stage of resnet_small")
    pretrained_path: Optional[str] = Field(description="local weights file (.safetensors or a torch state dict)")
    mean: Optional[tuple[float, ...]] = Field(description="the teacher's own input normalisation; null: the data's")
    std: Optional[tuple[float, ...]]
    input_size: Optional[int] = Field(ge=4, le=1024, description="the teacher's input size; null: data.image_size")
    train: TrainParams

    @model_validator(mode="after")
    def _check(self) -> "TeacherParams":
        if self.train.epochs == 0 and not self.pretrained_path:
            raise ValueError("teacher.train.epochs: 0 uses a pretrained teacher exactly as it is; set "
                             "teacher.pretrained_path to its weights file, or train it (epochs >= 1)")
        if (self.mean is None) != (self.std is None):
            raise ValueError("set both teacher.mean and teacher.std (the teacher's own normalisation), or neither")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"teacher.mean has {len(self.mean)} values but teacher.std has {len(self.std)}")
        return self


class SoftLabelParams(_Strict):
    views: int = Field(ge=1, le=1024, description="augmented views stored per training image (K)")
    topk: Optional[int] = Field(ge=1, description="store only the top-k logits per view")
    dtype: Literal["float16", "float32"]
    batch_size: int = Field(ge=1)


class StudentModelParams(_Strict):
    preset: str = Field(min_length=1)
    patch_size: Optional[int] = Field(ge=1)
    embed_dim: Optional[int] = Field(ge=8)
    depth: Optional[int] = Field(ge=1)
    num_heads: Optional[int] = Field(ge=1)
    mlp_ratio: Optional[float] = Field(gt=0.0)
    drop_path_rate: float = Field(ge=0.0, lt=1.0)
    drop_rate: float = Field(ge=0.0, lt=1.0)
    pretrained_path: Optional[str] = Field(description="start student and baseline from a local DeiT/timm checkpoint")


class StudentParams(_Strict):
    model: StudentModelParams
    train: TrainParams
    distillation: Literal["none", "soft", "hard"]
    dist_token: bool = Field(description="True: DeiT's distillation token and head take the distillation term; "
                             "False: a class-token-only DeiT whose one head takes both terms (DeiT Table 3)")
    alpha: float = Field(ge=0.0, le=1.0)
    tau: float = Field(gt=0.0, le=100.0)
    teacher_mode: Literal["stored", "online"]

    @model_validator(mode="after")
    def _check(self) -> "StudentParams":
        if self.train.epochs < 1:
            raise ValueError("student.train.epochs must be at least 1")
        return self


class BaselineParams(_Strict):
    """The same student and recipe (``student.model`` / ``student.train``), labels only, with its own lr and wd."""

    dist_token: bool = Field(description="False: class token only (DeiT 'no distillation'); True: both tokens")
    budget: Literal["steps", "epochs"] = Field(
        description="steps: exactly the student's optimizer steps and warm-up steps; epochs: the same epochs")
    lr: Optional[float] = Field(gt=0.0, le=1.0, description="the baseline's own peak lr; null: the student's")
    weight_decay: Optional[float] = Field(ge=0.0, le=1.0, description="its own weight decay; null: the student's")


class EvaluateParams(_Strict):
    batch_size: int = Field(ge=1)
    ece_bins: int = Field(ge=2, le=100)
    throughput_batch_size: int = Field(ge=1)
    throughput_iters: int = Field(ge=1)
    throughput_rounds: int = Field(ge=1, le=100, description="interleaved speed rounds per model (median, spread)")
    register_model: bool
    model_name: str = Field(min_length=1)


class ExportParams(_Strict):
    """The student as ONNX and int8 ONNX (distill/export.py): opset, parity, timing, what the registry serves."""

    opset: int = Field(ge=18, description="ONNX opset, pinned (torch.onnx's dynamo exporter writes 18 and above)")
    max_prob_diff: float = Field(gt=0.0, le=0.01, description="parity: most |fp32 ONNX - PyTorch| of a probability")
    batch_size: int = Field(ge=1, description="images per call on the test split (parity, accuracy)")
    latency_batch_size: int = Field(ge=1, description="the throughput batch of the speed measurement")
    latency_iters: int = Field(ge=1, description="timed calls per runtime and round")
    latency_rounds: int = Field(ge=1, le=100, description="interleaved rounds (median, spread)")
    threads: Optional[int] = Field(ge=1, description="CPU threads of every runtime; null: torch's default")
    serve: Literal["fp32", "int8"] = Field(description="which ONNX model the registry serves")
    register_model: bool
    model_name: str = Field(min_length=1)


class Params(_Strict):
    seed: int = Field(ge=0)
    data: DataParams
    teacher: TeacherParams
    soft_labels: SoftLabelParams
    student: StudentParams
    baseline: BaselineParams
    evaluate: EvaluateParams
    export: ExportParams


# --------------------------------------------------------------------------------------------------
# What a stage may read
# --------------------------------------------------------------------------------------------------


def dvc_stages(dvc_yaml: str | Path) -> dict[str, dict[str, Any]]:
    """The stages of ``dvc.yaml`` as written: name -> entry (``cmd``, ``deps``, ``params``, ``outs``...), in order.

    The one reader of the stage graph: what each stage may read (:func:`declared_params`), which stages the pipeline
    runs (:func:`distill.stages.runner.pipeline_stages`), each stage's deps (:func:`distill.tracking.dvc_input_hashes`,
    ``scripts/rerun_matrix.py``).

    Raises:
        ParamsError: the file is missing, is not YAML, or has no ``stages`` mapping.
    """
    path = Path(dvc_yaml)
    try:
        stages = yaml.safe_load(path.read_text())["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise ParamsError(f"{path}: cannot read the stage graph ({type(err).__name__}: {err})") from None
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        raise ParamsError(f"{path}: cannot read the stage graph (`stages` is not a mapping of stage entries)")
    return stages


def declared_params(stage: str, dvc_yaml: str | Path) -> tuple[str, ...]:
    """The ``params.yaml`` keys ``dvc.yaml`` lists for ``stage`` (dotted; a group stands for all its keys).

    Raises:
        ParamsError: ``dvc.yaml`` is missing or has no such stage.
    """
    path = Path(dvc_yaml)
    spec = dvc_stages(path).get(stage)
    if spec is None:
        raise ParamsError(f"{path}: cannot read the params of stage {stage!r}: dvc.yaml has no such stage")
    keys: list[str] = []
    for entry in spec.get("params") or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):  # {params.yaml: [keys]}
            for file, listed in entry.items():
                if Path(file).name != "params.yaml":
                    raise ParamsError(f"{path}: stage {stage} reads params from {file}; only params.yaml is supported")
                keys.extend(listed or [])
    return tuple(keys)


def _covered(key: str, declared: tuple[str, ...]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


class ParamsView:
    """Read-only access to the parameters a stage declares in ``dvc.yaml``; records every key read.

    Attribute access mirrors :class:`Params` (``view.student.train.lr``). A group returns another view; a leaf
    returns its value if ``dvc.yaml`` declares it (or a group above it) for the stage, and raises
    :class:`UndeclaredParamError` otherwise. :meth:`resolve` returns a group's validated model (for the engine,
    which reads a whole recipe) and records all its keys.
    """

    __slots__ = ("_root", "_node", "_stage", "_declared", "_reads", "_prefix")

    def __init__(self, params: Params, *, stage: str, declared: tuple[str, ...], reads: Optional[set[str]] = None,
                 node: Optional[BaseModel] = None, prefix: str = "") -> None:
        object.__setattr__(self, "_root", params)
        object.__setattr__(self, "_node", params if node is None else node)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_declared", tuple(declared))
        object.__setattr__(self, "_reads", set() if reads is None else reads)
        object.__setattr__(self, "_prefix", prefix)

    @property
    def reads(self) -> set[str]:
        """Every leaf key read so far through this view or its sub-views (shared set)."""
        return self._reads

    @property
    def stage(self) -> str:
        return self._stage

    def declared(self) -> dict[str, Any]:
        """Everything the stage declares, as a nested dict (what it logs and what keys its resume state).

        Not counted as reads: a stage's lineage is what its code uses, not what it records.
        """
        return declared_values(self._root, self._declared)

    def _check(self, key: str) -> None:
        if not _covered(key, self._declared):
            raise UndeclaredParamError(
                f"stage {self._stage!r} read parameter {key!r}, which dvc.yaml does not list under "
                f"stages.{self._stage}.params (it lists: {', '.join(self._declared) or 'nothing'}). DVC would not "
                "rerun the stage when it changes: add it to dvc.yaml, or do not read it.")

    def __getattr__(self, name: str) -> Any:
        node = self._node
        if name.startswith("_") or name not in type(node).model_fields:
            raise AttributeError(f"{self._prefix}{name} is not a parameter")
        value = getattr(node, name)
        key = f"{self._prefix}{name}"
        if isinstance(value, BaseModel):
            return ParamsView(self._root, stage=self._stage, declared=self._declared, reads=self._reads, node=value,
                              prefix=key + ".")
        self._check(key)
        self._reads.add(key)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("parameters are read-only")

    def resolve(self) -> Any:
        """This group's validated model; every key in it counts as read (and must be declared)."""
        for key in leaf_keys(self._node, self._prefix):
            self._check(key)
            self._reads.add(key)
        return self._node

    def __repr__(self) -> str:
        return f"ParamsView(stage={self._stage!r}, prefix={self._prefix!r})"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A params model or nested mapping as dotted keys: ``{"a": {"b": 1}} -> {"a.b": 1}`` (MLflow params are flat)."""
    items = d.model_dump().items() if isinstance(d, BaseModel) else d.items()
    out: dict[str, Any] = {}
    for key, value in items:
        if isinstance(value, (dict, BaseModel)):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def leaf_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Dotted keys of every leaf of a params model or a nested mapping (``{"a": {"b": 1}} -> "a.b"``)."""
    return iter(flatten(node, prefix))


def declared_values(params: Params, declared: tuple[str, ...]) -> dict[str, Any]:
    """The declared part of ``params`` as a nested dict (what a stage logs, and what keys its resume state)."""
    raw = params.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key in declared:
        node, target = raw, out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
            target = target.setdefault(part, {})
        target[leaf] = copy.deepcopy(node[leaf])
    return out


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def _format_errors(err: ValidationError, raw: dict[str, Any], source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            allowed = _allowed_keys(parent)
            lines.append(f"  - {loc}: unknown key; allowed keys here: {', '.join(allowed)}")
            continue
        if e["type"] == "missing":
            lines.append(f"  - {loc}: missing; every parameter must be set in params.yaml (the shipped params.yaml "
                         "lists them all, with comments)")
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
    """Validate a complete params mapping (there are no defaults: every key must be there).

    Args:
        raw: the mapping read from YAML.
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


def load_raw(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read ``params.yaml`` as a plain mapping (not validated).

    Raises:
        ParamsError: the file is missing or not YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found (run from the project root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return raw if raw is not None else {}


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate ``params.yaml``.

    Raises:
        ParamsError: file missing, not YAML, or invalid values (message names the key).
    """
    return parse_params(load_raw(path), source=str(path))


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, group by group (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


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
