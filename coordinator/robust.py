"""Robust aggregation: update-norm clipping, coordinate-wise median and trimmed mean.

FedAvg lets one device move the global model arbitrarily far; these strategies bound what a
faulty or malicious device can do; pair them with `aggregation.max_update_norm`, which the
coordinator applies to every strategy (an update with a larger global L2 norm gets a nack).
Settings come from the experiment's `aggregation:` section, e.g.

    aggregation:
      strategy: trimmed_mean      # or clipped_fedavg, median
      trim_fraction: 0.2          # trimmed_mean: share dropped at EACH end, per coordinate
      clip_norm: 5.0              # clipped_fedavg: each delta scaled to at most this L2 norm
      max_update_norm: 100.0      # any strategy: refuse updates beyond this norm

Updates carry deltas (the method's `local_round` uploads new − global); median and trimmed mean
ignore sample counts on purpose (a device could lie about them). These strategies need every
update of a round at once, so they keep the decoded tensors until `aggregate`.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinator.strategies import (
    AcceptedUpdate,
    ServerContext,
    Strategy,
    apply_mean_delta,
    register_strategy,
)
from edge.errors import UserError
from edge.methods.base import Tensors


class RobustSettings(BaseModel):
    """The `aggregation:` keys a robust strategy understands (others are refused)."""

    model_config = ConfigDict(extra="forbid")

    clip_norm: Optional[float] = Field(default=None, gt=0)
    trim_fraction: float = Field(default=0.1, ge=0, lt=0.5)


def update_norm(tensors: Tensors) -> float:
    """Global L2 norm over every tensor of an update (float64 accumulation)."""
    total = sum(float(t.double().pow(2).sum()) for t in tensors.values())
    return math.sqrt(total)


def clip_update(item: AcceptedUpdate, bound: float) -> AcceptedUpdate:
    """The same update with its delta scaled down to norm ≤ `bound` (never scaled up)."""
    norm = update_norm(item.tensors)
    if norm <= bound:
        return item
    scale = bound / norm
    return AcceptedUpdate(item.update, {n: t * scale for n, t in item.tensors.items()})


def coordinate_statistic(
    global_state: Tensors, updates: List[AcceptedUpdate], trim_each_end: int
) -> Tensors:
    """global + per-coordinate mean of the deltas left after dropping the `trim_each_end`
    smallest and largest values; for the median, trim all but the middle one or two."""
    new_state: Tensors = {}
    for name, value in global_state.items():
        stacked = torch.stack([item.tensors[name].double() for item in updates])
        ordered = stacked.sort(dim=0).values
        kept = ordered[trim_each_end : len(updates) - trim_each_end]
        new_state[name] = (value.double() + kept.mean(dim=0)).float()
    return new_state


class RobustStrategy(Strategy):
    """Shared settings parsing; subclasses define `aggregate`."""

    takes_settings = True
    required: Tuple[str, ...] = ()

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        try:
            self.robust = RobustSettings(**ctx.settings)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ()))
            raise UserError(f"aggregation.{where}: {first.get('msg')}") from None
        for key in self.required:
            if getattr(self.robust, key) is None:
                raise UserError(f"aggregation.{key} is required by strategy {self.name}")


@register_strategy
class ClippedFedAvg(RobustStrategy):
    """FedAvg of deltas each clipped to L2 norm ≤ `clip_norm` (the DP-FedAvg bound)."""

    name = "clipped_fedavg"
    required = ("clip_norm",)

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        bound = float(self.robust.clip_norm or 0.0)
        return apply_mean_delta(global_state, [clip_update(item, bound) for item in updates])


@register_strategy
class CoordinateMedian(RobustStrategy):
    """Per-coordinate median of the deltas (mean of the two middle ones for an even count)."""

    name = "median"

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        return coordinate_statistic(global_state, updates, (len(updates) - 1) // 2)


@register_strategy
class TrimmedMean(RobustStrategy):
    """Per-coordinate mean after dropping floor(trim_fraction·n) values at each end."""

    name = "trimmed_mean"

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        trim = math.floor(self.robust.trim_fraction * len(updates))
        return coordinate_statistic(global_state, updates, trim)
