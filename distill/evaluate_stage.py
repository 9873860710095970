"""The evaluate stage: teacher, baseline and distilled student side by side on the test split.

Answers the two questions a user asks of a distillation run, in DeiT's terms (Touvron et al. 2021,
Tables 1 & 4, Figure 1): what distillation bought (student vs baseline, same recipe and budget) and
what the student costs compared with the teacher (parameters, FLOPs, throughput, latency).

Writes ``metrics/evaluate.json`` (DVC metrics), ``reports/results.md`` and ``reports/figures/*.png``
(DVC plots), logs them all to MLflow, and registers the student in the model registry.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from distill.checkpoint import atomic_write_json, atomic_write_text, load_model
from distill.config import Params
from distill.tracking import NullTracker, Tracker

__all__ = ["evaluate_all", "read_curves"]


def read_curves(path: Path) -> list[dict[str, float]]:
    """Read a stage's per-epoch CSV (``plots/<stage>.csv``)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _heads(model: torch.nn.Module) -> Any:
    """Forward returning every head separately (DeiT: (cls, dist); others: the logits)."""
    if hasattr(model, "forward_heads"):
        def fwd(x: torch.Tensor) -> Any:
            cls, dist = model.forward_heads(x)
            return (cls,) if dist is None else (cls, dist)
        return fwd
    return lambda x: (model(x),)


def evaluate_all(params: Params, paths: Any, tracker: Tracker = NullTracker()) -> dict[str, Any]:
    """Evaluate teacher, baseline and student; write metrics, plots, report; register the student."""
    from distill import evaluation as E
    from distill import plots as P
    from distill import report as R
    from distill.data import ArrayDataset, Augmenter, AugmentSpec, load_prepared
    from distill.engine import make_accelerator, predict
    from distill.stages import load_teacher

    ep = params.evaluate
    data = load_prepared(paths.data)
    meta = data.meta
    accelerator = make_accelerator()
    augmenter = Augmenter(spec=AugmentSpec(), out_size=meta.image_size, mean=meta.mean, std=meta.std)
    loader = accelerator.prepare(DataLoader(ArrayDataset(data.test), batch_size=ep.batch_size, shuffle=False))
    input_shape = (meta.channels, meta.image_size, meta.image_size)

    teacher, _ = load_teacher(paths, meta)
    models: dict[str, torch.nn.Module] = {"teacher": teacher}
    for name in ("baseline", "student"):
        models[name], info = load_model(paths.model(name))
        if info["extra"].get("data_fingerprint") not in (None, meta.fingerprint):
            raise ValueError(f"{paths.model(name)} was trained on other data (fingerprint mismatch); rerun `dvc repro`")

    outputs: dict[str, tuple[torch.Tensor, ...]] = {}
    labels = None
    for name, model in models.items():
        model.to(accelerator.device).eval()
        res = predict(_heads(model), loader, accelerator, augmenter)
        outputs[name] = res["outputs"]
        labels = res["labels"]
    assert labels is not None

    logits = {n: (o[0] + o[1]) / 2 if len(o) == 2 else o[0] for n, o in outputs.items()}
    metrics: dict[str, Any] = {}
    device = str(accelerator.device)
    method = ""
    for name, model in models.items():
        m = E.classification_metrics(logits[name], labels, n_bins=ep.ece_bins)
        m["params"] = E.count_parameters(model)
        m["flops_per_image"] = E.flops_per_image(model, input_shape)
        speed = E.measure_throughput(model, input_shape, batch_size=ep.throughput_batch_size, iters=ep.throughput_iters,
                                     device=device)
        m.update({k: v for k, v in speed.items() if isinstance(v, (int, float))})
        method = speed["method"]  # the same method for every model
        metrics[name] = m
        if name != "teacher":
            metrics[name]["agreement_with_teacher"] = E.agreement(logits[name], logits["teacher"])
    s_cls, s_dist = outputs["student"][0], outputs["student"][1]
    metrics["student"].update({
        "top1_cls_head": E.topk_accuracy(s_cls, labels, 1),
        "top1_dist_head": E.topk_accuracy(s_dist, labels, 1),
        "agreement_cls_dist": E.agreement(s_cls, s_dist),
        "agreement_cls_teacher": E.agreement(s_cls, logits["teacher"]),
        "agreement_dist_teacher": E.agreement(s_dist, logits["teacher"]),
    })
    metrics["distillation_gain"] = metrics["student"]["top1"] - metrics["baseline"]["top1"]
    metrics["gap_to_teacher"] = metrics["teacher"]["top1"] - metrics["student"]["top1"]
    metrics["num_test"] = int(labels.numel())
    metrics["device"] = device
    metrics["throughput_method"] = method

    figures = paths.reports / "figures"
    report_md = paths.reports / "results.md"
    if accelerator.is_main_process:
        atomic_write_json(paths.metrics("evaluate"), metrics)
        figures.mkdir(parents=True, exist_ok=True)
        histories = {n: read_curves(paths.curves(n)) for n in ("teacher", "baseline", "student")}
        figs = [
            P.plot_training_curves(histories, figures / "training_curves.png"),
            P.plot_confusion_matrix(E.confusion_matrix(logits["student"].argmax(-1), labels, meta.num_classes),
                                    meta.class_names, figures / "confusion_student.png", "Student (DeiT, distilled) confusion matrix"),
            P.plot_accuracy_vs_throughput(
                [{"name": n, "top1": metrics[n]["top1"], "images_per_sec": metrics[n]["images_per_sec"],
                  "params": metrics[n]["params"]} for n in models],
                figures / "accuracy_vs_throughput.png"),
            P.plot_head_agreement(s_cls, s_dist, logits["teacher"], labels, figures / "head_agreement.png"),
        ]
        rows = [{"name": n, **metrics[n]} for n in ("teacher", "baseline", "student")]
        rows += [{"name": "student (cls head)", "top1": metrics["student"]["top1_cls_head"]},
                 {"name": "student (dist head)", "top1": metrics["student"]["top1_dist_head"]}]
        trained_on = _training_data_sentence(params, meta.sizes["train"], meta.sizes.get("unlabeled", 0))
        text = (f"# Results on the {meta.name} test split ({metrics['num_test']} images)\n\n" + R.results_table(rows)
                + "\n\n" + R.distillation_summary(metrics) + f"\n\n{trained_on}\n\n"
                + f"Throughput: {metrics['throughput_method']}\n")
        atomic_write_text(report_md, text)

        from distill.tracking import flatten

        tracker.log_metrics({k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float))})
        for f in figs:
            tracker.log_artifact(f, "figures")
        tracker.log_artifact(report_md)
        tracker.flush()  # the metrics are sent (or the tracker found the server gone) before the registry
        run_id = getattr(tracker, "run_id", None)
        # A tracking server gone mid-stage (tracker offline, docs/reliability.md): no registry, the stage goes on.
        if ep.register_model and run_id and not getattr(tracker, "offline", False):
            from distill.registry import register_student

            tracker.log_artifact(paths.model("student"), "student_model")
            reg = register_student(run_id=run_id, artifact_path="student_model", model_name=ep.model_name,
                                   metric=metrics["student"]["top1"],
                                   dataset_key=f"{meta.fingerprint}:test")
            tracker.set_tags({"registry.version": str(reg.get("version")), "registry.alias": str(reg.get("alias"))})
            metrics["registry"] = reg
    accelerator.wait_for_everyone()
    return metrics


def _training_data_sentence(params: Params, n_labeled: int, n_unlabeled: int) -> str:
    """What the models trained on, for the report (the unlabeled transfer set and the baseline's budget)."""
    from distill.stages import baseline_recipe

    if not n_unlabeled or params.student.distillation == "none":
        return f"Training data: {n_labeled} labeled images."
    epochs, base = params.student.train.epochs, baseline_recipe(params, n_labeled, n_labeled + n_unlabeled).epochs
    budget = (f"The baseline trained {base} epochs to the student's {epochs}, for as many optimizer steps "
              "(`baseline.budget: steps`)." if base != epochs else
              f"Both trained {epochs} epochs (`baseline.budget: epochs`), so the student took more optimizer steps.")
    return (f"Training data: {n_labeled} labeled images; the distilled student also learned from {n_unlabeled} "
            "unlabeled images, through the teacher's soft labels (`data.unlabeled`). Teacher and baseline never "
            f"saw them. {budget}")
