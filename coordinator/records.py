"""What the coordinator records per run: one `RoundMetrics` per round (metrics.jsonl) and the
`CheckpointState` that `--resume` reads (checkpoint/state.json).

Plain pydantic models with no dependency on the rest of the coordinator, paho, torch or the
method registry, so `profiles/` reads run directories without pulling any of them.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field


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
