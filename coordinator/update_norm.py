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
from typing import Dict

from jetfed.edge.methods.base import Tensors

LORA_A, LORA_B = ".lora_A.default.weight", ".lora_B.default.weight"


def update_norms(before: Tensors, new: Tensors, scaling: float) -> Dict[str, float]:
    """`update_norm` and `delta_w_norm` of the step before → new (float64 sums)."""
    squared_theta = squared_w = 0.0
    for name, value in new.items():
        if name not in before or before[name].shape != value.shape:
            continue  # a tensor the step added or reshaped has no change to measure
        change = value.double() - before[name].double()
        squared_theta += float(change.pow(2).sum())
        if not name.endswith((LORA_A, LORA_B)):
            squared_w += float(change.pow(2).sum())
    for name in new:
        if not name.endswith(LORA_A):
            continue
        name_b = name[: -len(LORA_A)] + LORA_B
        pair = (name, name_b)
        if any(n not in before or before[n].shape != new[n].shape for n in pair if n in new):
            continue
        if name_b not in new:
            continue
        product_new = new[name_b].double() @ new[name].double()
        product_old = before[name_b].double() @ before[name].double()
        squared_w += float((scaling * (product_new - product_old)).pow(2).sum())
    return {"update_norm": math.sqrt(squared_theta), "delta_w_norm": math.sqrt(squared_w)}
