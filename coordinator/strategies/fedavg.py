"""FedAvg over deltas: global + Σ nₖ·Δₖ / Σ nₖ (for LoRA: A, B and the head separately).

The sum walks the tensors a few MB of rows at a time, reading each device's rows from its
upload's file on disk and summing nₖ·Δₖ in fp64 in device-id order. Memory: 2 × model size
(the global state and the result) for any number of devices, which is what lets full-model
rounds scale. A small state (LoRA: 298 KB) is summed in fp64 whole instead, each upload read in
one go: with a thousand devices a read per tensor and device (26,000 reads) cost more than the
sums (measured: 0.8 s → 0.3 s). Each element sees the same fp64 additions in the same order
either way. Bit-identical whatever order updates arrived in (n·Δ is exact in fp64 and the
order is fixed), so a rerun or a resumed run ends where an uninterrupted one does.

For LoRA, averaging A and B separately is inexact: mean(B)·mean(A) ≠ mean(B·A). The error it
makes is measured every round (`lowrank.averaged_factor_errors`, recorded in metrics.jsonl);
`ffa`, `exact` and `flexlora` avoid it (docs/AGGREGATION.md).
"""

from __future__ import annotations

from typing import List, Mapping, Optional

import torch

from jetfed.coordinator.strategies.base import AcceptedUpdate, Strategy, register_strategy
from jetfed.coordinator.strategies.lowrank import adapted_layers, averaged_factor_errors
from jetfed.edge.methods.base import Tensors
from jetfed.edge.tensorfile import read_rows, row_ranges, whole_tensors

WHOLE_SUM_MAX_BYTES = 16 << 20
"""fp64 sums of a state up to this size are held whole (see the module docstring)."""


def apply_mean_delta(
    global_state: Tensors,
    updates: List[AcceptedUpdate],
    scales: Optional[Mapping[str, float]] = None,
    out: Optional[Tensors] = None,
) -> Tensors:
    """global + Σ nₖ·sₖ·Δₖ / Σ nₖ per tensor, in fp64, a few MB of rows at a time.

    `scales` (device id → sₖ, 1 when absent) shrinks single deltas (clipped FedAvg). `out`:
    fp32 tensors to write the result into and return, which may be `global_state` itself
    (each row block of it is read before it is written): no second copy of the state."""
    if not updates:
        raise ValueError("no update to aggregate")
    ordered = sorted(updates, key=lambda item: item.update.device_id)
    total = float(sum(item.update.num_samples for item in ordered))
    weights = [
        float(item.update.num_samples) * (scales or {}).get(item.update.device_id, 1.0)
        for item in ordered
    ]
    small = sum(value.numel() for value in global_state.values()) * 8 <= WHOLE_SUM_MAX_BYTES
    if small and out is None:
        return _mean_delta_whole(global_state, ordered, weights, total)
    # results allocated before any block is read, so short-lived blocks do not fragment the
    # heap between long-lived results (that kept ~70 MB of holes resident)
    new_state = (
        out
        if out is not None
        else {name: torch.empty_like(v, dtype=torch.float32) for name, v in global_state.items()}
    )
    for name, value in global_state.items():
        result = new_state[name]
        for start, end in row_ranges(tuple(value.shape)):
            rows = slice(start, end) if value.dim() >= 2 else slice(None)
            acc = torch.zeros_like(value[rows], dtype=torch.float64)
            for item, weight in zip(ordered, weights):
                acc.add_(read_rows(item.tensors, name, start, end), alpha=weight)
            result[rows] = acc.div_(total).add_(value[rows])
    return new_state


def _mean_delta_whole(
    global_state: Tensors, ordered: List[AcceptedUpdate], weights: List[float], total: float
) -> Tensors:
    sums = {name: torch.zeros_like(v, dtype=torch.float64) for name, v in global_state.items()}
    for item, weight in zip(ordered, weights):
        for name, delta in whole_tensors(item.tensors):
            if name in sums:  # an update may carry more than the averaged state (ffa's A)
                sums[name].add_(delta, alpha=weight)
    return {
        name: sums[name].div_(total).add_(value).to(torch.float32)
        for name, value in global_state.items()
    }


@register_strategy
class FedAvg(Strategy):
    """The sample-weighted mean of the deltas, added to the global state (module doc)."""

    name = "fedavg"
    state_in_eval_model = True

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        new_state = apply_mean_delta(global_state, updates)
        self.layer_errors = averaged_factor_errors(self, global_state, updates, new_state)
        return new_state

    def aggregate_into(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> None:
        """The row-block sums written over the global state itself, block by block: a full
        model is held once while it is aggregated. A LoRA state's factor errors need the state
        before the round, so it is aggregated beside it (it is small)."""
        if adapted_layers(global_state):
            super().aggregate_into(round_index, global_state, updates)
            return
        apply_mean_delta(global_state, updates, out=global_state)
