"""Robust aggregation: update-norm clipping, coordinate-wise median and trimmed mean.

FedAvg lets one device move the global model arbitrarily far; these strategies bound what a
faulty or malicious device can do; pair them with `aggregation.max_update_norm`, which the
coordinator applies to every strategy (an update with a larger global L2 norm gets a nack).
Settings come from the experiment's `aggregation:` section, e.g.

    aggregation:
      strategy: trimmed_mean      # or clipped_fedavg (clip_norm: 5.0), median (no setting)
      trim_fraction: 0.2          # trimmed_mean: share dropped at EACH end, per coordinate
      max_update_norm: 100.0      # any strategy: refuse updates beyond this norm

Updates carry deltas (the method's `local_round` uploads new − global); median and trimmed mean
ignore sample counts on purpose (a device could lie about them). Each setting belongs to one
strategy: any other key is a one-line error. Median and trimmed mean read one tensor of every
update at a time; clipped FedAvg sums row blocks like FedAvg. For LoRA each reports, like
FedAvg, the error of its factor-wise result against the mean of the products.
"""

from __future__ import annotations

import math
from typing import List, Mapping

import torch
from pydantic import Field

from jetfed.coordinator.strategies.base import (
    AcceptedUpdate,
    Strategy,
    StrategySettings,
    register_strategy,
)
from jetfed.coordinator.strategies.fedavg import apply_mean_delta
from jetfed.coordinator.strategies.lowrank import averaged_factor_errors
from jetfed.edge.methods.base import Tensors
from jetfed.edge.tensorfile import TensorFile


class ClipSettings(StrategySettings):
    clip_norm: float = Field(gt=0)
    """Each delta is scaled down to at most this global L2 norm."""


class TrimSettings(StrategySettings):
    trim_fraction: float = Field(default=0.1, ge=0, lt=0.5)
    """Share of values dropped at EACH end, per coordinate."""


def update_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over every tensor of an update (float64 accumulation); an upload's file
    measured it while it was validated."""
    if isinstance(tensors, TensorFile):
        return tensors.l2_norm
    total = sum(float(t.double().pow(2).sum()) for t in tensors.values())
    return math.sqrt(total)


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


@register_strategy
class ClippedFedAvg(Strategy):
    """FedAvg of deltas each clipped to L2 norm ≤ `clip_norm` (the DP-FedAvg bound)."""

    name = "clipped_fedavg"
    state_in_eval_model = True
    settings_model = ClipSettings
    settings: ClipSettings

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        bound = self.settings.clip_norm
        scales = {}
        for item in updates:
            norm = update_norm(item.tensors)
            if norm > bound:  # never scaled up
                scales[item.update.device_id] = bound / norm
        new_state = apply_mean_delta(global_state, updates, scales)
        self.layer_errors = averaged_factor_errors(self, global_state, updates, new_state)
        return new_state


@register_strategy
class CoordinateMedian(Strategy):
    """Per-coordinate median of the deltas (mean of the two middle ones for an even count)."""

    name = "median"
    state_in_eval_model = True

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        new_state = coordinate_statistic(global_state, updates, (len(updates) - 1) // 2)
        self.layer_errors = averaged_factor_errors(self, global_state, updates, new_state)
        return new_state


@register_strategy
class TrimmedMean(Strategy):
    """Per-coordinate mean after dropping floor(trim_fraction·n) values at each end."""

    name = "trimmed_mean"
    state_in_eval_model = True
    settings_model = TrimSettings
    settings: TrimSettings

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        trim = math.floor(self.settings.trim_fraction * len(updates))
        new_state = coordinate_statistic(global_state, updates, trim)
        self.layer_errors = averaged_factor_errors(self, global_state, updates, new_state)
        return new_state
