"""How far one round moved the global model, recorded per round in metrics.jsonl.

- `update_norm` = ‖θ′ − θ‖₂ over the federated tensors (what the devices' deltas averaged to);
- `delta_w_norm` = ‖W′ − W‖₂ over the weights the model computes with: a LoRA pair (A, B) of a
  layer acts as W₀ + s·BA, so its change is s·(B′A′ − BA), not the change of the factors.
  Factors that start large (FeDeRA's SVD init) move W more for the same step on A and B; this
  is the number that compares methods at equal learning rates. Other tensors (a classifier
  head, full fine-tuning's weights) count as they are.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping

import torch

from jetfed.edge.methods.base import Tensors
from jetfed.edge.tensorfile import read_rows, row_ranges, tensor_shape

LORA_A, LORA_B = ".lora_A.default.weight", ".lora_B.default.weight"


def _squared_change(before: Mapping[str, torch.Tensor], name: str, new: torch.Tensor) -> float:
    """‖new − before[name]‖² in fp64, a few MB of rows at a time: whole, a 113 MB embedding's
    fp64 copies and their difference took 0.7 GB next to both states (SmolLM2, `full`)."""
    squared = 0.0
    for start, end in row_ranges(tuple(new.shape)):
        rows = new[start:end] if new.dim() >= 2 else new
        old = read_rows(before, name, start, end)
        squared += float((rows.double() - old.double()).pow(2).sum())
    return squared


def update_norms(
    before: Mapping[str, torch.Tensor], new: Tensors, scaling: float
) -> Dict[str, float]:
    """`update_norm` and `delta_w_norm` of the step before → new (float64 sums). `before` may
    be a file (`TensorFile`: the previous state as it was offered to devices), read by rows."""
    squared_theta = squared_w = 0.0
    for name, value in new.items():
        if name not in before or tensor_shape(before, name) != tuple(value.shape):
            continue  # a tensor the step added or reshaped has no change to measure
        squared = _squared_change(before, name, value)
        squared_theta += squared
        if not name.endswith((LORA_A, LORA_B)):
            squared_w += squared
    for name in new:
        if not name.endswith(LORA_A):
            continue
        name_b = name[: -len(LORA_A)] + LORA_B
        pair = (name, name_b)
        if any(
            n not in before or tensor_shape(before, n) != tuple(new[n].shape)
            for n in pair
            if n in new
        ):
            continue
        if name_b not in new:
            continue
        product_new = new[name_b].double() @ new[name].double()
        product_old = before[name_b].double() @ before[name].double()
        squared_w += float((scaling * (product_new - product_old)).pow(2).sum())
    return {"update_norm": math.sqrt(squared_theta), "delta_w_norm": math.sqrt(squared_w)}
