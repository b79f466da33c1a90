"""A live per-round table for the terminal (rich), shared by `jetfed demo` and `coordinator run`."""

from __future__ import annotations

from typing import Any, List, Optional

from rich.console import Console
from rich.live import Live
from rich.table import Table

from coordinator.config import ExperimentConfig
from coordinator.quality import metric_name, metric_value
from coordinator.rundir import RoundMetrics

SHORT_NAMES = {"accuracy": "acc", "exact_match": "EM", "rouge_l": "ROUGE-L", "perplexity": "ppl"}


def _bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _opt(value: Optional[float], fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


class RoundTable:
    """`with RoundTable(config, clients) as table: ... table.add(metrics)`."""

    def __init__(
        self, config: ExperimentConfig, clients: int, console: Optional[Console] = None
    ) -> None:
        self.config = config
        self.clients = clients
        self.rows: List[RoundMetrics] = []
        self.console = console or Console()
        self._live = Live(
            self._render(), console=self.console, refresh_per_second=2, transient=False
        )

    def _render(self) -> Table:
        cfg = self.config
        table = Table(
            title=f"jetfed {cfg.name}: {cfg.method.name} on {cfg.model.name_or_path}, "
            f"{self.clients} devices, {cfg.rounds.count} rounds",
        )
        metric = metric_name(cfg.evaluation.metric, self.rows)
        columns = ("round", "devices", "loss", SHORT_NAMES.get(metric, metric), "up", "down")
        for column in (*columns, "s", "J", "mem"):
            table.add_column(column, justify="right", no_wrap=True)
        for m in self.rows:
            peak = m.extra.get("peak_rss_bytes")
            table.add_row(
                str(m.round_index + 1),
                f"{m.num_aggregated}/{m.num_selected}",
                _opt(m.train_loss, ".3f"),
                _opt(metric_value(m, metric), ".3f"),
                _bytes(m.bytes_up),
                _bytes(m.bytes_down),
                f"{m.round_s:.1f}",
                _opt(m.extra.get("energy_j"), ".1f"),
                "n/a" if peak is None else f"{peak / 1e6:.0f} MB",
            )
        if len(self.rows) < cfg.rounds.count:
            table.caption = "waiting for devices and updates..." if not self.rows else "training..."
        return table

    def add(self, metrics: RoundMetrics) -> None:
        self.rows.append(metrics)
        self._live.update(self._render())

    def __enter__(self) -> RoundTable:
        self._live.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._live.update(self._render())
        self._live.stop()
        self.console.print()
