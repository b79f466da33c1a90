"""FlexLoRA (Bai et al., NeurIPS 2024): devices of different LoRA ranks federate together.

The global adapter has the run's rank R (`method.rank`, the largest any device may train). A
device assigned rank r ≤ R (`assignment:`) starts from `lowrank.at_rank`: the first r
rows/columns of the global factors, rescaled so that s_r·B_rA_r = s_R·B[:, :r]A[:r]; since the
global factors are kept in SVD form, that is the best rank-r part of the global product. The
coordinator then forms the mean of the products P̄ = Σ pₖ·sₖ·BₖAₖ (each device at its own rank
and scaling sₖ = alpha/rₖ) and (`aggregation.heterogeneous`):

- `svd` (FlexLoRA): truncates P̄ by SVD to rank R, B = U√(S/s_R), A = √(S/s_R)Vᵀ; the round
  records the truncation error. Only the top R singular triplets are found
  (`aggregation.svd_solver`: seeded subspace iteration, or the dense SVD; `truncated_svd.py`).
- `zero_pad` (HetLoRA-style baseline): each device's factors back in rank-R units, zero-padded
  to R, and averaged factor by factor like FedAvg; the round records its (larger) error.

A classifier's head is averaged like FedAvg's. With every device at rank R, `svd` is `exact`'s
svd mode and `zero_pad` is FedAvg.
"""

from __future__ import annotations

import math
from typing import Dict, List, Literal, Tuple

import torch

from jetfed.coordinator.strategies.base import (
    AcceptedUpdate,
    ServerContext,
    Strategy,
    register_strategy,
)
from jetfed.coordinator.strategies.fedavg import apply_mean_delta
from jetfed.coordinator.strategies.lowrank import (
    LayerFactors,
    adapted_layers,
    at_rank,
    factor_names,
    heads_of,
    layer_factors,
    method_scaling,
    rank_of,
    relative_error,
    split,
)
from jetfed.coordinator.strategies.truncated_svd import SvdSettings, top_singular
from jetfed.edge.errors import UserError
from jetfed.edge.methods.base import Tensors


class FlexSettings(SvdSettings):
    heterogeneous: Literal["svd", "zero_pad"] = "svd"
    """svd: FlexLoRA's truncated SVD of the mean product; zero_pad: HetLoRA-style baseline."""


@register_strategy
class FlexLora(Strategy):
    """Mean of the products of devices at any rank ≤ R, back to rank R (module doc)."""

    name = "flexlora"
    settings_model = FlexSettings
    settings: FlexSettings

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        self.scaling = method_scaling(ctx.method)

    def device_state(self, global_state: Tensors, rank: int) -> Tensors:
        full = rank_of(global_state, adapted_layers(global_state)[0])
        if rank > full:
            raise UserError(
                f"assignment: rank {rank} is above method.rank {full}, the global adapter's "
                "rank (the largest any device may train)"
            )
        return at_rank(global_state, rank, self.scaling)

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        layers = adapted_layers(global_state)
        full = rank_of(global_state, layers[0])
        ranks = {rank_of(item.tensors, layers[0]) for item in updates} - {full}
        starts = {rank: at_rank(global_state, rank, self.scaling) for rank in sorted(ranks)}
        per_layer = layer_factors(global_state, updates, self.scaling, starts=starts)
        new_state = apply_mean_delta(heads_of(global_state), updates)
        scaling = self.scaling(full)
        errors: Dict[str, float] = {}
        for prefix, factors in per_layer:
            mean = factors.mean_product()
            if self.settings.heterogeneous == "svd":
                found = top_singular(mean, *factors.stacked(), full, self.settings.svd_solver)
                b, a = split(found, full, scaling)
            else:
                b, a = self._zero_padded_mean(factors, full, scaling)
            name_a, name_b = factor_names(prefix)
            new_state[name_a], new_state[name_b] = a.float(), b.float()
            errors[prefix] = relative_error(mean, scaling * (b @ a))
        self.layer_errors = errors
        return new_state

    @staticmethod
    def _zero_padded_mean(
        factors: LayerFactors, full: int, scaling: float
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Σ pₖ·pad(Bₖ/cₖ), Σ pₖ·pad(Aₖ/cₖ) with cₖ = √(s_R/sₖ) (rank-R units)."""
        b_mean = torch.zeros(factors.b.shape[0], full, dtype=factors.b.dtype)
        a_mean = torch.zeros(full, factors.a.shape[1], dtype=factors.a.dtype)
        for (b, a), weight, device_scaling in zip(
            factors.factors(), factors.weights, factors.scalings
        ):
            rank = b.shape[1]
            back = weight / math.sqrt(scaling / device_scaling)
            b_mean[:, :rank] += back * b
            a_mean[:rank] += back * a
        return b_mean, a_mean
