"""Figures of the evaluate stage, written as PNG files (DVC plots, MLflow artifacts).

* :func:`plot_training_curves`: train loss and validation accuracy per epoch, one line per model.
* :func:`plot_confusion_matrix`: the student's errors by class.
* :func:`plot_accuracy_vs_throughput`: DeiT's Figure 1 (Touvron et al. 2021): top-1 against images/s,
  marker area proportional to parameters.
* :func:`plot_head_agreement`: DeiT's Table 4 as a picture: how often class head, distillation head,
  their fusion, the teacher and the ground truth agree, plus each predictor's accuracy.
* :func:`plot_seed_summary`: per-model mean ± std over seeds, every seed shown as a dot.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, never through
``pyplot``: no global backend is selected or changed, no figure is left open, and it is thread-safe.
Every file is written atomically; parent folders are created.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from distill.io import atomic_write_bytes
from distill.report import format_count

__all__ = ["plot_training_curves", "plot_confusion_matrix", "plot_accuracy_vs_throughput", "plot_head_agreement",
           "plot_seed_summary"]

DPI = 120
MODEL_COLORS = {"teacher": "tab:blue", "baseline": "tab:orange", "student": "tab:green"}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _color(name: str, i: int) -> str:
    return MODEL_COLORS.get(name, f"C{i + 3}")


def _annotate_matrix(ax: Any, values: np.ndarray, fmt: str) -> None:
    """Write each cell's value, white on dark cells."""
    top = values.max() if values.size else 0
    for (r, c), v in np.ndenumerate(values):
        ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=8,
                color="white" if top and v > 0.6 * top else "black")


# ------------------------------------------------------------------------------------ training curves
def plot_training_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """Train loss and validation accuracy per epoch, one line per model.

    Args:
        histories: ``{model name: rows}``, each row a per-epoch record with ``epoch``, ``train_loss`` and
            ``val_acc`` (fraction), as read from ``plots/<stage>.csv``. Models with no rows are skipped.
        path: Where to write the PNG.

    Returns:
        ``path``.
    """
    fig = _new_figure(10, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for i, (name, rows) in enumerate(histories.items()):
        if not rows:
            continue
        epochs = [r.get("epoch", j + 1) for j, r in enumerate(rows)]
        for ax, key, scale in ((ax_loss, "train_loss", 1.0), (ax_acc, "val_acc", 100.0)):
            pts = [(e, r[key] * scale) for e, r in zip(epochs, rows) if key in r]
            if pts:
                ax.plot(*zip(*pts), label=name, color=_color(name, i), marker="." if len(pts) < 30 else None)
    ax_loss.set(title="Training loss", xlabel="epoch", ylabel="train loss")
    ax_acc.set(title="Validation accuracy", xlabel="epoch", ylabel="top-1 (%)")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    return _save(fig, path)


# ---------------------------------------------------------------------------------- confusion matrix
def plot_confusion_matrix(cm: Tensor | np.ndarray, class_names: Sequence[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    """Heat map of a confusion matrix, counts written in the cells when there are at most 20 classes.

    Args:
        cm: ``(C, C)`` counts, rows true classes, columns predictions (see
            :func:`distill.evaluation.confusion_matrix`).
        class_names: ``C`` names for the axes (tick labels are dropped above 40 classes).
        path: Where to write the PNG.
        title: Figure title.

    Returns:
        ``path``.
    """
    counts = np.asarray(cm.cpu() if isinstance(cm, Tensor) else cm)
    n = counts.shape[0]
    if counts.shape != (n, n) or len(class_names) != n:
        raise ValueError(f"confusion matrix {counts.shape} does not match {len(class_names)} class names")
    side = min(max(4.0, 0.45 * n + 2), 14.0)
    fig = _new_figure(side + 1, side)
    ax = fig.subplots()
    im = ax.imshow(counts, cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8, label="images")
    if n <= 20:
        _annotate_matrix(ax, counts, "d" if np.issubdtype(counts.dtype, np.integer) else ".0f")
    if n <= 40:
        ax.set_xticks(range(n), [str(c) for c in class_names], rotation=45 if n > 10 else 0,
                      ha="right" if n > 10 else "center")
        ax.set_yticks(range(n), [str(c) for c in class_names])
    total = counts.sum()
    acc = np.trace(counts) / total * 100 if total else float("nan")
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}\n{int(total)} images, top-1 {acc:.2f} %")
    return _save(fig, path)


# ------------------------------------------------------------------------------ accuracy vs throughput
def plot_accuracy_vs_throughput(points: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Top-1 accuracy against throughput, DeiT Figure 1 style.

    Args:
        points: One dict per model with ``name``, ``top1`` (fraction), ``images_per_sec`` and
            optionally ``params`` (marker area grows with it).
        path: Where to write the PNG.

    Returns:
        ``path``. The x axis is logarithmic when the throughputs span more than a factor of 10.
    """
    fig = _new_figure(6.5, 4.5)
    ax = fig.subplots()
    params = [p.get("params") or 0 for p in points]
    largest = max(params, default=0) or 1
    for i, (p, n_params) in enumerate(zip(points, params)):
        size = 60 + 900 * math.sqrt(n_params / largest) if n_params else 80
        ax.scatter(p["images_per_sec"], p["top1"] * 100, s=size, color=_color(p["name"], i), alpha=0.7,
                   edgecolors="black", linewidths=0.8, zorder=3)
        label = f"{p['name']}\n{format_count(n_params)} params" if n_params else p["name"]
        ax.annotate(label, (p["images_per_sec"], p["top1"] * 100), textcoords="offset points", xytext=(10, 6),
                    fontsize=9)
    speeds = [p["images_per_sec"] for p in points if p["images_per_sec"] > 0]
    if speeds and max(speeds) / min(speeds) > 10:
        ax.set_xscale("log")
    ax.margins(x=0.25, y=0.25)
    ax.grid(alpha=0.3, zorder=0)
    ax.set(xlabel="throughput (images/s)", ylabel="top-1 accuracy (%)",
           title="Accuracy vs throughput (marker area ~ parameters)")
    return _save(fig, path)


# ----------------------------------------------------------------------------------- head agreement
def _pred_agreement(preds: Sequence[Tensor]) -> np.ndarray:
    """``[i, j]`` = share of samples (in %) where predictors i and j output the same class."""
    stacked = torch.stack([p.reshape(-1).cpu().long() for p in preds])  # (K, N)
    return (stacked[:, None, :] == stacked[None, :, :]).double().mean(-1).numpy() * 100


def plot_head_agreement(cls_logits: Tensor, dist_logits: Tensor | None, teacher_logits: Tensor, labels: Tensor,
                        path: str | Path) -> Path:
    """DeiT Table 4 as a figure: agreement between ground truth, teacher and the student's heads.

    Left: a matrix of the share of test images on which two predictors give the same class; the
    "ground truth" row is each predictor's accuracy. Right: those accuracies as bars. DeiT reads this
    as how much the distillation head behaves like the teacher versus like the class head.

    Args:
        cls_logits: ``(N, C)`` student class-head logits.
        dist_logits: ``(N, C)`` student distillation-head logits, or None for a student without one.
        teacher_logits: ``(N, C)`` teacher logits.
        labels: ``(N,)`` true classes.
        path: Where to write the PNG.

    Returns:
        ``path``.
    """
    preds = {"ground truth": labels, "teacher": teacher_logits.argmax(-1), "class head": cls_logits.argmax(-1)}
    if dist_logits is not None:
        preds["dist. head"] = dist_logits.argmax(-1)
        preds["class+dist."] = (cls_logits.float() + dist_logits.float()).argmax(-1)
    names = list(preds)
    matrix = _pred_agreement(list(preds.values()))
    fig = _new_figure(10, 4.2)
    ax_m, ax_b = fig.subplots(1, 2, width_ratios=[1.3, 1])
    ax_m.imshow(matrix, cmap="Greens", vmin=min(50.0, float(matrix.min())), vmax=100)
    _annotate_matrix(ax_m, matrix, ".1f")
    ax_m.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax_m.set_yticks(range(len(names)), names)
    ax_m.set_title(f"Agreement (% of {labels.numel()} test images)")
    accs = matrix[0, 1:]
    bars = ax_b.barh(names[1:], accs, color=["tab:blue"] + ["tab:green"] * (len(accs) - 1))
    ax_b.bar_label(bars, fmt="%.2f", padding=3, fontsize=9)
    ax_b.invert_yaxis()
    ax_b.set_xlim(max(0.0, float(accs.min()) - 10), 100 + 0.12 * (100 - max(0.0, float(accs.min()) - 10)))
    ax_b.set(xlabel="top-1 accuracy (%)", title="Accuracy of each predictor")
    ax_b.grid(axis="x", alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------------------------- seed summary
def plot_seed_summary(aggregated: Mapping[str, Mapping[str, Any]], path: str | Path, *, metric: str = "top1",
                      models: Sequence[str] | None = None) -> Path:
    """Per-model mean ± std of one metric over seeds, each seed's value drawn as a dot.

    Args:
        aggregated: Output of :func:`distill.evaluation.aggregate_runs` over several runs'
            ``metrics/evaluate.json`` (keys like ``"student.top1"``).
        path: Where to write the PNG.
        metric: The per-model metric to show; accuracy-like metrics (fractions) are drawn in %.
        models: Models to show, in order; default: every ``<model>.<metric>`` key present.

    Returns:
        ``path``.
    """
    if models is None:
        models = [k[: -len(metric) - 1] for k in aggregated if k.endswith(f".{metric}") and k.count(".") == 1]
    rows = [(m, aggregated[f"{m}.{metric}"]) for m in models if f"{m}.{metric}" in aggregated]
    if not rows:
        raise ValueError(f"no '<model>.{metric}' entries in the aggregated metrics")
    scale = 100.0 if metric.startswith(("top", "agreement", "ece")) else 1.0
    fig = _new_figure(1.6 * len(rows) + 2.5, 4)
    ax = fig.subplots()
    for i, (name, agg) in enumerate(rows):
        ax.bar(i, agg["mean"] * scale, yerr=agg["std"] * scale, capsize=6, color=_color(name, i), alpha=0.6)
        ax.scatter([i] * len(agg["values"]), [v * scale for v in agg["values"]], color="black", s=12, zorder=3)
        top = max(max(agg["values"]), agg["mean"] + agg["std"]) * scale  # label above bar, error bar and dots
        ax.annotate(f"{agg['mean'] * scale:.2f} ± {agg['std'] * scale:.2f}", (i, top),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=9)
    lows = [min(agg["values"]) * scale - agg["std"] * scale for _, agg in rows]
    highs = [max(agg["values"]) * scale + agg["std"] * scale for _, agg in rows]
    pad = 0.15 * (max(highs) - min(lows)) or 1.0
    ax.set_ylim(min(lows) - pad, max(highs) + 2 * pad)
    ax.set_xticks(range(len(rows)), [m for m, _ in rows])
    n = max(agg["n"] for _, agg in rows)
    ax.set(ylabel=f"{metric} (%)" if scale == 100 else metric, title=f"{metric}: mean ± std over {n} seeds")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
