"""Statistics of results, without torch: Student-t intervals over seeds, Wilson and Newcombe intervals of one
run's accuracies, mean and spread over runs. :mod:`distill.evaluation` re-exports them; orchestration code
(a sweep's report, the seeds report) imports them from here, so that its process never loads torch."""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

from distill.config import flatten

__all__ = ["t_interval", "wilson_interval", "newcombe_paired_interval", "mean_std", "is_number", "aggregate_runs"]


def _t_quantile(confidence: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, dof))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and its two-sided Student-t confidence interval: ``mean ± t(n-1) * s / sqrt(n)``.

    For paired differences (gain per seed = student minus baseline on the same seed), this is the interval of
    the paired difference. With one value the interval is undefined: ``(value, nan, nan)``.

    Returns:
        ``(mean, low, high)``.
    """
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return mean, math.nan, math.nan
    half = _t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of an accuracy ``correct / total`` (the test set's sampling error, one run)."""
    if total < 1:
        return math.nan, math.nan
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def newcombe_paired_interval(both: int, only_a: int, only_b: int, neither: int,
                             confidence: float = 0.95) -> tuple[float, float, float]:
    """Newcombe's hybrid score ("square-and-add") interval of ``p_a - p_b`` for paired proportions.

    Newcombe (1998), "Improved confidence intervals for the difference between binomial proportions based on paired
    data", Statistics in Medicine 17, method 10; as recommended by Fagerland, Lydersen & Laake (2014). The Wilson
    score intervals of the two accuracies are combined with the estimated correlation of the pairs (``psi``, with
    Newcombe's continuity correction of ``ad - bc``). Unlike the Wald interval on per-image differences it keeps
    its coverage at small counts and has a non-zero width when the two models never disagree.

    Args:
        both, only_a, only_b, neither: the paired 2x2 table (:func:`paired_counts`).
        confidence: two-sided level.

    Returns:
        ``(difference, low, high)`` as fractions.
    """
    n = both + only_a + only_b + neither
    if n < 1:
        return math.nan, math.nan, math.nan
    p_a, p_b = (both + only_a) / n, (both + only_b) / n
    l_a, u_a = wilson_interval(both + only_a, n, confidence)
    l_b, u_b = wilson_interval(both + only_b, n, confidence)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    if margins == 0 or 0 <= cross <= n / 2:
        psi = 0.0
    else:
        psi = (cross - n / 2 if cross > n / 2 else cross) / math.sqrt(margins)
    low = (p_a - p_b) - math.sqrt((p_a - l_a) ** 2 + (u_b - p_b) ** 2 - 2 * psi * (p_a - l_a) * (u_b - p_b))
    high = (p_a - p_b) + math.sqrt((p_b - l_b) ** 2 + (u_a - p_a) ** 2 - 2 * psi * (p_b - l_b) * (u_a - p_a))
    return p_a - p_b, low, high


# ------------------------------------------------------------------------------------- multi-seed
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value).

    Args:
        values: One number per run (e.g. per seed).

    Returns:
        ``(mean, std)``.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def is_number(v: Any) -> bool:
    """A real, finite number (not a bool): what a metric table or an aggregate counts."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def aggregate_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean ± std of every numeric metric over several runs (seeds), for "mean ± std" reporting.

    Nested dicts are flattened with dots (``{"student": {"top1": x}}`` -> ``"student.top1"``);
    non-numeric, boolean and non-finite values are skipped. A key missing from some runs is
    aggregated over the runs that have it (its ``n`` says how many).

    Args:
        runs: One metrics dict per run, e.g. the contents of several ``metrics/evaluate.json``.

    Returns:
        ``{key: {"mean", "std", "n", "values", "ci95"}}`` in first-seen key order; ``ci95`` is the 95 % Student-t
        interval ``[low, high]`` of the mean (``[nan, nan]`` for one run).
    """
    values: dict[str, list[float]] = {}
    for run in runs:
        for key, v in flatten(dict(run)).items():
            if is_number(v):
                values.setdefault(key, []).append(float(v))
    out: dict[str, dict[str, Any]] = {}
    for key, vals in values.items():
        mean, std = mean_std(vals)
        _, low, high = t_interval(vals)
        out[key] = {"mean": mean, "std": std, "n": len(vals), "values": vals, "ci95": [low, high]}
    return out
