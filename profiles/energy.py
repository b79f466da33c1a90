"""Energy, duration and power of an existing tegrastats log (no device, no torch needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict

from jetfed.edge.errors import UserError
from jetfed.edge.telemetry.energy import trapezoid_j
from jetfed.edge.telemetry.rails import module_power_w, module_rail_names
from jetfed.edge.telemetry.tegrastats_parse import TegrastatsLine, parse_line

TEGRASTATS_DEFAULT_INTERVAL_MS = 1000


class ChannelEnergy(BaseModel):
    """One rail, or the module total, over the whole log."""

    model_config = ConfigDict(extra="forbid")

    energy_j: Optional[float]
    mean_power_w: Optional[float]
    peak_power_w: Optional[float]


class TegrastatsEnergy(BaseModel):
    """What `jetfed profiles energy` prints."""

    model_config = ConfigDict(extra="forbid")

    source: str
    line_count: int
    time_source: str
    duration_s: float
    module_rails: List[str]
    module: ChannelEnergy
    rails: Dict[str, ChannelEnergy]


def _channel(
    times_s: List[float], power_w: List[Optional[float]], duration_s: float
) -> ChannelEnergy:
    energy_j = trapezoid_j(times_s, power_w)
    known = [value for value in power_w if value is not None]
    return ChannelEnergy(
        energy_j=energy_j,
        mean_power_w=energy_j / duration_s if energy_j is not None and duration_s > 0 else None,
        peak_power_w=max(known) if known else None,
    )


def _times(lines: List[TegrastatsLine], interval_ms: Optional[int]) -> Tuple[List[float], str]:
    """The lines' own timestamps when all have one and they strictly increase, else the
    interval (tegrastats' one-second stamps repeat when it logs faster than 1 Hz)."""
    stamps = [line.timestamp_unix_s for line in lines]
    if all(stamp is not None for stamp in stamps):
        values = [float(stamp) for stamp in stamps if stamp is not None]
        if all(b > a for a, b in zip(values, values[1:])):
            return [value - values[0] for value in values], "line"
        if interval_ms is None:
            raise UserError(
                "the log's timestamps repeat (logged faster than 1 Hz): pass --interval-ms N, "
                "the --interval tegrastats ran with"
            )
    step_s = (interval_ms or TEGRASTATS_DEFAULT_INTERVAL_MS) / 1000.0
    return [index * step_s for index in range(len(lines))], "interval"


def analyse_tegrastats(
    text_lines: Iterable[str], interval_ms: Optional[int] = None, source: str = "-"
) -> TegrastatsEnergy:
    """Per-rail and module energy of tegrastats output; lines without power rails are ignored."""
    if interval_ms is not None and interval_ms <= 0:
        raise UserError("--interval-ms must be a positive number of milliseconds")
    lines = [parsed for parsed in map(parse_line, text_lines) if parsed.rails_w]
    if not lines:
        raise UserError(f"{source}: no tegrastats lines with power rails (NAME 123mW/123mW)")
    times_s, time_source = _times(lines, interval_ms)
    duration_s = times_s[-1] - times_s[0]
    names = sorted({name for line in lines for name in line.rails_w})
    rails = {
        name: _channel(times_s, [line.rails_w.get(name) for line in lines], duration_s)
        for name in names
    }
    module = _channel(times_s, [module_power_w(line.rails_w) for line in lines], duration_s)
    return TegrastatsEnergy(
        source=source,
        line_count=len(lines),
        time_source=time_source,
        duration_s=duration_s,
        module_rails=list(module_rail_names(names)),
        module=module,
        rails=rails,
    )


def analyse_tegrastats_file(path: Path, interval_ms: Optional[int] = None) -> TegrastatsEnergy:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise UserError(f"--tegrastats {path}: cannot read the log ({exc.strerror})") from exc
    return analyse_tegrastats(text.splitlines(), interval_ms, source=str(path))
