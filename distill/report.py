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

__all__ = ["results_table", "distillation_summary", "seed_table", "format_count"]

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
    ("params", "params", format_count),
    ("flops_per_image", "FLOPs/image", format_count),
    ("images_per_sec", "images/s", lambda v: _num(v, 0)),
    ("latency_ms_batch1", "latency (ms, batch 1)", _num),
)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    cols = [c for c in COLUMNS if any(_is_number(r.get(c[0])) for r in rows)]
    header = ["model"] + [h for _, h, _ in cols]
    body = [[str(r["name"])] + [fmt(r[k]) if _is_number(r.get(k)) else DASH for k, _, fmt in cols] for r in rows]
    return _markdown(header, body, [":---"] + ["---:"] * len(cols))


def _top1(metrics: Mapping[str, Any], name: str) -> float | None:
    v = metrics.get(name, {}).get("top1")
    return float(v) if _is_number(v) else None


def _ratio(metrics: Mapping[str, Any], key: str, num: str, den: str) -> float | None:
    a, b = metrics.get(num, {}).get(key), metrics.get(den, {}).get(key)
    return a / b if _is_number(a) and _is_number(b) and b > 0 and a > 0 else None


def _cost_clause(metrics: Mapping[str, Any]) -> str:
    parts = []
    size = _ratio(metrics, "params", "teacher", "student")
    if size is not None:
        parts.append(f"{size:.1f}x fewer parameters" if size >= 1 else f"{1 / size:.1f}x more parameters")
    speed = _ratio(metrics, "images_per_sec", "student", "teacher")
    if speed is not None:
        parts.append(f"{speed:.1f}x the teacher's throughput")
    return " with " + " and ".join(parts) if parts else ""


def distillation_summary(metrics: Mapping[str, Any]) -> str:
    """One or two Markdown sentences: what distillation bought and how far the student is from the teacher.

    Args:
        metrics: ``metrics/evaluate.json`` content: ``teacher``/``baseline``/``student`` dicts with
            ``top1`` (fraction) and optionally ``params`` and ``images_per_sec``, and
            ``distillation_gain`` / ``gap_to_teacher`` (fractions; computed from the top-1s if absent).

    Returns:
        E.g. "Distillation bought +1.23 points top-1 (student 98.33 % vs baseline 97.10 %). The student is
        0.50 points behind the teacher (98.83 %) with 4.2x fewer parameters and 3.1x the teacher's
        throughput."
    """
    teacher, baseline, student = (_top1(metrics, n) for n in ("teacher", "baseline", "student"))
    gain = metrics.get("distillation_gain")
    if not _is_number(gain) and student is not None and baseline is not None:
        gain = student - baseline
    gap = metrics.get("gap_to_teacher")
    if not _is_number(gap) and student is not None and teacher is not None:
        gap = teacher - student
    sentences = []
    if _is_number(gain):
        detail = f" (student {_pct(student)} % vs baseline {_pct(baseline)} %)" if None not in (student, baseline) else ""
        change = f"bought {100 * gain:+.2f} points top-1" if gain > 0 else f"changed top-1 by {100 * gain:+.2f} points"
        sentences.append(f"Distillation {change}{detail}.")
    if _is_number(gap):
        where = ("behind" if gap > 0 else "ahead of") if gap != 0 else "level with"
        amount = f"{abs(100 * gap):.2f} points " if gap != 0 else ""
        ref = f" ({_pct(teacher)} %)" if teacher is not None else ""
        sentences.append(f"The student is {amount}{where} the teacher{ref}{_cost_clause(metrics)}.")
    return " ".join(sentences) if sentences else "No top-1 accuracies to compare."


def _format_stat(key: str, v: float) -> str:
    last = key.rsplit(".", 1)[-1]
    if last.startswith(PERCENT_KEYS):
        return f"{100 * v:.2f}"
    if last in ("params", "flops_per_image"):
        return format_count(v)
    return f"{v:.4g}"


def seed_table(aggregated: Mapping[str, Mapping[str, Any]], keys: Sequence[str] | None = None) -> str:
    """Markdown table of metrics over several seeds as "mean ± std (n=…)".

    Args:
        aggregated: Output of :func:`distill.evaluation.aggregate_runs`.
        keys: Metrics to show, in order (e.g. ``["teacher.top1", "student.top1", "distillation_gain"]``);
            default: all of them.

    Returns:
        The table. Fractions (top-1, top-5, ECE, agreement, gain, gap) are shown in % (points for
        differences), counts as K/M/G; std is the sample standard deviation.
    """
    keys = list(aggregated) if keys is None else [k for k in keys if k in aggregated]
    body = []
    for key in keys:
        agg = aggregated[key]
        unit = " (%)" if key.rsplit(".", 1)[-1].startswith(PERCENT_KEYS) else ""
        body.append([f"{key}{unit}", f"{_format_stat(key, agg['mean'])} ± {_format_stat(key, agg['std'])} (n={agg['n']})"])
    return _markdown(["metric", "mean ± std"], body, [":---", "---:"])
