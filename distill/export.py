"""The distilled student for deployment: ONNX (fp32) and dynamically quantised int8 ONNX, checked and timed.

The exported graph is exactly what the served PyTorch model (:mod:`distill.serving`) computes, for images
already at the model's size:

    Input ``images``: uint8 ``(N, S, S, C)``, channels last, ``S`` the student's image size, ``N`` dynamic.
    Graph: ``x.permute(0, 3, 1, 2).float() / 255``, ``(x - mean) / std`` with the checkpoint's statistics
    (:meth:`distill.augment.Augmenter.normalize`), the student in eval mode (a distilled DeiT: the mean of its two
    heads' logits, DeiT's late fusion), softmax in float32.
    Output ``probabilities``: float32 ``(N, num_classes)``, in the checkpoint's ``class_names`` order.

The graph has no resize: a DeiT's position embedding has one slot per patch of the size it was trained at
(interpolating it at run time breaks a dynamic-size export), so the model is exported at that fixed size, and an
image of another size is refused, naming the expected shape. The pyfunc model resizes any image first; do the same
with :func:`distill.serving.resize_center_crop` (the data stage's own resize) before calling the ONNX model.

Export: ``torch.onnx.export(..., dynamo=True)`` (torch.export, then onnxscript's translation) at a pinned opset,
batch dimension dynamic, one self-contained file. int8: ``onnxruntime.quantization.quantize_dynamic`` after
``quant_pre_process`` (shape inference, graph clean-up): the weights of every ``MatMul`` (the Linear layers of the
blocks: qkv, proj, fc1, fc2) stored as int8, per tensor, and the activations quantised per call; the patch
embedding (a ``Conv``), the heads (``Gemm``), LayerNorm and softmax stay float. Its gain depends on the CPU's int8
dot-product instructions (VNNI, AMX: :func:`cpu_info`), its accuracy cost must be measured (:func:`compare`).

Parity: :func:`compare` against the PyTorch student on the same images; :func:`check_parity` fails with the
largest difference (image, class, both values). Timing: :func:`latency`, interleaved rounds of the three
runtimes (:func:`distill.evaluation.interleaved_rounds`) at a stated thread count.
"""

from __future__ import annotations

import logging
import platform
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.onnx
import numpy as np
import onnx
import onnxruntime as ort
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import Tensor, nn

from distill import evaluation as E
from distill import report as R
from distill.models.deit import load_deit
from distill.serving import pinned_requirement, served_metadata

__all__ = ["FLAVOR", "INPUT_NAME", "OUTPUT_NAME", "QUANTIZED_OPS", "DeployedStudent", "ExportError", "ParityError",
           "check_images", "check_parity", "compare", "cpu_info", "deployable", "export_onnx", "export_report",
           "latency", "mlflow_onnx_spec", "onnx_probabilities", "quantize_int8", "session"]

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
#: The operators whose weights the int8 model stores as int8 (the Linear layers of the transformer blocks).
QUANTIZED_OPS = ("MatMul",)
#: /proc/cpuinfo flags that decide what int8 buys: VNNI (int8 dot products in AVX-512 or AVX) and AMX (int8 tiles).
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
ONNX_REQUIREMENTS = ("mlflow", "onnx", "onnxruntime", "numpy")
#: The MLflow flavor the ONNX models are logged with (:func:`distill.registry.log_and_register_model`).
FLAVOR = mlflow.onnx


class ExportError(ValueError):
    """The student cannot be exported (an operator ONNX lacks, sizes that do not match), with the cause."""


class ParityError(ExportError):
    """The exported model does not compute what the PyTorch student computes (the message names the largest gap)."""


class DeployedStudent(nn.Module):
    """Raw uint8 ``(N, S, S, C)`` images -> class probabilities: the module that is exported (module docstring)."""

    def __init__(self, model: nn.Module, *, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.train(False)  # exported and timed in eval mode only

    def forward(self, images: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0  # (N, C, S, S) in [0, 1], as distill.augment.Augmenter renders
        x = (x - self.mean) / self.std  # Augmenter.normalize
        return torch.softmax(self.model(x).float(), dim=-1)  # eval mode: a distilled DeiT averages its two heads


def deployable(checkpoint: str | Path) -> tuple[DeployedStudent, dict[str, Any]]:
    """The student of a checkpoint, wrapped for export, and the served model's metadata (image size, classes, ...).

    Raises:
        CheckpointError: a missing or corrupt checkpoint, or one without what serving needs.
        ExportError: the model's own input size or channels differ from what its checkpoint says it serves (a
            pretrained size that was not adapted): the message names both.
    """
    meta = served_metadata(checkpoint)
    model, info = load_deit(checkpoint)
    config = info["config"]
    size, chans = config.get("img_size"), config.get("in_chans")
    if size not in (None, meta["image_size"]) or chans not in (None, meta["channels"]):
        raise ExportError(f"{checkpoint}: the student takes {size}x{size} images with {chans} channels (its config) "
                          f"but its checkpoint serves {meta['image_size']}x{meta['image_size']} with "
                          f"{meta['channels']} (image_size, mean): a model built for another size than its data; "
                          "rebuild it at the data's size (student.model.pretrained_path resamples a pretrained DeiT)")
    return DeployedStudent(model, mean=meta["mean"], std=meta["std"]), meta


def _export_cause(err: BaseException) -> str:
    """The cause of a failed ``torch.onnx.export``, in one line: the operator without an ONNX function, if any."""
    text = "\n".join(str(e) for e in _chain(err))
    missing = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if missing:
        return (f"the operator {missing.group(1)} has no ONNX conversion; replace it in the model with operators "
                "ONNX has, or register an ONNX function for it (torch.onnx custom_translation_table)")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("<class ")]
    return lines[0] if lines else f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def export_onnx(student: DeployedStudent, path: str | Path, *, image_size: int, channels: int, opset: int) -> None:
    """Write ``student`` as an ONNX file at the fixed image size, batch dimension dynamic, one file (no external data).

    Raises:
        ExportError: the student does not run on ``(N, image_size, image_size, channels)`` uint8 images, or an
            operator has no ONNX conversion at ``opset`` (the message names it).
    """
    example = torch.zeros((2, image_size, image_size, channels), dtype=torch.uint8)  # 2: a batch of 1 would be fixed
    try:
        with torch.inference_mode():
            student(example)
    except (ValueError, RuntimeError) as err:
        raise ExportError(f"the student does not run on uint8 images of shape (N, {image_size}, {image_size}, "
                          f"{channels}): {err}") from None
    try:
        torch.onnx.export(student, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                          dynamo=True, external_data=False, verbose=False, report=False)
        onnx.checker.check_model(str(path))
    except Exception as err:  # noqa: BLE001 - torch.export, onnxscript and the checker each raise their own
        raise ExportError(f"cannot export the student to ONNX (opset {opset}): {_export_cause(err)}") from err


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization warns through the root logger, dumping whole tensor types ("run pre-processing",
    "unsupported type to quantize" for the uint8 input, which is never meant to be): keep them out of the logs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(src: str | Path, dst: str | Path) -> None:
    """The int8 model of an fp32 ONNX file: dynamic quantisation of the ``MatMul`` weights (module docstring)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="distill-quantize-") as tmp, _quiet_root_logger():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared))
        quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8,
                         op_types_to_quantize=list(QUANTIZED_OPS))


def session(path: str | Path, *, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session on the CPU (``CPUExecutionProvider``), with ``threads`` intra-op threads (None: ort's)."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_images(images: Any, *, image_size: int, channels: int) -> np.ndarray:
    """``images`` as the ONNX model takes them, or a ValueError naming the expected shape and dtype."""
    arr = np.asarray(images)
    expected = f"uint8 (N, {image_size}, {image_size}, {channels}), channels last"
    if arr.dtype != np.uint8:
        raise ValueError(f"expected {expected} raw images (0..255), got dtype {arr.dtype}")
    if arr.ndim != 4 or arr.shape[1:] != (image_size, image_size, channels):
        hint = (" (channels first? this model takes channels last)" if arr.ndim == 4 and arr.shape[1] == channels
                else f" (resize to {image_size}x{image_size} first: distill.serving.resize_center_crop)"
                if arr.ndim == 4 and arr.shape[-1] == channels else "")
        raise ValueError(f"expected {expected}, got shape {tuple(arr.shape)}{hint}")
    return np.ascontiguousarray(arr)


def onnx_probabilities(sess: ort.InferenceSession, images: Any, *, batch_size: int = 256) -> np.ndarray:
    """The ONNX model's probabilities for ``images`` (checked by :func:`check_images`), ``batch_size`` at a time."""
    _, size, _, channels = sess.get_inputs()[0].shape
    arr = check_images(images, image_size=int(size), channels=int(channels))
    out = [sess.run([OUTPUT_NAME], {INPUT_NAME: arr[i:i + batch_size]})[0] for i in range(0, len(arr), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, sess.get_outputs()[0].shape[1]), dtype=np.float32)


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """How far ``candidate``'s probabilities are from ``reference``'s on the same images (rows).

    Returns:
        ``{"max_abs_prob_diff", "worst_image", "worst_class", "reference_value", "candidate_value",
        "top1_agreement", "top1_disagreements"}``: the largest absolute difference and where it is (row and
        column), and the share and count of rows whose argmax differs.
    """
    if reference.shape != candidate.shape or reference.ndim != 2 or len(reference) == 0:
        raise ValueError(f"expected two (N, C) arrays of one shape, N >= 1; got {reference.shape}, {candidate.shape}")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    row, col = np.unravel_index(int(diff.argmax()), diff.shape)
    same = reference.argmax(1) == candidate.argmax(1)
    return {"max_abs_prob_diff": float(diff[row, col]), "worst_image": int(row), "worst_class": int(col),
            "reference_value": float(reference[row, col]), "candidate_value": float(candidate[row, col]),
            "top1_agreement": float(same.mean()), "top1_disagreements": int((~same).sum())}


def check_parity(found: Mapping[str, Any], *, tolerance: float, what: str) -> None:
    """Fail when :func:`compare`'s result breaks parity: a different top-1 on any image, or a gap above ``tolerance``.

    Raises:
        ParityError: naming the largest difference (image, class, both probabilities) and the disagreements.
    """
    if found["max_abs_prob_diff"] <= tolerance and found["top1_disagreements"] == 0:
        return
    raise ParityError(
        f"{what} breaks parity with the PyTorch student: largest |difference of probabilities| "
        f"{found['max_abs_prob_diff']:.3g} (allowed {tolerance:g}) at test image {found['worst_image']}, class "
        f"{found['worst_class']} (PyTorch {found['reference_value']:.6f}, ONNX {found['candidate_value']:.6f}); "
        f"top-1 differs on {found['top1_disagreements']} images. Nothing was written: the previous export is kept")


def cpu_info() -> dict[str, Any]:
    """The CPU's name and the flags int8 speed depends on (Linux ``/proc/cpuinfo``; elsewhere the flags are unknown).

    Returns:
        ``{"name", "flags" (those of :data:`INT8_FLAGS` it has), "vnni", "amx"}``; ``vnni``/``amx`` None if unknown.
    """
    name, flags = platform.processor() or platform.machine(), None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
            name = value.strip()
        elif key.strip() == "flags" and flags is None:
            flags = set(value.split())
    if flags is None:
        return {"name": name, "flags": [], "vnni": None, "amx": None}
    return {"name": name, "flags": [f for f in INT8_FLAGS if f in flags],
            "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}), "amx": "amx_int8" in flags}


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def latency(student: DeployedStudent, onnx_files: Mapping[str, str | Path], *, batch_size: int, iters: int,
            rounds: int, threads: int | None = None, warmup: int = 5) -> dict[str, Any]:
    """Batch-1 latency and batch-``batch_size`` throughput of PyTorch fp32 and each ONNX file, interleaved rounds.

    Every side runs on the CPU with the same thread count (torch's intra-op threads, onnxruntime's
    ``intra_op_num_threads``), on the same random uint8 images, raw images in and probabilities out
    (:func:`distill.evaluation.measure_calls` in :func:`distill.evaluation.interleaved_rounds`).

    Args:
        student: the PyTorch side (``pytorch_fp32``).
        onnx_files: side name (``onnxruntime_fp32``, ``onnxruntime_int8``) -> ONNX file.
        batch_size: images per call of the throughput measurement.
        iters: timed calls per measurement.
        rounds: interleaved rounds.
        threads: CPU threads of every side (None: torch's current count).
        warmup: untimed calls before each measurement.

    Returns:
        ``{side: {...}, "threads", "batch_size", "method"}``; each side's ``images_per_sec`` and
        ``latency_ms_batch1`` (medians over rounds, with ``_min`` and ``_max``), and against each earlier side
        ``<ref>``: ``speedup_vs_<ref>`` (throughput ratio) and ``batch1_speedup_vs_<ref>`` (latency ratio), each
        computed within a round, median with ``_min`` and ``_max``.
    """
    threads = threads or torch.get_num_threads()
    student = student.cpu().eval()
    size, channels = _input_size(student, onnx_files)
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, channels), dtype=np.uint8)
    single = batch[:1].copy()
    sessions = {name: session(path, threads=threads) for name, path in onnx_files.items()}
    calls = {"pytorch_fp32": lambda x: student(torch.from_numpy(x)),
             **{name: (lambda x, s=s: s.run([OUTPUT_NAME], {INPUT_NAME: x})) for name, s in sessions.items()}}
    measures = {name: (lambda c=c: E.measure_calls(c, batch, single, iters=iters, warmup=warmup))
                for name, c in calls.items()}
    with _torch_threads(threads), torch.inference_mode():
        summary, per_round = E.interleaved_rounds(measures, rounds=rounds)
    out: dict[str, Any] = {}
    for i, name in enumerate(calls):
        out[name] = dict(summary[name])
        for ref in list(calls)[:i]:
            out[name].update(_within_rounds(per_round, name, ref, "images_per_sec", f"speedup_vs_{ref}"))
            out[name].update(_within_rounds(per_round, ref, name, "latency_ms_batch1", f"batch1_speedup_vs_{ref}"))
    out.update(threads=threads, batch_size=batch_size, method=(
        f"{rounds} interleaved rounds (order reversed every other round), median with min and max; per round "
        f"and side: {warmup} warm-up calls, then mean images/s over {iters} batches of {batch_size} and median "
        f"latency over {iters} batch-1 calls; uint8 images in, probabilities out; CPU, {threads} threads on every side "
        "(torch intra-op, onnxruntime intra_op_num_threads); speed-ups computed within each round"))
    return out


def _within_rounds(per_round: Sequence[Mapping[str, Any]], num: str, den: str, key: str, name: str) -> dict[str, float]:
    """``num``'s ``key`` over ``den``'s in each round: median, min and max as ``name``, ``name_min``, ``name_max``."""
    ratios = [rnd[num][key] / rnd[den][key] for rnd in per_round]
    return {name: float(np.median(ratios)), f"{name}_min": min(ratios), f"{name}_max": max(ratios)}


def _input_size(student: DeployedStudent, onnx_files: Mapping[str, str | Path]) -> tuple[int, int]:
    """The fixed image side and channels of the ONNX files (they agree with ``student``'s ``mean``)."""
    first = next(iter(onnx_files.values()))
    dims = onnx.load(str(first), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    size, channels = int(dims[1].dim_value), int(dims[3].dim_value)
    if channels != student.mean.numel():
        raise ValueError(f"{first} takes {channels} channels, the PyTorch student {student.mean.numel()}")
    return size, channels


def mlflow_onnx_spec(path: str | Path, metadata: Mapping[str, Any], *, precision: str, opset: int) -> dict[str, Any]:
    """What ``mlflow.models.Model.log(flavor=mlflow.onnx, ...)`` needs: the model, signature, example, CPU provider.

    The signature is the pyfunc model's (uint8 channels-last images in, float32 probabilities out) at the fixed
    size: MLflow refuses another shape or dtype naming the expected one. ``onnx_execution_providers`` is
    ``["CPUExecutionProvider"]``: MLflow's default puts CUDA first.
    """
    size, channels, classes = int(metadata["image_size"]), int(metadata["channels"]), int(metadata["num_classes"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, channels), INPUT_NAME)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes), OUTPUT_NAME)]))
    described = {**metadata, "format": "onnx", "precision": precision, "opset": opset,
                 "input": f"uint8 (N, {size}, {size}, {channels}) images, channels last, exactly {size}x{size}",
                 "preprocessing": (f"in the graph: x/255, (x - mean) / std; no resize: bring images to {size}x{size} "
                                   "first (distill.serving.resize_center_crop, the pyfunc model's resize)")}
    return {"onnx_model": onnx.load(str(path)), "signature": signature, "save_as_external_data": False,
            "input_example": np.zeros((2, size, size, channels), dtype=np.uint8),
            "onnx_execution_providers": ["CPUExecutionProvider"], "metadata": described,
            "pip_requirements": [pinned_requirement(d) for d in ONNX_REQUIREMENTS]}


def _speed_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report's rows: each runtime's test top-1, agreement with fp32, file size and speed."""
    lat, fp32, int8 = metrics["latency"], metrics["fp32"], metrics["int8"]
    return [
        {"name": "PyTorch fp32", "top1": metrics["pytorch"]["top1"], **lat["pytorch_fp32"]},
        {"name": "ONNX fp32 (onnxruntime)", "top1": fp32["top1"], "agreement_with_fp32": fp32["top1_agreement"],
         "file_bytes": fp32["file_bytes"], **lat["onnxruntime_fp32"]},
        {"name": "ONNX int8 (onnxruntime)", "top1": int8["top1"], "agreement_with_fp32": int8["agreement_with_fp32"],
         "file_bytes": int8["file_bytes"], **lat["onnxruntime_int8"]},
    ]


def _has(value: bool | None) -> str:
    return {True: "has", False: "has no", None: "may have (unknown)"}[value]


def export_report(metrics: Mapping[str, Any]) -> str:
    """``reports/export.md``: the three runtimes side by side, parity, what int8 costs and buys, and the CPU."""
    lat, fp32, int8, cpu, n = metrics["latency"], metrics["fp32"], metrics["int8"], metrics["cpu"], metrics["num_test"]
    q = lat["onnxruntime_int8"]
    return "\n".join([
        f"# The student for deployment (ONNX opset {metrics['opset']}, {n} test images)\n",
        R.results_table(_speed_rows(metrics)), "",
        f"Parity: the fp32 ONNX model gives the PyTorch student's top-1 on all {n} test images; the largest "
        f"difference of probabilities is {fp32['max_abs_prob_diff']:.2g} (allowed {metrics['parity_tolerance']:g}).",
        f"int8 changes test top-1 by {100 * (int8['top1'] - fp32['top1']):+.2f} points against fp32 (the same top-1 on "
        f"{100 * int8['agreement_with_fp32']:.2f} % of the images), at {int8['file_bytes'] / fp32['file_bytes']:.2f}x "
        f"the file size. At batch 1 it is {q['batch1_speedup_vs_pytorch_fp32']:.2f}x as fast as PyTorch fp32 and "
        f"{q['batch1_speedup_vs_onnxruntime_fp32']:.2f}x as fast as ONNX fp32 (medians of per-round ratios); at "
        f"batch {lat['batch_size']}, {q['speedup_vs_pytorch_fp32']:.2f}x and {q['speedup_vs_onnxruntime_fp32']:.2f}x. "
        f"The registry serves the {metrics['served']} model.", "",
        f"CPU: {cpu['name']}; it {_has(cpu['vnni'])} VNNI and {_has(cpu['amx'])} AMX (its int8 flags: "
        f"{', '.join(cpu['flags']) or 'none found'}); what int8 buys depends on them.", "",
        f"Speed: {lat['method']}.",
    ]) + "\n"
