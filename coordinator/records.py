"""What the coordinator records per run: one `RoundMetrics` per round (metrics.jsonl) and the
`CheckpointState` that `--resume` reads (checkpoint/state.json), and `device_totals`, a
round's energy and peak memory over its devices' phase records.

Plain pydantic models (and a function) with no dependency on the rest of the coordinator, paho,
torch or the method registry, so `profiles/` reads run directories without pulling any of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from jetfed.edge.telemetry.records import PhaseRecord


class AggregationError(BaseModel):
    """‖Σ pₖsₖBₖAₖ − s·B̄Ā‖_F / ‖Σ pₖsₖBₖAₖ‖_F per adapted LoRA layer: what the strategy's
    global adapter misses of the exact mean update (docs/AGGREGATION.md)."""

    model_config = ConfigDict(extra="forbid")

    mean: float
    worst_layer: str
    worst: float
    layers: Dict[str, float] = Field(default_factory=dict)

    @classmethod
    def of(cls, layers: Dict[str, float]) -> Optional[AggregationError]:
        """The summary of per-layer errors (None without LoRA layers)."""
        if not layers:
            return None
        worst = max(sorted(layers), key=lambda name: layers[name])
        return cls(
            mean=sum(layers.values()) / len(layers),
            worst_layer=worst,
            worst=layers[worst],
            layers=dict(sorted(layers.items())),
        )


class DeviceAssignment(BaseModel):
    """What `assignment:` gave one device this round, and why."""

    model_config = ConfigDict(extra="forbid")

    rank: Optional[int] = None
    batch_size: int
    local_steps: Optional[int] = None
    reason: str


class RoundMetrics(BaseModel):
    """What one round achieved and cost, from the coordinator's point of view."""

    model_config = ConfigDict(extra="forbid")

    round_index: int
    status: str
    method: str
    devices: List[str] = Field(default_factory=list)
    client_indices: Dict[str, int] = Field(default_factory=dict)
    """Each selected device's client index (its shard and seed) in this round."""
    num_selected: int = 0
    num_aggregated: int = 0
    accuracy: Optional[float] = None
    eval_loss: Optional[float] = None
    train_loss: Optional[float] = None
    bytes_up: int = 0
    bytes_down: int = 0
    round_s: float = 0.0
    eval_s: float = 0.0
    aggregate_s: float = 0.0
    overhead_s: Optional[float] = None
    wall_clock_s: float = 0.0
    aggregation_error: Optional[AggregationError] = None
    """LoRA methods: the aggregation error of this round's strategy (None when not aggregated)."""
    assignments: Dict[str, DeviceAssignment] = Field(default_factory=dict)
    refused: Dict[str, str] = Field(default_factory=dict)
    """Devices `assignment:` refused this round (too little memory for any rank): why."""
    extra: Dict[str, float] = Field(default_factory=dict)


class CheckpointState(BaseModel):
    """Where a run stands after its last completed round (tensors live beside it)."""

    model_config = ConfigDict(extra="forbid")

    experiment: str
    config_digest: str
    completed_round: int
    client_indices: Dict[str, int]
    wall_clock_s: float
    has_init: bool
    has_strategy_state: bool = False


def device_totals(records: List[PhaseRecord]) -> Dict[str, float]:
    """Energy (J) and peak RSS over the devices' records of one round. The idle baseline is no
    part of a round; energy is summed only when every phase measured it (never a partial sum)."""
    totals: Dict[str, float] = {}
    work = [r for r in records if r.phase != "idle"]
    energies = [r.energy_j for r in work if r.energy_j is not None]
    if work and len(energies) == len(work):
        totals["energy_j"] = float(sum(energies))
    peaks = [r.peak_rss_bytes for r in work if r.peak_rss_bytes is not None]
    if peaks:
        totals["peak_rss_bytes"] = float(max(peaks))
    return totals
