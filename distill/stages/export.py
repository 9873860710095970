"""The export stage: the evaluated student as ONNX (fp32) and int8 ONNX, checked on the test split, timed on the CPU.

Runs after ``evaluate``. From the student's checkpoint alone (:mod:`distill.export`): the fp32 ONNX model (raw
uint8 images in, the preprocessing and DeiT's mean of its two heads inside, probabilities out, opset pinned,
batch dynamic, at the fixed image size) and its dynamically quantised int8 model. Then, on every run:

* parity on the whole test split: the fp32 ONNX model against the PyTorch student as it is served
  (:func:`distill.serving.probabilities`): the same top-1 on every image and probabilities within
  ``export.max_prob_diff``. Otherwise the stage fails naming the largest difference, and nothing is written;
* the int8 model's test top-1, its agreement with fp32 and both file sizes;
* batch-1 latency and batch-``export.latency_batch_size`` throughput of PyTorch fp32, onnxruntime fp32 and int8,
  interleaved rounds at one stated thread count, with the CPU's int8 instructions (VNNI, AMX).

Outputs, written only once everything passed, as one set (:func:`distill.io.replace_together`):
``models/student.onnx``, ``models/student.int8.onnx``, ``metrics/export.json`` (DVC metrics) and
``reports/export.md``. Then the served ONNX model (``export.serve``) is logged with MLflow's ``onnx`` flavor
(CPU provider, the pyfunc model's signature at the fixed size, an input example) and registered as
``export.model_name`` beside the pyfunc model, with the same quality gate and aliases (:mod:`distill.registry`):
its metric is its own test top-1, its baseline the labels-only baseline's top-1 in ``metrics/evaluate.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from distill import evaluation as E
from distill import export as X
from distill.augment import eval_augmenter
from distill.config import ParamsView, Paths, flatten
from distill.data import load_prepared
from distill.io import json_text, replace_together
from distill.registry import Score, gate_verdict, log_and_register_model, promotion_note
from distill.serving import probabilities
from distill.tracking import NO_TRACKING, Tracker

__all__ = ["onnx_path", "run"]

PRECISIONS = ("fp32", "int8")


def onnx_path(paths: Paths, precision: str) -> Path:
    """``models/student.onnx`` (fp32) or ``models/student.int8.onnx``."""
    return paths.root / "models" / ("student.onnx" if precision == "fp32" else f"student.{precision}.onnx")


def _copy(src: Path) -> Callable[[str], None]:
    return lambda tmp: shutil.copyfile(src, tmp)


def _accuracy(ref: np.ndarray, fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray,
              files: dict[str, Path]) -> dict[str, Any]:
    """Test top-1 of the three, the fp32 model's parity with PyTorch, the int8 model's agreement with fp32."""
    def top1(p: np.ndarray) -> float:  # the evaluate stage's own function: the same value for the same predictions
        return E.topk_accuracy(torch.from_numpy(p), torch.from_numpy(labels).long(), 1)

    to_fp32 = X.compare(fp32, int8)
    return {
        "pytorch": {"top1": top1(ref)},
        "fp32": {"top1": top1(fp32), "file_bytes": files["fp32"].stat().st_size, **X.compare(ref, fp32)},
        "int8": {"top1": top1(int8), "file_bytes": files["int8"].stat().st_size,
                 "agreement_with_fp32": to_fp32["top1_agreement"],
                 "max_abs_prob_diff_vs_fp32": to_fp32["max_abs_prob_diff"],
                 "top1_change_vs_fp32": top1(int8) - top1(fp32)},
    }


def _build(xp: ParamsView, checkpoint: Path, images: np.ndarray, labels: np.ndarray, fingerprint: str,
           tmp: Path) -> dict[str, Any]:
    """Export, quantise, check parity and time, in ``tmp``; the metrics (raises ParityError before any timing)."""
    student, meta = X.deployable(checkpoint)
    if meta["data_fingerprint"] not in (None, fingerprint):
        raise ValueError(f"{checkpoint} was trained on other data (fingerprint mismatch); rerun `dvc repro`")
    files = {p: tmp / f"student.{p}.onnx" for p in PRECISIONS}
    X.export_onnx(student, files["fp32"], image_size=meta["image_size"], channels=meta["channels"], opset=xp.opset)
    X.quantize_int8(files["fp32"], files["int8"])
    augmenter = eval_augmenter(meta["image_size"], meta["mean"], meta["std"])
    ref = probabilities(student.model, images, channels=meta["channels"], num_classes=meta["num_classes"],
                        augmenter=augmenter, batch_size=xp.batch_size)
    out = {p: X.onnx_probabilities(X.session(f), images, batch_size=xp.batch_size) for p, f in files.items()}
    metrics = _accuracy(ref, out["fp32"], out["int8"], labels, files)
    X.check_parity(metrics["fp32"], tolerance=xp.max_prob_diff, what=f"the ONNX export (opset {xp.opset})")
    metrics["latency"] = X.latency(student, {f"onnxruntime_{p}": f for p, f in files.items()},
                                   batch_size=xp.latency_batch_size, iters=xp.latency_iters,
                                   rounds=xp.latency_rounds, threads=xp.threads)
    metrics.update(opset=xp.opset, parity_tolerance=xp.max_prob_diff, num_test=int(len(labels)),
                   image_size=meta["image_size"], channels=meta["channels"], cpu=X.cpu_info(), served=xp.serve,
                   quantized_ops=list(X.QUANTIZED_OPS), files={p: str(f.name) for p, f in files.items()})
    return {"metrics": metrics, "meta": meta, "files": files}


def _register(tracker: Tracker, xp: ParamsView, built: dict[str, Any], score: Score) -> dict[str, Any]:
    """Log the served ONNX model (``export.serve``) with MLflow's onnx flavor and register it (same gate, aliases)."""
    path = built["files"][xp.serve]
    result = log_and_register_model(
        tracker, lambda: nullcontext(X.mlflow_onnx_spec(path, built["meta"], precision=xp.serve, opset=xp.opset)),
        flavor=X.FLAVOR, model_name=xp.model_name, score=score, name=f"student_onnx_{xp.serve}")
    note = promotion_note(result)
    if note:
        print(f"[export] {note}", file=sys.stderr, flush=True)
    return result


def run(params: ParamsView, paths: Paths, tracker: Tracker = NO_TRACKING) -> dict[str, Any]:
    """Export the student, check it, time it; write the models, metrics and report; register the ONNX model."""
    xp = params.export
    data = load_prepared(paths.data)
    images = np.ascontiguousarray(np.asarray(data.test.images).transpose(0, 2, 3, 1))  # (N, S, S, C) as served
    labels = np.asarray(data.test.labels)
    checkpoint = paths.model("student")
    with tempfile.TemporaryDirectory(prefix="distill-export-") as tmp:
        built = _build(xp, checkpoint, images, labels, data.meta.fingerprint, Path(tmp))
        metrics, files = built["metrics"], built["files"]
        evaluated = json.loads(paths.metrics("evaluate").read_text())
        score = Score(metric=metrics[xp.serve]["top1"], dataset_key=f"{data.meta.fingerprint}:test",
                      baseline=evaluated["baseline"]["top1"])
        passes, reason = gate_verdict(score)
        metrics["champion_gate"] = {"passed": passes, "reason": reason}
        report = paths.reports / "export.md"
        replace_together({**{onnx_path(paths, p): _copy(files[p]) for p in PRECISIONS},
                          paths.metrics("export"): lambda t: Path(t).write_text(json_text(metrics)),
                          report: lambda t: Path(t).write_text(X.export_report(metrics))})
        tracker.log_metrics({k: v for k, v in flatten(metrics).items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracker.log_artifact(report)
        tracker.flush()
        if xp.register_model:
            metrics["registry"] = _register(tracker, xp, built, score)
    return metrics
