"""`jetfed profiles report`: runs side by side by accuracy, time, energy, bytes and memory.

Every number comes from the run directories' own files (see profiles/summary.py); a quantity a
device could not measure is "n/a", never 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from jetfed.coordinator.quality import LOWER_IS_BETTER
from jetfed.edge.errors import UserError
from jetfed.profiles.document import (
    NA,
    Block,
    Heading,
    Image,
    Paragraph,
    TableBlock,
    fmt,
    fmt_bytes,
    fmt_mb,
    to_html,
    to_markdown,
)
from jetfed.profiles.plots import (
    plot_accuracy,
    plot_bytes,
    plot_energy_by_phase,
    plot_peak_memory,
    plot_power_trace,
)
from jetfed.profiles.records import load_run
from jetfed.profiles.summary import (
    BASELINE_PHASE,
    MemoryRow,
    RunSummary,
    TargetRow,
    memory_row,
    round_costs,
    round_phases,
    run_labels,
    run_targets,
    sum_or_none,
)


@dataclass
class Report:
    """What a build wrote, and the numbers behind its tables (for callers and tests)."""

    markdown_path: Path
    html_path: Path
    images: List[Path]
    target_accuracy: Optional[float]
    targets: List[TargetRow]
    summaries: List[RunSummary] = field(default_factory=list)


def _overview(summaries: Sequence[RunSummary]) -> TableBlock:
    rows = []
    for s in summaries:
        last = s.costs[-1] if s.costs else None
        rows.append(
            [
                s.label,
                str(s.run.path),
                str(len(s.run.devices) or len({r.device_id for r in s.run.profiles})),
                ", ".join(s.backends) or NA,
                str(len(s.costs)),
                fmt(last.accuracy if last else None, 4),
                fmt(last.wall_clock_s if last else None),
                fmt(sum_or_none(c.energy_j for c in s.costs)),
                fmt_bytes(sum(c.bytes_total for c in s.costs)),
            ]
        )
    return TableBlock(
        [
            "run",
            "directory",
            "devices",
            "backend",
            "rounds",
            "final accuracy",
            "wall-clock (s)",
            "energy (J)",
            "bytes",
        ],
        rows,
    )


def _target_table(targets: Sequence[TargetRow], target: float) -> TableBlock:
    rows = []
    for t in targets:
        if not t.reached:
            rows.append([t.label, f"{target:.4f}", "not reached", NA, NA, NA])
            continue
        rows.append(
            [
                t.label,
                f"{target:.4f}",
                str(t.rounds),
                fmt(t.time_s),
                fmt(t.energy_j),
                fmt_bytes(t.bytes_total),
            ]
        )
    headers = [
        "run",
        "target accuracy",
        "rounds-to-target",
        "time-to-target (s)",
        "energy-to-target (J)",
        "bytes-to-target",
    ]
    return TableBlock(headers, rows)


def _round_table(s: RunSummary) -> TableBlock:
    phases = round_phases(s.run.profiles)
    rows = [
        [
            str(c.round_index),
            fmt(c.accuracy, 4),
            fmt(c.round_s),
            fmt(c.wall_clock_s),
            fmt_bytes(c.bytes_up),
            fmt_bytes(c.bytes_down),
            fmt(c.energy_j),
            *(fmt(c.energy_by_phase_j.get(phase)) for phase in phases),
            fmt_mb(c.peak_rss_bytes),
        ]
        for c in s.costs
    ]
    headers = [
        "round",
        "accuracy",
        "round (s)",
        "cumulative (s)",
        "bytes up",
        "bytes down",
        "energy (J)",
        *(f"{phase} (J)" for phase in phases),
        "peak RSS (MB)",
    ]
    return TableBlock(headers, rows)


def _memory_table(rows: Sequence[MemoryRow]) -> TableBlock:
    return TableBlock(
        ["run", "peak RSS (MB)", "peak system used (MB)", "peak GPU (MB)", "peak shared (MB)"],
        [
            [
                r.label,
                fmt_mb(r.peak_rss_bytes),
                fmt_mb(r.peak_system_used_bytes),
                fmt_mb(r.peak_gpu_memory_bytes),
                fmt_mb(r.peak_shared_memory_bytes),
            ]
            for r in rows
        ],
    )


def _device_table(summaries: Sequence[RunSummary]) -> TableBlock:
    rows = []
    for s in summaries:
        baselines = {
            r.device_id: r.idle_power_w for r in s.run.profiles if r.phase == BASELINE_PHASE
        }
        for device_id in sorted(set(s.run.devices) | {r.device_id for r in s.run.profiles}):
            hello = s.run.devices.get(device_id)
            context = hello.context if hello else {}
            rows.append(
                [
                    s.label,
                    device_id,
                    str(context.get("device_model") or (hello.machine if hello else NA)),
                    str(context.get("l4t_release") or NA),
                    str(context.get("nvpmodel_mode") or NA),
                    hello.telemetry_backend if hello else NA,
                    fmt(context.get("effective_sample_rate_hz"), 1),
                    fmt(baselines.get(device_id)),
                ]
            )
    headers = [
        "run",
        "device",
        "model",
        "L4T",
        "power mode",
        "backend",
        "sample rate (Hz)",
        "idle power (W)",
    ]
    return TableBlock(headers, rows)


def _pick_round(summaries: Sequence[RunSummary], round_index: Optional[int]) -> int:
    """The asked round, else the last round every run completed."""
    lasts = [s.costs[-1].round_index for s in summaries if s.costs]
    if round_index is None:
        return min(lasts) if lasts else 0
    if round_index < 0:
        raise UserError(f"--round must be a round index ≥ 0, got {round_index}")
    return round_index


def build_report(
    run_dirs: Sequence[Path],
    out_dir: Path,
    target_accuracy: Optional[float] = None,
    round_index: Optional[int] = None,
) -> Report:
    """Write report.md, report.html and the PNG plots into out_dir."""
    if not run_dirs:
        raise UserError("give at least one RUN_DIR")
    runs = [load_run(Path(path)) for path in run_dirs]
    summaries = [
        RunSummary(label, run, round_costs(run)) for label, run in zip(run_labels(runs), runs)
    ]
    metric = summaries[0].metric
    bounded = metric not in LOWER_IS_BETTER
    if target_accuracy is not None and bounded and not 0.0 <= target_accuracy <= 1.0:
        raise UserError(f"--target-accuracy must be within 0..1, got {target_accuracy}")
    out_dir.mkdir(parents=True, exist_ok=True)
    target, targets = run_targets(summaries, target_accuracy)
    memory = [memory_row(s.label, s.run.profiles) for s in summaries]
    chosen_round = _pick_round(summaries, round_index)
    has_energy = any(c.energy_j is not None for s in summaries for c in s.costs) or any(
        v is not None for s in summaries for c in s.costs for v in c.energy_by_phase_j.values()
    )
    has_power = any(r.power_trace for s in summaries for r in s.run.profiles)
    trace = plot_power_trace(summaries, chosen_round, out_dir) if has_power else None
    images = [
        *plot_accuracy(summaries, out_dir, with_energy=has_energy),
        *([plot_energy_by_phase(summaries, out_dir)] if has_energy else []),
        *([trace] if trace is not None else []),
        plot_peak_memory(memory, out_dir),
        plot_bytes(summaries, out_dir),
    ]
    backends = sorted({b for s in summaries for b in s.backends}) or ["none"]
    blocks: List[Block] = [
        Heading(1, "jetfed profile report"),
        Paragraph(
            "Energy is the trapezoidal integral of each device's sampled module power per phase, "
            "summed over devices and phases (download, setup, train, eval, upload); the idle "
            "baseline measured before the first round is listed per device, not counted. "
            "n/a: a device had no power sensor (or a phase lacks it). "
            "Wall-clock and bytes (MQTT, both directions, all devices) are the coordinator's; "
            "rounds are numbered from 0, as in the live table and `global/round-NNNN/`."
        ),
    ]
    if not has_energy:
        blocks.append(
            Paragraph(
                f"No device had a power sensor (telemetry: {', '.join(backends)}): energy is "
                "n/a throughout, and the energy and power plots are left out."
            )
        )
    blocks += [
        _overview(summaries),
        Heading(2, f"To target {metric}"),
    ]
    if target is not None:
        how = "given" if target_accuracy is not None else "the best every evaluated run reached"
        blocks.append(Paragraph(f"Target {metric} {target:.4f} ({how})."))
        blocks.append(_target_table(targets, target))
    else:
        blocks.append(Paragraph(f"No run has a {metric}: no target table."))
    blocks += [
        Heading(2, "Accuracy"),
        Image("accuracy vs wall-clock", "accuracy_vs_time.png"),
    ]
    if has_energy:
        blocks.append(Image("accuracy vs energy", "accuracy_vs_energy.png"))
    blocks += [
        Heading(2, "Per round"),
        Paragraph("round (s): that round alone; cumulative (s): from the start through it."),
    ]
    for s in summaries:
        blocks += [Heading(3, s.label), _round_table(s)]
    if has_energy:
        blocks += [
            Heading(2, "Energy per round by phase"),
            Image("energy per round by phase", "energy_per_round_by_phase.png"),
        ]
    if trace is not None:
        blocks += [
            Heading(2, f"Power per device, round {chosen_round}"),
            Image("power trace", trace.name),
        ]
    blocks += [
        Heading(2, "Peak memory"),
        _memory_table(memory),
        Image("peak memory", "peak_memory.png"),
        Heading(2, "Bytes per round"),
        Image("bytes per round", "bytes_per_round.png"),
        Heading(2, "Devices"),
        _device_table(summaries),
    ]
    markdown_path = out_dir / "report.md"
    html_path = out_dir / "report.html"
    markdown_path.write_text(to_markdown(blocks), encoding="utf-8")
    html_path.write_text(to_html(blocks, "jetfed profile report"), encoding="utf-8")
    return Report(markdown_path, html_path, images, target, targets, summaries)


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    """RUN_DIR/report for one run; beside the first run, named after all, for several."""
    first = Path(run_dirs[0])
    if len(run_dirs) == 1:
        return first / "report"
    return first.parent / ("report-" + "-vs-".join(Path(p).name for p in run_dirs))[:120]
