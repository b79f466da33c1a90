"""Which number a run is judged by, read from its round metrics.

Classifiers have `accuracy`. A causal LM has `eval_loss`, `perplexity` and a generation metric
(`exact_match` or `rouge_l`, in `RoundMetrics.extra`). The run names one with
`evaluation.metric`; unset, it is accuracy when present, else the generation metric, else the
perplexity. Time-/energy-to-target, the live table and the report all use it.
"""

from __future__ import annotations

from typing import Optional, Sequence

from jetfed.coordinator.records import RoundMetrics

LOWER_IS_BETTER = ("perplexity", "eval_loss")
PREFERENCE = ("accuracy", "exact_match", "rouge_l", "perplexity", "eval_loss")


def metric_value(metrics: RoundMetrics, name: str) -> Optional[float]:
    if name == "accuracy":
        return metrics.accuracy
    if name == "eval_loss":
        return metrics.eval_loss
    return metrics.extra.get(name)


def metric_name(configured: Optional[str], rounds: Sequence[RoundMetrics]) -> str:
    """`configured`, else the first of PREFERENCE that some round recorded (accuracy if none)."""
    if configured:
        return configured
    for name in PREFERENCE:
        if any(metric_value(m, name) is not None for m in rounds):
            return name
    return "accuracy"


def reaches(value: Optional[float], target: float, name: str) -> bool:
    """Whether `value` is at least as good as `target` (lower is better for losses)."""
    if value is None:
        return False
    return value <= target if name in LOWER_IS_BETTER else value >= target


def best(values: Sequence[float], name: str) -> float:
    return min(values) if name in LOWER_IS_BETTER else max(values)
