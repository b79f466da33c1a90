"""Small statistics helpers shared by the benches."""

from __future__ import annotations

from typing import Dict, Sequence


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return float(ordered[middle - 1] + ordered[middle]) / 2.0


def summary(values: Sequence[float]) -> Dict[str, float]:
    """median / min / max / count of a sample (timings are noisy on a shared machine)."""
    return {
        "median": median(values),
        "min": float(min(values)),
        "max": float(max(values)),
        "count": float(len(values)),
    }
