"""Percentiles and summaries (no numpy needed)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), linear between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p90/p99/max (and count, mean) of durations given in seconds, in milliseconds."""
    ms = [s * 1000 for s in seconds]

    def r(value: float | None) -> float | None:
        return None if value is None else round(value, 2)

    return {
        "count": len(ms),
        "p50_ms": r(percentile(ms, 50)),
        "p90_ms": r(percentile(ms, 90)),
        "p99_ms": r(percentile(ms, 99)),
        "max_ms": r(max(ms)) if ms else None,
        "mean_ms": r(statistics.fmean(ms)) if ms else None,
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)
