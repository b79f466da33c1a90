"""The profile record: one per (device, round, phase). Shared by the edge and the profiles tool."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field

PHASES = ("download", "setup", "train", "eval", "upload", "idle")
MAX_TRACE_POINTS = 200
"""A phase's power trace is thinned to this many points: bounded messages, enough to plot."""


class PhaseRecord(BaseModel):
    """What one phase of one round cost one device. A sensor that is absent is None, never 0."""

    model_config = ConfigDict(extra="forbid")

    experiment: str
    device_id: str
    round_index: int = Field(ge=0)
    phase: str
    method: str = ""
    start_unix_s: float
    end_unix_s: float
    duration_s: float = Field(ge=0)
    energy_j: Optional[float] = None
    energy_above_idle_j: Optional[float] = None
    energy_by_rail_j: Dict[str, Optional[float]] = Field(default_factory=dict)
    mean_power_w: Optional[float] = None
    peak_power_w: Optional[float] = None
    mean_power_by_rail_w: Dict[str, Optional[float]] = Field(default_factory=dict)
    peak_power_by_rail_w: Dict[str, Optional[float]] = Field(default_factory=dict)
    idle_power_w: Optional[float] = None
    peak_rss_bytes: Optional[int] = None
    peak_system_used_bytes: Optional[int] = None
    peak_gpu_memory_bytes: Optional[int] = None
    peak_shared_memory_bytes: Optional[int] = None
    bytes_sent: int = 0
    bytes_received: int = 0
    backend: str = "none"
    sample_rate_hz: Optional[float] = None
    sample_count: int = 0
    extra: Dict[str, float] = Field(default_factory=dict)
    power_trace: List[Tuple[float, float]] = Field(
        default_factory=list, max_length=MAX_TRACE_POINTS
    )
    """(seconds since start_unix_s, module W) of measured samples, thinned; empty without power."""
