"""The numbers a report is made of, from a run's records: per-round cost, to-target, memory.

Accuracy, wall-clock and bytes are the coordinator's (metrics.jsonl); energy and memory are the
devices' PhaseRecords summed over devices. A quantity nobody measured stays None, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from jetfed.coordinator.quality import LOWER_IS_BETTER, best, metric_name, metric_value, reaches
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.profiles.records import RunRecords

ROUND_PHASES = ("download", "setup", "train", "eval", "upload")
BASELINE_PHASE = "idle"
"""The idle baseline a device measures before its first round: shown apart, never round energy."""


def sum_or_none(values: Iterable[Optional[float]]) -> Optional[float]:
    """The sum when every value is known; None when any is missing or there are none."""
    items = list(values)
    if not items or any(value is None for value in items):
        return None
    return float(sum(value for value in items if value is not None))


def max_or_none(values: Iterable[Optional[int]]) -> Optional[int]:
    known = [value for value in values if value is not None]
    return max(known) if known else None


def round_phases(records: Iterable[PhaseRecord]) -> List[str]:
    """The round phases present, in protocol order (unknown method-defined phases last)."""
    present = {r.phase for r in records if r.phase != BASELINE_PHASE}
    return [p for p in ROUND_PHASES if p in present] + sorted(present - set(ROUND_PHASES))


@dataclass
class RoundCost:
    """One round of one run: the coordinator's metrics plus the devices' summed records."""

    round_index: int
    accuracy: Optional[float]
    """The run's quality metric (`run_metric`): accuracy for classifiers."""
    round_s: float
    """This round alone (the live table's `s`)."""
    wall_clock_s: float
    """From the start of the run through this round (cumulative)."""
    bytes_up: int
    bytes_down: int
    energy_j: Optional[float]
    energy_by_phase_j: Dict[str, Optional[float]]
    peak_rss_bytes: Optional[int]

    @property
    def bytes_total(self) -> int:
        return self.bytes_up + self.bytes_down


def run_metric(run: RunRecords) -> str:
    """The metric the run names (`evaluation.metric`), else the best one it recorded."""
    configured = (run.config.get("evaluation") or {}).get("metric")
    return metric_name(configured, run.metrics)


def round_costs(run: RunRecords) -> List[RoundCost]:
    metric = run_metric(run)
    costs = []
    for metrics in run.metrics:
        records = [
            r
            for r in run.profiles
            if r.round_index == metrics.round_index and r.phase != BASELINE_PHASE
        ]
        costs.append(
            RoundCost(
                round_index=metrics.round_index,
                accuracy=metric_value(metrics, metric),
                round_s=metrics.round_s,
                wall_clock_s=metrics.wall_clock_s,
                bytes_up=metrics.bytes_up,
                bytes_down=metrics.bytes_down,
                energy_j=sum_or_none(r.energy_j for r in records),
                energy_by_phase_j={
                    phase: sum_or_none(r.energy_j for r in records if r.phase == phase)
                    for phase in round_phases(records)
                },
                peak_rss_bytes=max_or_none(r.peak_rss_bytes for r in records),
            )
        )
    return costs


def cumulative_energy_j(costs: Sequence[RoundCost]) -> List[Optional[float]]:
    """Energy of all devices from the first round through each round (None once one is n/a)."""
    totals: List[Optional[float]] = []
    running: Optional[float] = 0.0
    for cost in costs:
        running = None if running is None or cost.energy_j is None else running + cost.energy_j
        totals.append(running)
    return totals


@dataclass
class TargetRow:
    """What a run spent until the global model first reached the target accuracy."""

    label: str
    reached: bool
    rounds: Optional[int] = None
    time_s: Optional[float] = None
    energy_j: Optional[float] = None
    bytes_total: Optional[int] = None


def to_target(
    label: str, costs: Sequence[RoundCost], target: float, metric: str = "accuracy"
) -> TargetRow:
    energies = cumulative_energy_j(costs)
    for index, cost in enumerate(costs):
        if reaches(cost.accuracy, target, metric):
            return TargetRow(
                label=label,
                reached=True,
                rounds=index + 1,
                time_s=cost.wall_clock_s,
                energy_j=energies[index],
                bytes_total=sum(c.bytes_total for c in costs[: index + 1]),
            )
    return TargetRow(label=label, reached=False)


@dataclass
class MemoryRow:
    label: str
    peak_rss_bytes: Optional[int]
    peak_system_used_bytes: Optional[int]
    peak_gpu_memory_bytes: Optional[int]
    peak_shared_memory_bytes: Optional[int]


def memory_row(label: str, records: Sequence[PhaseRecord]) -> MemoryRow:
    work = [r for r in records if r.phase != BASELINE_PHASE]
    return MemoryRow(
        label=label,
        peak_rss_bytes=max_or_none(r.peak_rss_bytes for r in work),
        peak_system_used_bytes=max_or_none(r.peak_system_used_bytes for r in work),
        peak_gpu_memory_bytes=max_or_none(r.peak_gpu_memory_bytes for r in work),
        peak_shared_memory_bytes=max_or_none(r.peak_shared_memory_bytes for r in work),
    )


@dataclass
class RunSummary:
    label: str
    run: RunRecords
    costs: List[RoundCost]

    @property
    def metric(self) -> str:
        return run_metric(self.run)

    @property
    def backends(self) -> List[str]:
        return sorted({r.backend for r in self.run.profiles})


def run_labels(runs: Sequence[RunRecords]) -> List[str]:
    """The method name when it tells the runs apart, else method and run folder name, else
    numbered (two folders of the same name)."""
    for labels in (
        [run.method for run in runs],
        [f"{run.method} · {run.path.name}" for run in runs],
    ):
        if len(set(labels)) == len(labels):
            return labels
    return [f"{run.method} · {run.path.name} ({index})" for index, run in enumerate(runs, 1)]


def default_target(summaries: Sequence[RunSummary]) -> Optional[float]:
    """The best value of the (first run's) metric every evaluated run reached, so each has a
    time-to-target; None when no run has one."""
    bests = []
    metric = summaries[0].metric if summaries else "accuracy"
    for summary in summaries:
        accuracies = [c.accuracy for c in summary.costs if c.accuracy is not None]
        if accuracies:
            bests.append(best(accuracies, metric))
    if not bests:
        return None
    return max(bests) if metric in LOWER_IS_BETTER else min(bests)


def run_targets(
    summaries: Sequence[RunSummary], target: Optional[float]
) -> Tuple[Optional[float], List[TargetRow]]:
    """The target (given, else `default_target`) and each run's *-to-target on the first run's
    metric: what the report's table and the live page both show."""
    chosen = target if target is not None else default_target(summaries)
    if chosen is None or not summaries:
        return chosen, []
    metric = summaries[0].metric
    return chosen, [to_target(s.label, s.costs, chosen, metric) for s in summaries]
