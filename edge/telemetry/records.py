"""The profile record: one per (device, round, phase). Shared by the edge and the profiles tool."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field

from jetfed.edge.bounds import (
    MAX_MAP_ENTRIES,
    Bytes,
    Count,
    Hertz,
    Joules,
    Metric,
    Name,
    Offset_s,
    RoundIndex,
    Seconds,
    UnixSeconds,
    Watts,
)

PHASES = ("download", "setup", "train", "eval", "upload", "idle")
MAX_TRACE_POINTS = 200
"""A phase's power trace is thinned to this many points: bounded messages, enough to plot."""


class PhaseRecord(BaseModel):
    """What one phase of one round cost one device. A sensor that is absent is None, never 0.
    Every number is range-checked (edge/bounds.py): records arrive from the network."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field(max_length=64)
    device_id: str = Field(max_length=64)
    round_index: RoundIndex
    phase: str = Field(max_length=32)
    method: str = Field(default="", max_length=64)
    start_unix_s: UnixSeconds
    end_unix_s: UnixSeconds
    duration_s: Seconds
    energy_j: Optional[Joules] = None
    energy_above_idle_j: Optional[Joules] = None
    energy_by_rail_j: Dict[Name, Optional[Joules]] = Field(
        default_factory=dict, max_length=MAX_MAP_ENTRIES
    )
    mean_power_w: Optional[Watts] = None
    peak_power_w: Optional[Watts] = None
    mean_power_by_rail_w: Dict[Name, Optional[Watts]] = Field(
        default_factory=dict, max_length=MAX_MAP_ENTRIES
    )
    peak_power_by_rail_w: Dict[Name, Optional[Watts]] = Field(
        default_factory=dict, max_length=MAX_MAP_ENTRIES
    )
    idle_power_w: Optional[Watts] = None
    peak_rss_bytes: Optional[Bytes] = None
    peak_system_used_bytes: Optional[Bytes] = None
    peak_gpu_memory_bytes: Optional[Bytes] = None
    peak_shared_memory_bytes: Optional[Bytes] = None
    bytes_sent: Bytes = 0
    bytes_received: Bytes = 0
    backend: str = Field(default="none", max_length=64)
    sample_rate_hz: Optional[Hertz] = None
    sample_count: Count = 0
    extra: Dict[Name, Metric] = Field(default_factory=dict, max_length=MAX_MAP_ENTRIES)
    power_trace: List[Tuple[Offset_s, Watts]] = Field(
        default_factory=list, max_length=MAX_TRACE_POINTS
    )
    """(seconds since start_unix_s, module W) of measured samples, thinned; empty without power."""
