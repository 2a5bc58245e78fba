"""Percentiles and medians of runs: the machine is noisy, so each figure is a median over runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

__all__ = ["median", "percentile", "ratio", "summarize"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolated linearly (as numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """``{n, p50, p95, p99, mean, min, max}`` of ``values`` (milliseconds, usually)."""
    if not values:
        return {"n": 0, "p50": math.nan, "p95": math.nan, "p99": math.nan}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "p99": round(percentile(values, 99), 3),
        "mean": round(statistics.fmean(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def median(values: Iterable[float | None]) -> float:
    """The median of the values that are not None or NaN (NaN when none is)."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return round(statistics.median(kept), 4) if kept else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when the denominator is not positive."""
    return round(numerator / denominator, 3) if denominator > 0 else math.nan
