"""The evaluate stage: teacher, baseline and distilled student side by side on the test split.

Answers the two questions of a distillation run, in DeiT's terms (Touvron et al. 2021, Tables 1 and 4,
Figure 1): what distillation bought (student against the labels-only baseline, same recipe and budget) and
what the student costs next to its teacher (parameters, FLOPs, throughput, latency). Accuracy comes with the
test set's own 95 % interval (one run; ``python -m flows seeds`` gives the interval over seeds), speed with
the median and spread of interleaved rounds.

Writes ``metrics/evaluate.json`` (DVC metrics), ``reports/results.md``, ``reports/figures/*.png`` and the
student as a servable MLflow model (``models/student_mlflow``: raw uint8 images in, class probabilities out),
then logs them to MLflow and registers the student in the model registry. It reads only
``evaluate.*``: what each model trained on and for how long comes from the checkpoints themselves.

The registry's quality gate (:mod:`distill.registry`): the student can become ``@champion`` only if it beats
the labels-only baseline of this run. The metrics (``champion_gate``) and the report say whether it does; the
registry's verdict, which also compares with the dataset's current champion, goes to the run's tags
(``registry.alias``, ``registry.reason``) and to one line on the terminal when the student is not promoted.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from distill import evaluation as E
from distill import plots as P
from distill import report as R
from distill.augment import eval_augmenter
from distill.config import ParamsView, Paths, flatten
from distill.data import ArrayDataset, DatasetMeta, load_prepared
from distill.inference import predict
from distill.io import atomic_write_json, atomic_write_text
from distill.models.deit import load_deit
from distill.registry import Score, gate_verdict, log_and_register_student, promotion_note
from distill.runtime import make_accelerator
from distill.serving import save_servable
from distill.teachers import load_teacher
from distill.tracking import NO_TRACKING, Tracker

__all__ = ["run", "read_curves"]

MODELS = ("teacher", "baseline", "student")


def read_curves(path: Path) -> list[dict[str, float]]:
    """A training stage's per-epoch CSV (``plots/<stage>.csv``)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _heads(model: nn.Module) -> Any:
    """A forward that returns every head separately (DeiT: (cls, dist); others: the logits)."""
    if hasattr(model, "forward_heads"):
        def fwd(x: Tensor) -> Any:
            cls, dist = model.forward_heads(x)
            return (cls,) if dist is None else (cls, dist)
        return fwd
    return lambda x: (model(x),)


def _load_models(paths: Paths, meta: DatasetMeta) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """The three models and their checkpoints' metadata; a model trained on other data is an error."""
    models: dict[str, nn.Module] = {}
    infos: dict[str, dict[str, Any]] = {}
    models["teacher"], infos["teacher"] = load_teacher(paths.model("teacher"), meta)
    for name in ("baseline", "student"):
        models[name], infos[name] = load_deit(paths.model(name))
    for name, info in infos.items():
        if info["extra"].get("data_fingerprint") not in (None, meta.fingerprint):
            raise ValueError(f"{paths.model(name)} was trained on other data (fingerprint mismatch); rerun `dvc repro`")
    return models, infos


def _accuracy(outputs: dict[str, tuple[Tensor, ...]], labels: Tensor, ece_bins: int) -> dict[str, Any]:
    """Accuracy, calibration, agreement and the gain and gap, each with the test set's 95 % interval."""
    logits = {n: (o[0] + o[1]) / 2 if len(o) == 2 else o[0] for n, o in outputs.items()}
    correct = {n: lg.argmax(-1) == labels for n, lg in logits.items()}
    metrics: dict[str, Any] = {}
    for name in MODELS:
        m = E.classification_metrics(logits[name], labels, n_bins=ece_bins)
        m["top1_ci95"] = list(E.wilson_interval(int(correct[name].sum()), labels.numel()))
        if name != "teacher":
            m["agreement_with_teacher"] = E.agreement(logits[name], logits["teacher"])
        metrics[name] = m
    s_cls, s_dist = outputs["student"][0], outputs["student"][-1]
    metrics["student"].update({
        "top1_cls_head": E.topk_accuracy(s_cls, labels, 1), "top1_dist_head": E.topk_accuracy(s_dist, labels, 1),
        "agreement_cls_dist": E.agreement(s_cls, s_dist),
        "agreement_cls_teacher": E.agreement(s_cls, logits["teacher"]),
        "agreement_dist_teacher": E.agreement(s_dist, logits["teacher"])})
    gain, gain_lo, gain_hi = E.paired_accuracy_interval(correct["student"], correct["baseline"])
    gap, gap_lo, gap_hi = E.paired_accuracy_interval(correct["teacher"], correct["student"])
    metrics.update(distillation_gain=gain, distillation_gain_ci95=[gain_lo, gain_hi], gap_to_teacher=gap,
                   gap_to_teacher_ci95=[gap_lo, gap_hi], num_test=int(labels.numel()))
    return metrics


def _cost(models: dict[str, nn.Module], meta: DatasetMeta, ep: ParamsView, device: str) -> dict[str, Any]:
    """Parameters, FLOPs and interleaved speed of each model."""
    shape = (meta.channels, meta.image_size, meta.image_size)
    speed = E.interleaved_speed(models, shape, batch_size=ep.throughput_batch_size, iters=ep.throughput_iters,
                                rounds=ep.throughput_rounds, device=device)
    out: dict[str, Any] = {"throughput_method": speed.pop("method")}
    for name, model in models.items():
        out[name] = {"params": E.count_parameters(model), "flops_per_image": E.flops_per_image(model, shape),
                     **speed[name]}
    return out


def _training(infos: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What each model trained on and for how long, from its checkpoint (epochs, steps, images)."""
    out = {}
    for name, info in infos.items():
        extra, summary = info["extra"], info["extra"].get("metrics", {})
        out[name] = {k: summary[k] for k in ("epochs", "steps", "warmup_steps") if k in summary}
        kept = ("train_images", "labeled_images", "samples_per_epoch", "budget", "used_as_is")
        out[name].update({k: extra[k] for k in kept if k in extra})
    return out


def _figures(paths: Paths, metrics: dict[str, Any], outputs: dict[str, tuple[Tensor, ...]], labels: Tensor,
             meta: DatasetMeta) -> list[Path]:
    figures = paths.reports / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    logits = {n: (o[0] + o[1]) / 2 if len(o) == 2 else o[0] for n, o in outputs.items()}
    s_cls, s_dist = outputs["student"][0], outputs["student"][-1]
    return [
        P.plot_training_curves({n: read_curves(paths.curves(n)) for n in MODELS}, figures / "training_curves.png"),
        P.plot_confusion_matrix(E.confusion_matrix(logits["student"].argmax(-1), labels, meta.num_classes),
                                meta.class_names, figures / "confusion_student.png",
                                "Student (DeiT, distilled) confusion matrix"),
        P.plot_accuracy_vs_throughput([{"name": n, "top1": metrics[n]["top1"], "params": metrics[n]["params"],
                                        "images_per_sec": metrics[n]["images_per_sec"]} for n in MODELS],
                                      figures / "accuracy_vs_throughput.png"),
        P.plot_head_agreement(s_cls, s_dist, logits["teacher"], labels, figures / "head_agreement.png"),
    ]


def _gate_note(passes: bool, reason: str) -> str:
    """The report's line on the registry's quality gate."""
    verdict = "may become" if passes else "will not become"
    return (f"\nModel registry: the student {verdict} `@champion` ({reason}); the registry also requires it to beat "
            "the dataset's current champion.\n")


def _register(tracker: Tracker, paths: Paths, model_name: str, score: Score) -> dict[str, Any]:
    """Log and register the servable student; one line on the terminal when it is not made champion."""
    result = log_and_register_student(tracker, paths.served_model, model_name=model_name, score=score)
    note = promotion_note(result)
    if note:
        print(f"[evaluate] {note}", file=sys.stderr, flush=True)
    return result


def run(params: ParamsView, paths: Paths, tracker: Tracker = NO_TRACKING) -> dict[str, Any]:
    """Evaluate the three models; write metrics, figures and the report; register the student."""
    ep = params.evaluate
    data = load_prepared(paths.data)
    meta = data.meta
    accelerator = make_accelerator()
    augmenter = eval_augmenter(meta.image_size, meta.mean, meta.std)
    loader = accelerator.prepare(DataLoader(ArrayDataset(data.test), batch_size=ep.batch_size, shuffle=False))
    models, infos = _load_models(paths, meta)
    outputs: dict[str, tuple[Tensor, ...]] = {}
    labels = torch.empty(0, dtype=torch.long)
    for name, model in models.items():
        res = predict(_heads(model.to(accelerator.device).eval()), loader, accelerator, augmenter)
        outputs[name], labels = res["outputs"], res["labels"]
    metrics = _accuracy(outputs, labels, ep.ece_bins)
    cost = _cost(models, meta, ep, str(accelerator.device))
    for name in MODELS:
        metrics[name].update(cost[name])
    score = Score(metric=metrics["student"]["top1"], dataset_key=f"{meta.fingerprint}:test",
                  baseline=metrics["baseline"]["top1"])
    passes, reason = gate_verdict(score)
    metrics.update(throughput_method=cost["throughput_method"], device=str(accelerator.device),
                   training=_training(infos), champion_gate={"passed": passes, "reason": reason})
    if accelerator.is_main_process:
        atomic_write_json(paths.metrics("evaluate"), metrics)
        figures = _figures(paths, metrics, outputs, labels, meta)
        report = paths.reports / "results.md"
        atomic_write_text(report, R.results_report(metrics, dataset=meta.label) + _gate_note(passes, reason))
        tracker.log_metrics({k: v for k, v in flatten(metrics).items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for figure in figures:
            tracker.log_artifact(figure, "figures")
        tracker.log_artifact(report)
        save_servable(paths.model("student"), paths.served_model)  # a DVC output: servable without MLflow's store
        tracker.flush()  # the metrics are sent (or the tracker found the server gone) before the registry
        if ep.register_model:
            metrics["registry"] = _register(tracker, paths, ep.model_name, score)
    accelerator.wait_for_everyone()
    return metrics
