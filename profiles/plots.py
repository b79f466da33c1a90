"""The report's PNG plots (matplotlib, Agg; imported only when a report is drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence, Tuple

from jetfed.edge.errors import UserError
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.profiles.document import fmt_mb
from jetfed.profiles.summary import (
    BASELINE_PHASE,
    MemoryRow,
    RunSummary,
    cumulative_energy_j,
    round_phases,
)

PHASE_COLORS = {
    "download": "#4c72b0",
    "setup": "#8172b2",
    "train": "#dd8452",
    "eval": "#55a868",
    "upload": "#c44e52",
}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("reports need matplotlib: pip install 'jetfed[profiles]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _note(axes: Any, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, wrap=True)
    axes.set_xticks([])
    axes.set_yticks([])


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    _pyplot().close(figure)
    return path


def plot_accuracy(
    summaries: Sequence[RunSummary], out_dir: Path, with_energy: bool = True
) -> List[Path]:
    """The run's metric (accuracy, exact match, eval loss...) vs cumulative wall-clock, and vs
    energy when any run measured it."""
    plt = _pyplot()
    paths = []
    label = f"validation {summaries[0].metric.replace('_', ' ')}" if summaries else "validation"
    figure, axes = plt.subplots(figsize=(7, 4))
    for s in summaries:
        times = [c.wall_clock_s for c in s.costs]
        axes.plot(times, [c.accuracy for c in s.costs], "o-", label=s.label)
    axes.set_xlabel("wall-clock since the run began (s)")
    axes.set_ylabel(label)
    axes.legend()
    paths.append(_save(figure, out_dir / "accuracy_vs_time.png"))
    if not with_energy:
        return paths
    figure, axes = plt.subplots(figsize=(7, 4))
    measured = [s for s in summaries if all(e is not None for e in cumulative_energy_j(s.costs))]
    for s in measured:
        x = cumulative_energy_j(s.costs)
        axes.plot(x, [c.accuracy for c in s.costs], "o-", label=s.label)
    if measured:
        axes.set_xlabel("device energy, all devices (J)")
        axes.set_ylabel(label)
        axes.legend()
    else:
        _note(axes, "energy n/a: no run had a power sensor")
    paths.append(_save(figure, out_dir / "accuracy_vs_energy.png"))
    return paths


def plot_energy_by_phase(summaries: Sequence[RunSummary], out_dir: Path) -> Path:
    plt = _pyplot()
    figure, grid = plt.subplots(
        1, len(summaries), figsize=(4 * len(summaries) + 1, 4), squeeze=False
    )
    for axes, s in zip(grid[0], summaries):
        axes.set_title(s.label)
        phases = round_phases(s.run.profiles)
        if not any(v is not None for c in s.costs for v in c.energy_by_phase_j.values()):
            _note(axes, f"energy n/a (backend {', '.join(s.backends) or 'none'})")
            continue
        bottom = [0.0] * len(s.costs)
        x = [c.round_index for c in s.costs]
        for phase in phases:
            heights = [c.energy_by_phase_j.get(phase) or 0.0 for c in s.costs]
            color = PHASE_COLORS.get(phase)
            axes.bar(x, heights, bottom=bottom, label=phase, color=color)
            bottom = [b + h for b, h in zip(bottom, heights)]
        axes.set_xlabel("round")
        axes.set_ylabel("energy, all devices (J)")
        axes.set_xticks(x)
        axes.legend(fontsize="small")
    return _save(figure, out_dir / "energy_per_round_by_phase.png")


def device_trace(records: Sequence[PhaseRecord]) -> List[Tuple[float, float]]:
    """One device's (s since its round began, W) points over a round's phases."""
    ordered = sorted(records, key=lambda r: r.start_unix_s)
    if not ordered:
        return []
    origin = ordered[0].start_unix_s
    return [(r.start_unix_s - origin + t, w) for r in ordered for t, w in r.power_trace]


def _shade_phases(axes: Any, records: Sequence[PhaseRecord]) -> None:
    """Background spans for one device's phases (the first device's: others' differ slightly)."""
    origin = min(r.start_unix_s for r in records)
    for r in records:
        axes.axvspan(
            r.start_unix_s - origin,
            r.end_unix_s - origin,
            color=PHASE_COLORS.get(r.phase, "#999999"),
            alpha=0.12,
            label=r.phase,
        )


def plot_power_trace(summaries: Sequence[RunSummary], round_index: int, out_dir: Path) -> Path:
    plt = _pyplot()
    figure, grid = plt.subplots(
        len(summaries), 1, figsize=(8, 3 * len(summaries) + 0.5), squeeze=False
    )
    for axes, s in zip(grid[:, 0], summaries):
        axes.set_title(f"{s.label}: round {round_index}")
        records = [
            r for r in s.run.profiles if r.round_index == round_index and r.phase != BASELINE_PHASE
        ]
        drawn = False
        for device_id in sorted({r.device_id for r in records}):
            own = [r for r in records if r.device_id == device_id]
            points = device_trace(own)
            if points:
                if not drawn:
                    _shade_phases(axes, own)
                axes.plot([p[0] for p in points], [p[1] for p in points], label=device_id)
                drawn = True
        if drawn:
            axes.set_xlabel("time since the device's round began (s)")
            axes.set_ylabel("module power (W)")
            axes.legend(fontsize="small")
        else:
            _note(axes, f"no power samples (backend {', '.join(s.backends) or 'none'})")
    return _save(figure, out_dir / f"power_trace_round_{round_index}.png")


def plot_peak_memory(rows: Sequence[MemoryRow], out_dir: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(4, 1.6 * len(rows) + 2), 4))
    labels = [row.label for row in rows]
    values = [(row.peak_rss_bytes or 0) / 1e6 for row in rows]
    axes.bar(labels, values, color="#4c72b0")
    for index, row in enumerate(rows):
        axes.annotate(fmt_mb(row.peak_rss_bytes), (index, values[index]), ha="center", va="bottom")
    axes.set_ylabel("peak process RSS on a device (MB)")
    return _save(figure, out_dir / "peak_memory.png")


def plot_bytes(summaries: Sequence[RunSummary], out_dir: Path) -> Path:
    """Bars per round, one per run side by side: up (solid) stacked under down (hatched)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(summaries))
    rounds = sorted({c.round_index for s in summaries for c in s.costs})
    for index, s in enumerate(summaries):
        x = [c.round_index - 0.4 + width * (index + 0.5) for c in s.costs]
        up = [c.bytes_up / 1e6 for c in s.costs]
        color = f"C{index}"
        axes.bar(x, up, width, label=f"{s.label} up", color=color)
        axes.bar(
            x,
            [c.bytes_down / 1e6 for c in s.costs],
            width,
            bottom=up,
            label=f"{s.label} down",
            color=color,
            alpha=0.5,
            hatch="//",
        )
    axes.set_xticks(rounds)
    axes.set_xlabel("round")
    axes.set_ylabel("MQTT bytes, all devices (MB)")
    axes.legend(fontsize="small")
    return _save(figure, out_dir / "bytes_per_round.png")
