"""The distilled student as an MLflow model: raw uint8 images in, class probabilities out.

:func:`save_servable` turns a self-describing checkpoint (:mod:`distill.checkpoint`) into an MLflow
``python_function`` model folder that carries everything needed to classify a raw image: the checkpoint
itself (an artifact), the preprocessing below (:class:`StudentClassifier`), the ``distill`` package
(``code_paths``, so loading it needs no installed copy of this project), a tensor signature, an input
example and pip requirements. So::

    mlflow.pyfunc.load_model("models/student_mlflow").predict(images)          # a saved folder
    mlflow.pyfunc.load_model("models:/deit-student@champion").predict(images)  # the registry
    mlflow models serve -m models:/deit-student@champion --env-manager local   # REST

Input/output contract
    Input: a numpy ``uint8`` batch of raw images, channels last, ``(N, H, W, C)`` with ``C`` the
    channels the model was trained on (1 for digits/MNIST, 3 for RGB). Any ``H`` and ``W``. The
    signature is ``Tensor(uint8, (-1, -1, -1, C))``; MLflow enforces it before :meth:`StudentClassifier.predict`
    runs, so through ``pyfunc``/``serve`` the batch must be 4-D and ``uint8``. The class itself also takes
    ``(N, H, W)`` for 1-channel models, a list of images (sizes may differ), a 1-D object array of images
    (MLflow's "ragged" tensor form) and a one-column pandas DataFrame of images. Over REST,
    ``POST /invocations`` with ``{"inputs": <nested list N x H x W x C of 0..255>}`` (MLflow casts the
    list to ``uint8``; all images of one request share one size).

    Output: ``float32`` ``(N, num_classes)`` softmax probabilities, in the order of the checkpoint's
    ``class_names`` (in the MLmodel ``metadata``). REST answers ``{"predictions": [[p_0, ...], ...]}``.

Preprocessing (exactly, per image)
    1. Resize so that the shorter side is ``image_size``: torchvision's ``resize`` on the ``uint8`` tensor,
       bilinear, antialiased (which only acts when shrinking), the longer side
       ``int(image_size * long / short)``; then centre-crop to ``image_size x image_size``
       (torchvision's ``center_crop``). These are the calls with which the data stage brings the files of
       an image folder to ``image_size`` (:func:`distill.prepare.decode_image`), so a raw image file decoded
       to RGB ``uint8`` is preprocessed as the pipeline stored it. An image already ``image_size`` square
       is not touched (bit-exact). (In-memory sources, digits and the torchvision sets, were resized by
       the data stage with a float ``interpolate``; where their native size differs from ``image_size``
       the two resizes can differ by one grey level.)
    2. Scale to [0, 1] (``x.float() / 255``) and normalise with the checkpoint's ``mean``/``std``:
       the evaluation view of :class:`distill.augment.Augmenter`, the very code the evaluate stage runs.
    3. Run the model in eval mode (DeiT: the average of the class-token and distillation-token heads'
       logits) in chunks of ``batch_size`` images, and take the softmax in float32.

    Prepared test images (already ``image_size``) therefore get the pipeline's own evaluation.

``model_config`` (:data:`MODEL_CONFIG`): ``device`` (default ``"cpu"``) and ``batch_size`` (default 256), set with
``mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})``, or for ``mlflow models serve`` with the
environment variable ``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"device": "cuda"}'``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import Model, ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

import distill
from distill.augment import Augmenter, eval_augmenter
from distill.checkpoint import CheckpointError, read_metadata
from distill.io import staged_dir
from distill.models.deit import load_deit

__all__ = ["CHECKPOINT_ARTIFACT", "MODEL_CODE", "MODEL_CONFIG", "REQUIRED_EXTRA", "REQUIREMENTS", "StudentClassifier",
           "pinned_requirement", "preprocess", "probabilities", "resize_center_crop", "save_servable",
           "servable_checkpoint", "servable_extra", "servable_spec", "served_metadata"]

#: The name of the checkpoint among the model's artifacts (``context.artifacts[CHECKPOINT_ARTIFACT]``).
CHECKPOINT_ARTIFACT = "checkpoint"
#: What a checkpoint's ``extra`` metadata must hold to be served.
REQUIRED_EXTRA = ("image_size", "mean", "std", "num_classes")
#: The distributions the served model imports (pinned to this environment's versions, local labels dropped:
#: ``torch==2.14.1`` is satisfied by ``2.14.1+cu130`` here and installable from PyPI elsewhere).
REQUIREMENTS = ("mlflow", "torch", "torchvision", "numpy", "safetensors")
#: The model's code file (MLflow "models from code"): MLflow runs it to get the model, no pickle involved.
MODEL_CODE = '''"""The served model (MLflow models from code): distill.serving.StudentClassifier, from code/."""

from mlflow.models import set_model

from distill.serving import StudentClassifier

set_model(StudentClassifier())
'''
#: The model's default ``model_config``; ``mlflow.pyfunc.load_model(uri, model_config=...)`` or, for ``mlflow models
#: serve``, ``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"device": "cuda"}'`` override these keys (MLflow accepts no others).
MODEL_CONFIG = {"device": "cpu", "batch_size": 256}
_INPUT_EXAMPLE_IMAGES = 2


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """Shorter side to ``size`` (bilinear, antialiased), then the central ``size x size`` (module docstring, step 1).

    Args:
        images: uint8 ``(N, C, H, W)``.
        size: the output side.

    Returns:
        uint8 ``(N, C, size, size)``; ``images`` itself when it is already ``size`` square.
    """
    if images.shape[-2:] == (size, size):
        return images
    return TF.center_crop(TF.resize(images, [size], antialias=True), [size])


def preprocess(images: Any, *, channels: int, augmenter: Augmenter, batch_size: int = 256) -> Iterator[Tensor]:
    """Raw images to normalised model inputs (module docstring, steps 1-2), ``batch_size`` images at a time.

    Args:
        images: see the module docstring (input contract).
        channels: the channels the model takes.
        augmenter: gives the evaluation view and the normalisation (its ``out_size`` is the model's side).
        batch_size: the most images converted at once (float copies are made per chunk, not for the whole input).

    Yields:
        float32 ``(n, C, S, S)`` batches, in input order.

    Raises:
        ValueError: not uint8, wrong layout or channel count (the message says what is expected).
    """
    for batch in _batches(images, channels):
        for start in range(0, len(batch), batch_size):
            # Contiguous (n, C, H, W), the layout the evaluate stage's DataLoader yields: a channels-last tensor
            # could take another convolution kernel in the patch embedding and round differently.
            chunk = np.array(batch[start:start + batch_size], copy=True)  # MLflow may hand a read-only array
            x = torch.from_numpy(chunk).permute(0, 3, 1, 2).contiguous()
            x = resize_center_crop(x, augmenter.out_size)  # (n, C, S, S) uint8
            yield augmenter(x, augmenter.eval_params(x.shape[0]))


def _expected(channels: int) -> str:
    return f"(N, H, W, {channels})" + (" or (N, H, W)" if channels == 1 else "")


def _batches(images: Any, channels: int) -> list[np.ndarray]:
    """The input as uint8 ``(n, H, W, C)`` batches: one for an array, one per size for a list or a ragged batch."""
    if hasattr(images, "columns"):  # a pandas DataFrame: one column of images
        if len(images.columns) != 1:
            raise ValueError(f"expected a DataFrame with one column of images, got columns {list(images.columns)}")
        images = list(images.iloc[:, 0])
    if isinstance(images, np.ndarray) and images.dtype == object:  # MLflow's ragged form: (N,) of images
        images = list(images)
    if not isinstance(images, (list, tuple)):
        return [_layout(_uint8(images), channels)]
    arrays = [_uint8(image) for image in images]  # each (H, W, C), or (H, W) for one channel
    if len({a.shape for a in arrays}) <= 1:
        return [_layout(np.stack(arrays), channels)] if arrays else []
    return [_layout(a[None], channels) for a in arrays]


def _uint8(value: Any) -> np.ndarray:
    """``value`` as a uint8 array; an array of another dtype, or a list with other than 0..255 integers, is an error."""
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8:
            raise ValueError(f"expected raw uint8 images (pixel values 0..255), got dtype {value.dtype}: convert "
                             "with `images.astype(np.uint8)` from 0..255 values, not from normalised floats")
        return value
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() > 255)):
        raise ValueError(f"expected raw uint8 images (integers 0..255), got {arr.dtype} values"
                         + (f" from {arr.min()} to {arr.max()}" if arr.size and arr.dtype.kind in "iuf" else ""))
    return arr.astype(np.uint8)


def _layout(batch: np.ndarray, channels: int) -> np.ndarray:
    """``batch`` as contiguous ``(n, H, W, C)``; a 1-channel ``(n, H, W)`` batch gets its channel axis."""
    if batch.ndim == 3 and channels == 1:
        batch = batch[..., None]
    if batch.ndim != 4 or batch.shape[-1] != channels:
        hint = " (channels first? this model takes channels last)" if batch.ndim == 4 and batch.shape[1] == channels \
            else ""
        raise ValueError(f"expected a batch of {channels}-channel images {_expected(channels)}, channels last; got "
                         f"shape {tuple(batch.shape)}{hint}")
    if 0 in batch.shape[1:3]:
        raise ValueError(f"images must have a height and a width, got shape {tuple(batch.shape)}")
    return np.ascontiguousarray(batch)


def probabilities(model: torch.nn.Module, images: Any, *, channels: int, num_classes: int, augmenter: Augmenter,
                  batch_size: int = 256, device: str | torch.device = "cpu") -> np.ndarray:
    """What the served model computes (module docstring, steps 1-3): raw images in, class probabilities out.

    Args:
        model: the student in eval mode, on ``device``.
        images: see the module docstring (input contract).
        channels: the channels the model takes.
        num_classes: its classes (the width of an empty answer).
        augmenter: the evaluation view and normalisation (its ``out_size`` is the model's side).
        batch_size: images per forward pass.
        device: where ``model`` runs.

    Returns:
        float32 ``(N, num_classes)`` softmax probabilities, rows in input order.
    """
    probs = [np.zeros((0, num_classes), dtype=np.float32)]
    with torch.inference_mode():
        for x in preprocess(images, channels=channels, augmenter=augmenter, batch_size=batch_size):
            logits = model(x.to(device))  # eval mode: DeiT averages its two heads
            probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    return np.concatenate(probs)


class StudentClassifier(mlflow.pyfunc.PythonModel):
    """Raw uint8 images -> class probabilities with a distill checkpoint (module docstring for the contract)."""

    def load_context(self, context: Any) -> None:
        """Rebuild the student from the ``checkpoint`` artifact (:func:`distill.models.deit.load_deit`)."""
        config = {**MODEL_CONFIG, **(getattr(context, "model_config", None) or {})}
        self.device = torch.device(config["device"])
        self.batch_size = int(config["batch_size"])
        path = context.artifacts[CHECKPOINT_ARTIFACT]
        self.model, info = load_deit(path, map_location=self.device)
        extra = servable_extra(path, info)
        self.channels = len(extra["mean"])
        self.augmenter = eval_augmenter(int(extra["image_size"]), extra["mean"], extra["std"])
        self.num_classes = int(extra["num_classes"])

    # np.ndarray: what MLflow hands over after enforcing the tensor signature, and a hint MLflow infers nothing from.
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        """Class probabilities, float32 ``(N, num_classes)``, rows in input order (module docstring)."""
        return probabilities(self.model, model_input, channels=self.channels, num_classes=self.num_classes,
                             augmenter=self.augmenter, batch_size=self.batch_size, device=self.device)


def servable_extra(path: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's ``extra`` (``info`` from :func:`distill.checkpoint.read_metadata`), checked for serving.

    Raises:
        CheckpointError: it lacks the image size, normalisation or class count (:data:`REQUIRED_EXTRA`).
    """
    extra = info["extra"]
    missing = [k for k in REQUIRED_EXTRA if k not in extra]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot be served: its metadata lacks {', '.join(missing)} "
                              "(written by an older version? rerun the stage that trained it)")
    if len(extra["mean"]) != len(extra["std"]):
        raise CheckpointError(f"checkpoint {path}: mean and std have different lengths")
    return extra


def pinned_requirement(dist: str) -> str:
    """``dist==<installed version>`` without a local label (``torch==2.14.1``), or ``dist`` when not installed."""
    try:
        return f"{dist}=={version(dist).split('+')[0]}"
    except PackageNotFoundError:
        return dist


@contextmanager
def servable_spec(checkpoint: str | Path) -> Iterator[dict[str, Any]]:
    """What ``mlflow.pyfunc.save_model`` and ``mlflow.models.Model.log`` need to make the servable model.

    One place for both: the folder :func:`save_servable` writes and the model the registry logs
    (:func:`distill.registry.log_and_register_student`) are built from the same arguments. The model is
    "models from code" (MLflow's recommended form): ``python_model`` is the path of :data:`MODEL_CODE`,
    written to a temporary file that lives as long as this context, so loading the model unpickles nothing.

    Args:
        checkpoint: the student's ``.safetensors`` checkpoint.

    Yields:
        Keyword arguments: ``python_model``, ``artifacts``, ``code_paths``, ``signature``, ``input_example``,
        ``pip_requirements``, ``metadata`` (class names, image size, mean/std, data fingerprint, ...) and
        ``model_config``.

    Raises:
        CheckpointError: a missing, foreign or corrupt checkpoint, or one without the metadata serving needs.
    """
    checkpoint = Path(checkpoint).resolve()
    metadata = served_metadata(checkpoint)
    size, channels, classes = metadata["image_size"], metadata["channels"], metadata["num_classes"]
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, channels))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]))
    with tempfile.TemporaryDirectory(prefix="distill-serving-") as tmp:
        code = Path(tmp) / "student_classifier.py"
        code.write_text(MODEL_CODE)
        yield {
            "python_model": str(code),
            "artifacts": {CHECKPOINT_ARTIFACT: str(checkpoint)},
            "code_paths": [str(Path(distill.__file__).parent)],
            "signature": signature,
            "input_example": np.zeros((_INPUT_EXAMPLE_IMAGES, size, size, channels), dtype=np.uint8),
            "pip_requirements": [pinned_requirement(d) for d in REQUIREMENTS],
            "metadata": metadata,
            "model_config": dict(MODEL_CONFIG),
        }


def served_metadata(checkpoint: str | Path) -> dict[str, Any]:
    """The served model's ``metadata`` (MLmodel): what it is, takes and answers, from the checkpoint alone.

    Raises:
        CheckpointError: see :func:`servable_spec`.
    """
    info = read_metadata(checkpoint)
    extra = servable_extra(checkpoint, info)
    size, channels, classes = int(extra["image_size"]), len(extra["mean"]), int(extra["num_classes"])
    return {
        "kind": info["kind"], "image_size": size, "channels": channels, "num_classes": classes,
        "class_names": list(extra.get("class_names") or map(str, range(classes))),
        "mean": list(extra["mean"]), "std": list(extra["std"]), "data_fingerprint": extra.get("data_fingerprint"),
        "input": f"uint8 (N, H, W, {channels}) raw images, channels last, any H and W",
        "output": f"float32 (N, {classes}) softmax probabilities in class_names order",
        "preprocessing": (f"shorter side resized to {size} (torchvision resize, bilinear, antialias) and centre-"
                          f"cropped to {size}x{size} (untouched if already {size}x{size}); x/255; (x - mean) / std"),
    }


def save_servable(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint as an MLflow pyfunc model folder (module docstring), atomically.

    The folder is built under a staging name beside ``out_dir`` and swapped in complete
    (:func:`distill.io.staged_dir`): a reader sees the previous model or the new one.

    Args:
        checkpoint: the student's ``.safetensors`` checkpoint (``models/student.safetensors``).
        out_dir: the model folder (``models/student_mlflow``); replaced if it exists.

    Returns:
        ``out_dir``.

    Raises:
        CheckpointError: see :func:`servable_spec`.
    """
    out_dir = Path(out_dir)
    with staged_dir(out_dir, str(os.getpid())) as staging, servable_spec(checkpoint) as spec:
        mlflow.pyfunc.save_model(path=str(staging), **spec)
    return out_dir


def servable_checkpoint(model_dir: str | Path) -> Path:
    """The checkpoint inside a model folder written by :func:`save_servable`.

    Raises:
        CheckpointError: ``model_dir`` is not such a folder.
    """
    model_dir = Path(model_dir)
    try:
        flavor = Model.load(str(model_dir)).flavors["python_function"]
        path = model_dir / flavor["artifacts"][CHECKPOINT_ARTIFACT]["path"]
    except Exception as err:  # noqa: BLE001 - a missing or foreign MLmodel alike
        raise CheckpointError(f"{model_dir} is not a servable student model folder ({err}); write it with "
                              "distill.serving.save_servable") from None
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: its checkpoint artifact {path} is missing")
    return path
