"""Evaluation metrics and cost measurements, pure torch (no MLflow, Prefect or DVC).

What it implements:

* accuracy (top-1, top-5), mean negative log-likelihood and a confusion matrix;
* expected calibration error (Guo et al. 2017, "On Calibration of Modern Neural Networks", Eq. 3):
  equal-width bins over the max softmax probability, ``ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|``;
* agreement, the share of images on which two classifiers predict the same class (DeiT, Touvron et
  al. 2021, Table 4: class head vs distillation head vs teacher);
* the cost side of DeiT's Table 1 / Figure 1: parameters, FLOPs per image (torch's own
  ``FlopCounterMode``, which counts 2 FLOPs per multiply-accumulate) and throughput / latency;
* mean ± std aggregation of several seeds' metrics, with a 95 % confidence interval (Student's t) of each
  mean: for the distillation gain and the gap to the teacher, which are per-seed *paired* differences, that
  is the interval of the paired difference;
* for a single run, the test set's own sampling error: a Wilson interval for an accuracy and a normal
  interval for a paired difference of accuracies on the same images.

All accuracies are fractions in ``[0, 1]``; presentation (percentages) is left to :mod:`distill.report`.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.deit import count_parameters
from distill.stats import (  # noqa: F401 - re-exported: the public API
    aggregate_runs,
    mean_std,
    newcombe_paired_interval,
    t_interval,
    wilson_interval,
)

__all__ = ["classification_metrics", "topk_accuracy", "agreement", "expected_calibration_error", "confusion_matrix",
           "count_parameters", "flops_per_image", "measure_calls", "measure_throughput", "interleaved_rounds",
           "interleaved_speed", "mean_std",
           "t_interval", "wilson_interval", "paired_accuracy_interval", "aggregate_runs"]


# ------------------------------------------------------------------------------------------ accuracy
def _check_logits(logits: Tensor, labels: Tensor) -> None:
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("cannot compute metrics on zero samples")


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    """Share of samples whose true label is among the ``k`` highest logits.

    Args:
        logits: ``(N, C)`` scores (logits or probabilities: only their order matters).
        labels: ``(N,)`` true class indices.
        k: How many top classes count as a hit; ``1 <= k <= C``.

    Returns:
        Accuracy as a fraction in ``[0, 1]``.
    """
    _check_logits(logits, labels)
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k={k} must be between 1 and the number of classes ({logits.shape[1]})")
    top = logits.topk(k, dim=-1).indices  # (N, k)
    return float((top == labels.to(top.device).unsqueeze(1)).any(dim=1).float().mean())


def agreement(logits_a: Tensor, logits_b: Tensor) -> float:
    """Share of rows on which two classifiers' argmax predictions match (DeiT, Table 4).

    Args:
        logits_a: ``(N, C)`` scores of the first classifier.
        logits_b: ``(N, C)`` scores of the second classifier, same samples in the same order.

    Returns:
        Agreement as a fraction in ``[0, 1]``.
    """
    if logits_a.shape != logits_b.shape or logits_a.ndim != 2:
        raise ValueError(f"expected two (N, C) tensors of one shape, got {tuple(logits_a.shape)} and "
                         f"{tuple(logits_b.shape)}")
    if logits_a.shape[0] == 0:
        raise ValueError("cannot compute agreement on zero samples")
    return float((logits_a.argmax(-1) == logits_b.argmax(-1).to(logits_a.device)).float().mean())


def confusion_matrix(preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Count matrix of predictions against true labels.

    Args:
        preds: ``(N,)`` predicted class indices.
        labels: ``(N,)`` true class indices.
        num_classes: Number of classes ``C``.

    Returns:
        ``LongTensor (C, C)``; entry ``[t, p]`` counts samples of true class ``t`` predicted as ``p``
        (rows are true classes, columns predictions).
    """
    preds, labels = preds.reshape(-1).long().cpu(), labels.reshape(-1).long().cpu()
    if preds.shape != labels.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in length")
    for name, t in (("preds", preds), ("labels", labels)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got range [{int(t.min())}, {int(t.max())}]")
    flat = torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes)


# --------------------------------------------------------------------------------------- calibration
def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error of the max-probability prediction (Guo et al. 2017, Eq. 3).

    Confidence is the max probability of a row; its prediction the argmax. Confidences fall into
    ``n_bins`` equal-width bins ``(0, 1/n], (1/n, 2/n], ...``; ECE is the bin-size weighted mean of
    ``|accuracy - mean confidence|`` over non-empty bins.

    Args:
        probs: ``(N, C)`` class probabilities (rows sum to 1): pass ``logits.softmax(-1)``, not logits.
        labels: ``(N,)`` true class indices.
        n_bins: Number of equal-width confidence bins.

    Returns:
        ECE as a fraction in ``[0, 1]``.

    Raises:
        ValueError: If ``probs`` are not probabilities (e.g. logits were passed).
    """
    _check_logits(probs, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs = probs.detach().double().cpu()
    ones = torch.ones(len(probs), dtype=probs.dtype)
    if float(probs.min()) < 0 or not torch.allclose(probs.sum(-1), ones, atol=1e-3):
        raise ValueError("probs must be probabilities with rows summing to 1 (apply softmax to logits first)")
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels.cpu()).double()
    inner = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:-1]
    bins = torch.bucketize(conf, inner)  # bin b holds conf in (b/n, (b+1)/n]
    count = torch.bincount(bins, minlength=n_bins).double()
    gap = torch.bincount(bins, weights=correct - conf, minlength=n_bins)  # sum of (acc - conf) per bin
    return float(gap.abs().sum() / count.sum())


def classification_metrics(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, Any]:
    """Accuracy, calibration and likelihood of one classifier.

    Args:
        logits: ``(N, C)`` logits.
        labels: ``(N,)`` true class indices.
        n_bins: Confidence bins for the ECE.

    Returns:
        ``{"top1", "top5" (only when C > 5), "ece", "nll", "num_samples"}``; accuracies and ECE as
        fractions, ``nll`` the mean cross-entropy in nats.
    """
    _check_logits(logits, labels)
    logits, labels = logits.detach().float().cpu(), labels.long().cpu()
    out: dict[str, Any] = {"top1": topk_accuracy(logits, labels, 1)}
    if logits.shape[1] > 5:
        out["top5"] = topk_accuracy(logits, labels, 5)
    out["ece"] = expected_calibration_error(logits.softmax(-1), labels, n_bins)
    out["nll"] = float(F.cross_entropy(logits, labels))
    out["num_samples"] = int(labels.numel())
    return out


# ---------------------------------------------------------------------------------------------- cost
@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own flag (mixed modes survive)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _param_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def flops_per_image(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on one image, as counted by ``torch.utils.flop_counter``.

    Counts matmuls, convolutions and attention at 2 FLOPs per multiply-accumulate (torch's
    convention, as in DeiT's Table 1 "FLOPs" being ~2x the MACs of fvcore). Elementwise ops, norms and
    softmax are not counted. Attention runs on the math SDPA backend while counting, so the count is
    the same on CPU and GPU and with every torch version (fused kernels are not registered in older
    counters).

    Args:
        model: Any module taking ``(B, *input_shape)``; evaluated in eval mode under ``no_grad`` on its
            own device. Its train/eval flags are restored afterwards.
        input_shape: ``(C, H, W)`` of one image.

    Returns:
        FLOPs per image.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device, dtype = _param_device_dtype(model)
    x = torch.zeros(1, *input_shape, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with _eval_mode(model), torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_calls(call: Callable[[Any], Any], x: Any, n: int, device: torch.device | None = None) -> list[float]:
    """Wall-clock seconds of ``n`` calls ``call(x)``, each synchronised with ``device`` (a GPU's queued kernels)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call(x)
        if device is not None:
            _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def measure_calls(call: Callable[[Any], Any], batch: Any, single: Any, *, iters: int, warmup: int = 5,
                  device: torch.device | None = None) -> dict[str, float]:
    """Throughput and batch-1 latency of any callable (a model, an onnxruntime session's ``run``), one statistic.

    Throughput is ``len(batch) * iters / total time`` of ``iters`` calls on ``batch``; latency the median of
    ``iters`` calls on ``single`` (one image); each after ``warmup`` untimed calls.

    Args:
        call: takes ``batch`` or ``single`` (a tensor, an array: whatever it runs on).
        batch: a batch of inputs (``len`` is its image count).
        single: a batch of one input.
        iters: timed calls for each of the two measurements.
        warmup: untimed calls before each measurement.
        device: synchronised after every call when it is a GPU.

    Returns:
        ``{"images_per_sec", "latency_ms_batch1"}``.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1, warmup >= 0; got {iters}, {warmup}")
    _timed_calls(call, batch, warmup, device)
    images_per_sec = len(batch) * iters / sum(_timed_calls(call, batch, iters, device))
    _timed_calls(call, single, warmup, device)
    latency_ms = 1000 * statistics.median(_timed_calls(call, single, iters, device))
    return {"images_per_sec": float(images_per_sec), "latency_ms_batch1": float(latency_ms)}


def measure_throughput(model: nn.Module, input_shape: Sequence[int], *, batch_size: int, iters: int,
                       device: str | torch.device, warmup: int = 5) -> dict[str, Any]:
    """Throughput: mean images/s over `iters` batches and median batch-1 latency, after `warmup` untimed calls.

    Both timings run in eval mode under ``torch.inference_mode`` in the model's own dtype, on random
    inputs, with ``torch.cuda.synchronize`` after every call on a GPU (so queued kernels are timed).
    Throughput is ``batch_size * iters / total time`` (DeiT Table 1 / Figure 1 measure it the same way,
    with the largest batch that fits); latency is the median of ``iters`` single-image calls. The model
    is moved to ``device`` for the measurement and back afterwards, and its train/eval flags restored.

    Args:
        model: The classifier to time.
        input_shape: ``(C, H, W)`` of one image.
        batch_size: Images per call for the throughput timing.
        iters: Timed calls for each of the two measurements.
        device: Where to run, e.g. ``"cpu"`` or ``"cuda:0"``.
        warmup: Untimed calls before each measurement (allocator, cuDNN autotuning, caches).

    Returns:
        ``{"images_per_sec", "latency_ms_batch1", "method"}``; ``method`` is a sentence stating how the
        numbers were measured (warm-up, iterations, batch size, device, statistic).
    """
    if batch_size < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, iters >= 1, warmup >= 0; got {batch_size}, {iters}, {warmup}")
    device = torch.device(device)
    home, dtype = _param_device_dtype(model)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(batch_size, *input_shape, generator=gen).to(device=device, dtype=dtype)
    single = batch[:1].clone()
    model.to(device)
    try:
        with _eval_mode(model), torch.inference_mode():
            speed = measure_calls(model, batch, single, iters=iters, warmup=warmup, device=device)
    finally:
        model.to(home)
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    method = (f"{warmup} warm-up calls, then mean images/s over {iters} batches of {batch_size} and median "
              f"latency over {iters} batch-1 calls; eval mode, torch.inference_mode, "
              f"{str(dtype).removeprefix('torch.')}, random inputs, device {device}{threads}"
              + (", CUDA synchronised per call" if device.type == "cuda" else ""))
    return {**speed, "method": method}


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def interleaved_rounds(measures: Mapping[str, Callable[[], Mapping[str, Any]]], *, rounds: int,
                       keys: Sequence[str] = ("images_per_sec", "latency_ms_batch1"), reference: str | None = None,
                       ratio_key: str = "images_per_sec") -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Run each measurement once per round, the order reversed every other round; median and spread over rounds.

    A machine that slows down or speeds up hits every side alike; a ratio to ``reference`` is computed within each
    round (same moment, same load) and summarised over rounds.

    Args:
        measures: name -> a function that measures once and returns at least ``keys``.
        rounds: how many rounds.
        keys: the figures summarised.
        reference: the side the others' ``ratio_key`` is divided by (None: no ratios).
        ratio_key: the figure of the ratios (higher is faster).

    Returns:
        ``(summary, per_round)``: ``summary[name]`` holds each key's median with ``<key>_min`` and ``<key>_max``, and
        ``speedup_vs_<reference>`` (with ``_min``, ``_max``); ``per_round`` the raw results of each round.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    per_round: list[dict[str, Any]] = []
    for r in range(rounds):
        order = list(measures) if r % 2 == 0 else list(reversed(list(measures)))
        per_round.append({name: measures[name]() for name in order})
    out: dict[str, dict[str, float]] = {}
    for name in measures:
        row: dict[str, float] = {}
        for key in keys:
            stats = _spread([rnd[name][key] for rnd in per_round])
            row.update({key: stats["median"], f"{key}_min": stats["min"], f"{key}_max": stats["max"]})
        if reference is not None and reference in measures:
            stats = _spread([rnd[name][ratio_key] / rnd[reference][ratio_key] for rnd in per_round])
            row.update({f"speedup_vs_{reference}": stats["median"], f"speedup_vs_{reference}_min": stats["min"],
                        f"speedup_vs_{reference}_max": stats["max"]})
        out[name] = row
    return out, per_round


def interleaved_speed(models: Mapping[str, nn.Module], input_shape: Sequence[int], *, batch_size: int, iters: int,
                      rounds: int, device: str | torch.device, reference: str = "teacher") -> dict[str, Any]:
    """Throughput and latency of several models, measured in interleaved rounds (median and spread).

    One round times every model once (:func:`measure_throughput`), in order; ``rounds`` rounds alternate the
    models (:func:`interleaved_rounds`), so a machine that slows down or speeds up hits them alike. A speed
    *ratio* to ``reference`` is computed within each round (same moment, same load) and summarised over rounds.

    Returns:
        ``{name: {"images_per_sec", "images_per_sec_min", "images_per_sec_max", "latency_ms_batch1",
        "latency_ms_batch1_min", "latency_ms_batch1_max", "speedup_vs_<reference>", "_min", "_max"}, ...,
        "method": str}``: medians over rounds, with the extremes.
    """
    def measure(name: str) -> Callable[[], dict[str, Any]]:
        return lambda: measure_throughput(models[name], input_shape, batch_size=batch_size, iters=iters, device=device)

    summary, per_round = interleaved_rounds({name: measure(name) for name in models}, rounds=rounds,
                                            reference=reference)
    out: dict[str, Any] = dict(summary)
    first = next(iter(per_round[0].values()))["method"]
    out["method"] = (f"{rounds} interleaved rounds (the models' order reversed every other round); median over rounds, "
                     f"with min and max; speed-ups computed within each round. Each measurement: {first}")
    return out


# ------------------------------------------------------------------------------------- statistics
# (the torch-free ones live in distill/stats.py and are re-exported here)
def paired_counts(correct_a: Tensor, correct_b: Tensor) -> tuple[int, int, int, int]:
    """The paired 2x2 table of two models on the same images: ``(both right, only a, only b, both wrong)``."""
    a, b = correct_a.bool().reshape(-1), correct_b.bool().reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired correctness vectors differ in length: {a.numel()} and {b.numel()}")
    return (int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum()))


def paired_accuracy_interval(correct_a: Tensor, correct_b: Tensor,
                             confidence: float = 0.95) -> tuple[float, float, float]:
    """Accuracy of ``a`` minus that of ``b`` on the same images, with Newcombe's paired score interval.

    The interval is the test set's sampling error, for one run (seeds add their own): the images are a sample,
    the two models are fixed. :func:`newcombe_paired_interval` on the paired table of the two correctness vectors.

    Returns:
        ``(difference, low, high)`` as fractions.
    """
    return newcombe_paired_interval(*paired_counts(correct_a, correct_b), confidence=confidence)
