"""The run as the terminal shows it, shared by `jetfed demo` and `coordinator run`: on a terminal
a live per-round table with each device's progress in the round under way (phase, local step
k/n, bytes moved); elsewhere (a log file, CI) one line per finished round, then the table.

Rounds are numbered from 0 everywhere: the wire, metrics.jsonl, this table, the report, its
plots and `global/round-NNNN/` (round 0 is the first trained round).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.live import Live
from rich.table import Table

from jetfed.coordinator.config import ExperimentConfig
from jetfed.coordinator.quality import metric_name, metric_value
from jetfed.coordinator.records import RoundMetrics
from jetfed.edge.wire import Progress

SHORT_NAMES = {"accuracy": "acc", "exact_match": "EM", "rouge_l": "ROUGE-L", "perplexity": "ppl"}


def _bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _opt(value: Optional[float], fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def progress_text(progress: Progress) -> str:
    """`demo-01 train 12/50, 298.0 KB down, 0 B up`."""
    step = f" {progress.step}/{progress.total_steps}" if progress.step is not None else ""
    return (
        f"{progress.device_id} {progress.phase}{step}, {_bytes(progress.bytes_received)} down, "
        f"{_bytes(progress.bytes_sent)} up"
    )


def lora_text(m: RoundMetrics) -> str:
    """`err 2.1e-02, ranks 4/8/16, 1 refused`: the LoRA aggregation error (worst layer) and what
    `assignment:` gave; empty when neither applies."""
    parts = []
    if m.aggregation_error is not None:
        parts.append(f"err {m.aggregation_error.worst:.1e}")
    ranks = sorted({a.rank for a in m.assignments.values() if a.rank is not None})
    if ranks:
        parts.append("ranks " + "/".join(str(rank) for rank in ranks))
    if m.refused:
        parts.append(f"{len(m.refused)} refused")
    return ", ".join(parts)


def round_line(m: RoundMetrics) -> str:
    """One finished round, for output that is not a terminal (as Flower logs every round)."""
    energy = m.extra.get("energy_j")
    devices = f"{m.num_aggregated}/{plural(m.num_selected, 'device')}"
    lora = lora_text(m)
    return (
        f"round {m.round_index}: {m.status}, {devices}, "
        f"loss {_opt(m.train_loss, '.3f')}, acc {_opt(m.accuracy, '.3f')}, "
        f"up {_bytes(m.bytes_up)}, down {_bytes(m.bytes_down)}, {m.round_s:.1f} s"
        + ("" if energy is None else f", {energy:.1f} J")
        + (f", {lora}" if lora else "")
    )


class RoundTable:
    """`with RoundTable(config, clients) as table: ... table.progress(p); table.add(metrics)`."""

    def __init__(
        self, config: ExperimentConfig, clients: int, console: Optional[Console] = None
    ) -> None:
        self.config = config
        self.clients = clients
        self.rows: List[RoundMetrics] = []
        self.devices: Dict[str, Progress] = {}
        self.console = console or Console()
        self._live: Optional[Live] = None
        if self.console.is_terminal:
            self._live = Live(
                self.render(), console=self.console, refresh_per_second=2, transient=False
            )

    @property
    def title(self) -> str:
        cfg = self.config
        return (
            f"jetfed {cfg.name}: {cfg.method.name} on {cfg.model.name_or_path}, "
            f"{plural(self.clients, 'device')}, {plural(cfg.rounds.count, 'round')}"
        )

    def render(self) -> Table:
        cfg = self.config
        table = Table(title=self.title, min_width=len(self.title), caption_justify="left")
        metric = metric_name(self.config.evaluation.metric, self.rows)
        columns = ("round", "devices", "loss", SHORT_NAMES.get(metric, metric), "up", "down")
        lora = any(lora_text(m) for m in self.rows)
        for column in (*columns, "s", "J", "mem", *(("lora",) if lora else ())):
            table.add_column(column, justify="right", no_wrap=True)
        for m in self.rows:
            peak = m.extra.get("peak_rss_bytes")
            table.add_row(
                str(m.round_index),
                f"{m.num_aggregated}/{m.num_selected}",
                _opt(m.train_loss, ".3f"),
                _opt(metric_value(m, metric), ".3f"),
                _bytes(m.bytes_up),
                _bytes(m.bytes_down),
                f"{m.round_s:.1f}",
                _opt(m.extra.get("energy_j"), ".1f"),
                "n/a" if peak is None else f"{peak / 1e6:.0f} MB",
                *((lora_text(m),) if lora else ()),
            )
        if len(self.rows) < cfg.rounds.count:
            if self.devices:
                round_index = max(p.round_index for p in self.devices.values())
                lines = [progress_text(self.devices[d]) for d in sorted(self.devices)]
                table.caption = f"round {round_index}:\n  " + "\n  ".join(lines)
            else:
                table.caption = "waiting for devices and updates..."
        return table

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self.render())

    def progress(self, report: Progress) -> None:
        """A device's progress in the round under way (the coordinator's `on_progress`)."""
        self.devices[report.device_id] = report
        self._refresh()

    def add(self, metrics: RoundMetrics) -> None:
        self.rows.append(metrics)
        self.devices = {}
        if self._live is None:
            self.console.print(round_line(metrics), soft_wrap=True)
        self._refresh()

    def __enter__(self) -> RoundTable:
        if self._live is not None:
            self._live.start()
        else:
            self.console.print(f"{self.title}; waiting for devices...", soft_wrap=True)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._live is not None:
            self._live.update(self.render())
            self._live.stop()
        elif self.rows:
            self.console.print(self.render())
        self.console.print()
