"""Markdown for ``reports/results.md``: the side-by-side table and the sentences that read it.

The table follows DeiT's Table 1 (Touvron et al. 2021): accuracy next to cost (parameters, FLOPs,
throughput). The summary answers the two questions of a distillation run: what distillation bought
(student vs the labels-only baseline trained with the same recipe) and what the student costs
compared with its teacher. Metrics come in as fractions (see :mod:`distill.evaluation`); they are
shown as percentages, and differences in percentage points.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from distill.stats import is_number

__all__ = ["results_table", "results_report", "distillation_summary", "training_summary", "seed_table",
           "per_seed_lines", "format_count"]

DASH = "\u2013"  # en dash: a missing value

#: Keys holding fractions that are shown as percentages (their last dotted segment).
PERCENT_KEYS = ("top1", "top5", "ece", "agreement", "distillation_gain", "gap_to_teacher")


def format_count(value: float) -> str:
    """``204312 -> "204.3K"``, ``1.2e9 -> "1.20G"``: parameters, FLOPs, other large counts."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.{1 if unit == 'K' else 2}f}{unit}"
    return f"{value:g}"


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def _num(v: float, digits: int = 2) -> str:
    return f"{v:,.{digits}f}"


#: Table columns in order: (row key, header, formatter).
COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("top1", "top-1 (%)", _pct),
    ("top5", "top-5 (%)", _pct),
    ("ece", "ECE (%)", _pct),
    ("agreement_with_teacher", "agreement w/ teacher (%)", _pct),
    ("agreement_with_fp32", "top-1 agreement w/ fp32 (%)", _pct),
    ("file_bytes", "file (bytes)", format_count),
    ("params", "params", format_count),
    ("flops_per_image", "FLOPs/image", format_count),
    ("images_per_sec", "images/s", lambda v: _num(v, 0)),
    ("latency_ms_batch1", "latency (ms, batch 1)", _num),
)


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]], align: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of models side by side.

    Args:
        rows: One dict per model with ``name`` and any of ``top1``, ``top5``, ``ece``,
            ``agreement_with_teacher`` (fractions), ``params``, ``flops_per_image``, ``images_per_sec``,
            ``latency_ms_batch1``. Other keys are ignored.

    Returns:
        The table; accuracies in % with 2 decimals, counts as K/M/G, a missing value as an en dash.
        Columns no row has are left out.
    """
    cols = [c for c in COLUMNS if any(is_number(r.get(c[0])) for r in rows)]
    header = ["model"] + [h for _, h, _ in cols]
    body = [[str(r["name"])] + [fmt(r[k]) if is_number(r.get(k)) else DASH for k, _, fmt in cols] for r in rows]
    return _markdown(header, body, [":---"] + ["---:"] * len(cols))


def _top1(metrics: Mapping[str, Any], name: str) -> float | None:
    v = metrics.get(name, {}).get("top1")
    return float(v) if is_number(v) else None


def _interval(ci: Any) -> str:
    """``95 % CI +0.28 to +2.51`` for an interval of a difference in fractions, or nothing."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_number(v) for v in ci):
        return f"95 % CI {100 * ci[0]:+.2f} to {100 * ci[1]:+.2f}"
    return ""


def _aside(*parts: str) -> str:
    """`` (a; b)`` of the non-empty parts, or nothing."""
    kept = [p for p in parts if p]
    return f" ({'; '.join(kept)})" if kept else ""


def _ratio(metrics: Mapping[str, Any], key: str, num: str, den: str) -> float | None:
    a, b = metrics.get(num, {}).get(key), metrics.get(den, {}).get(key)
    return a / b if is_number(a) and is_number(b) and b > 0 and a > 0 else None


def _cost_clause(metrics: Mapping[str, Any]) -> str:
    parts = []
    size = _ratio(metrics, "params", "teacher", "student")
    if size is not None:
        parts.append(f"{size:.1f}x fewer parameters" if size >= 1 else f"{1 / size:.1f}x more parameters")
    student = metrics.get("student", {})
    speed = student.get("speedup_vs_teacher")
    if is_number(speed):  # median of interleaved rounds, with its spread
        lo, hi = student.get("speedup_vs_teacher_min"), student.get("speedup_vs_teacher_max")
        spread = f", {lo:.1f}x to {hi:.1f}x over the rounds" if is_number(lo) and is_number(hi) else ""
        parts.append(f"{speed:.1f}x the teacher's throughput (median{spread})")
    else:
        speed = _ratio(metrics, "images_per_sec", "student", "teacher")
        if speed is not None:
            parts.append(f"{speed:.1f}x the teacher's throughput")
    return " with " + " and ".join(parts) if parts else ""


def distillation_summary(metrics: Mapping[str, Any]) -> str:
    """One or two Markdown sentences: what distillation bought and how far the student is from the teacher.

    Args:
        metrics: ``metrics/evaluate.json`` content: ``teacher``/``baseline``/``student`` dicts with
            ``top1`` (fraction) and optionally ``params``, ``images_per_sec`` and ``speedup_vs_teacher``,
            and ``distillation_gain`` / ``gap_to_teacher`` (fractions; computed from the top-1s if absent)
            with their ``*_ci95`` intervals.

    Returns:
        E.g. "Distillation bought +1.23 points top-1 (student 98.33 % vs baseline 97.10 %; 95 % CI +0.10 to
        +2.36). The student is 0.50 points behind the teacher (98.83 %; 95 % CI -0.20 to +1.20) with ..."
    """
    teacher, baseline, student = (_top1(metrics, n) for n in ("teacher", "baseline", "student"))
    gain = metrics.get("distillation_gain")
    if not is_number(gain) and student is not None and baseline is not None:
        gain = student - baseline
    gap = metrics.get("gap_to_teacher")
    if not is_number(gap) and student is not None and teacher is not None:
        gap = teacher - student
    sentences = []
    if is_number(gain):
        both = None not in (student, baseline)
        detail = f"student {_pct(student)} % vs baseline {_pct(baseline)} %" if both else ""
        change = f"bought {100 * gain:+.2f} points top-1" if gain > 0 else f"changed top-1 by {100 * gain:+.2f} points"
        sentences.append(f"Distillation {change}{_aside(detail, _interval(metrics.get('distillation_gain_ci95')))}.")
    if is_number(gap):
        where = ("behind" if gap > 0 else "ahead of") if gap != 0 else "level with"
        amount = f"{abs(100 * gap):.2f} points " if gap != 0 else ""
        ref = f"{_pct(teacher)} %" if teacher is not None else ""
        ci = _interval(metrics.get("gap_to_teacher_ci95"))
        ci = f"{ci} of teacher minus student" if ci else ""
        sentences.append(f"The student is {amount}{where} the teacher{_aside(ref, ci)}{_cost_clause(metrics)}.")
    return " ".join(sentences) if sentences else "No top-1 accuracies to compare."


def training_summary(training: Mapping[str, Mapping[str, Any]]) -> str:
    """What each model trained on and for how long (from the checkpoints), and how the baseline's budget was set."""
    lines = []
    for name in ("teacher", "baseline", "student"):
        t = training.get(name) or {}
        if t.get("used_as_is"):
            lines.append(f"- {name}: pretrained, used as it is (no training here)")
            continue
        images = f" on {t['train_images']:,} images" if "train_images" in t else ""
        if "labeled_images" in t and t.get("train_images", 0) > t["labeled_images"]:
            images += (f" ({t['labeled_images']:,} labeled, {t['train_images'] - t['labeled_images']:,} unlabeled: "
                       "those only through the teacher's soft labels)")
        if t.get("samples_per_epoch", 0) > t.get("train_images", 0):
            images += f", each epoch drawing {t['samples_per_epoch']:,} samples from them"
        if "steps" in t:
            lines.append(f"- {name}: {t.get('epochs', '?')} epochs, {t['steps']:,} optimizer steps "
                         f"({t.get('warmup_steps', 0):,} of warm-up){images}")
    base, student = training.get("baseline") or {}, training.get("student") or {}
    if base.get("budget") == "steps" and "steps" in base and "steps" in student:
        same = base["steps"] == student["steps"] and base.get("warmup_steps") == student.get("warmup_steps")
        lines.append(f"\nThe baseline's budget is the student's optimizer steps (`baseline.budget: steps`): "
                     f"{base['steps']:,} and {student['steps']:,}, warm-up {base.get('warmup_steps', 0):,} and "
                     f"{student.get('warmup_steps', 0):,}" + ("." if same else ": NOT equal, see the stage logs."))
    elif base.get("budget") == "epochs":
        lines.append("\nThe baseline trained the student's epochs (`baseline.budget: epochs`, DeiT's protocol).")
    return "\n".join(lines)


def results_report(metrics: Mapping[str, Any], *, dataset: str) -> str:
    """``reports/results.md``: the table, what distillation bought (with intervals), the budgets, the method."""
    rows = [{"name": n, **metrics[n]} for n in ("teacher", "baseline", "student")]
    rows += [{"name": "student (cls head)", "top1": metrics["student"].get("top1_cls_head")},
             {"name": "student (dist head)", "top1": metrics["student"].get("top1_dist_head")}]
    n = metrics.get("num_test", "?")
    return (f"# Results on the {dataset} test split ({n} images)\n\n" + results_table(rows) + "\n\n"
            + distillation_summary(metrics) + "\n\n"
            + f"Intervals are 95 % intervals of this run's test set ({n} images: one image is "
            + (f"{100 / n:.2f} points" if isinstance(n, int) and n else "?") + "): Wilson score intervals for "
            "each accuracy, Newcombe's paired score interval for the gain and the gap (the same images, two models). "
            "They leave out the spread over seeds, which `python -m flows seeds` measures (`reports/seeds.md`).\n\n"
            + "## Training\n\n" + training_summary(metrics.get("training", {})) + "\n\n"
            + f"Speed: {metrics.get('throughput_method', '')}\n")


def _format_stat(key: str, v: float) -> str:
    last = key.rsplit(".", 1)[-1]
    if last.startswith(PERCENT_KEYS):
        return f"{100 * v:.2f}"
    if last in ("params", "flops_per_image"):
        return format_count(v)
    return f"{v:.4g}"


def seed_table(aggregated: Mapping[str, Mapping[str, Any]], keys: Sequence[str] | None = None) -> str:
    """Markdown table of metrics over several seeds: mean ± std, the 95 % interval of the mean, and n.

    Args:
        aggregated: Output of :func:`distill.evaluation.aggregate_runs`.
        keys: Metrics to show, in order (e.g. ``["teacher.top1", "student.top1", "distillation_gain"]``);
            default: all of them.

    Returns:
        The table. Fractions (top-1, top-5, ECE, agreement, gain, gap) are shown in % (points for
        differences), counts as K/M/G; std is the sample standard deviation; the interval is Student's t
        (for the gain and the gap, the interval of the paired per-seed difference).
    """
    keys = list(aggregated) if keys is None else [k for k in keys if k in aggregated]
    body = []
    for key in keys:
        agg = aggregated[key]
        unit = " (%)" if key.rsplit(".", 1)[-1].startswith(PERCENT_KEYS) else ""
        ci = agg.get("ci95") or [math.nan, math.nan]
        shown = (f"{_format_stat(key, ci[0])} to {_format_stat(key, ci[1])}"
                 if all(is_number(v) for v in ci) else DASH)
        body.append([f"{key}{unit}", f"{_format_stat(key, agg['mean'])} ± {_format_stat(key, agg['std'])}", shown,
                     str(agg["n"])])
    return _markdown(["metric", "mean ± std", "95 % CI of the mean", "n"], body, [":---", "---:", "---:", "---:"])


def per_seed_lines(aggregated: Mapping[str, Mapping[str, Any]]) -> str:
    """The distillation gain and the gap to the teacher in points: mean, paired 95 % interval and every seed's value.

    Args:
        aggregated: Output of :func:`distill.evaluation.aggregate_runs` (with ``values`` and ``ci95``).
    """
    lines = []
    for key in ("distillation_gain", "gap_to_teacher"):
        if key in aggregated:
            agg = aggregated[key]
            values = ", ".join(f"{100 * v:+.2f}" for v in agg["values"])
            low, high = agg["ci95"]
            ci = (f"95 % CI {100 * low:+.2f} to {100 * high:+.2f} (paired over {agg['n']} seeds)"
                  if agg["n"] > 1 else "no interval from one seed")
            lines.append(f"{key}: mean {100 * agg['mean']:+.2f} points, {ci}; per seed: {values}")
    return "\n".join(lines)
