"""Exact LoRA aggregation: the mean of the products, not the product of the means.

FedAvg's B̄Ā misses P̄ = Σ pₖ·s·BₖAₖ. Two ways to hit it exactly (`aggregation.mode`):

- `fold` (default; FedEx-LoRA, Singhal et al., ACL 2025): keep FedAvg's B̄, Ā as the global
  adapter and add the residual R = P̄ − s·B̄Ā to the frozen base weight of each adapted layer,
  so the effective weight is W + s·B̄Ā + F with F = Σ_rounds R, i.e. W_before + P̄. FeDeRA's
  base is its residual W − s·B₀A₀; the fold adds to it with the same s = alpha/r. Devices must
  receive F: it travels as the task's `lora_fold` blob (cumulative, fp32, one dense out × in
  tensor per adapted layer, so a device that missed rounds needs nothing else) and
  `LoraMethod.local_round` folds it into the base. That blob is the downlink cost this adds
  per device per round: 4·Σ out·in bytes (MiniLM q,v: 1.2 MB per encoder layer; SmolLM2
  q,v: 1.7 MB per decoder layer), recorded as `fold_bytes`. The export writes F beside the
  adapter (`base_fold.safetensors`: add it to the base weights before merging).
- `svd`: re-factorise P̄ by truncated SVD at the run's rank (B = U√(S/s), A = √(S/s)Vᵀ):
  nothing extra travels, and the truncation error is what the round records. Only the top r
  singular triplets are found (`aggregation.svd_solver`, `truncated_svd.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import torch

from jetfed.coordinator.strategies.base import (
    AcceptedUpdate,
    ServerContext,
    Strategy,
    check_saved_state,
    register_strategy,
)
from jetfed.coordinator.strategies.fedavg import apply_mean_delta
from jetfed.coordinator.strategies.lowrank import (
    BASE_SUFFIX,
    COMPUTE,
    adapted_layers,
    factor_names,
    heads_of,
    layer_factors,
    method_scaling,
    rank_of,
    relative_error,
    split,
)
from jetfed.coordinator.strategies.truncated_svd import SvdSettings, top_singular
from jetfed.edge.methods.base import Tensors
from jetfed.edge.methods.lora import FOLD_BLOB, fold_into_base
from jetfed.edge.tensor_codec import encode_tensors

FOLD_FILE = "base_fold.safetensors"


def load_exported_adapter(base: Any, folder: Path) -> Any:
    """A round's exported adapter on `base`, as users load it, with an `exact` run's fold
    (FOLD_FILE beside the adapter) added to the base weights: the model the run evaluated.
    Without the fold the adapter alone would be a different model (`jetfed export-onnx`,
    `jetfed generate` load through here)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from jetfed.edge.models import quiet_transformers

    with quiet_transformers():
        model = PeftModel.from_pretrained(base, str(folder))
    fold_file = folder / FOLD_FILE
    if fold_file.exists():
        fold_into_base(model, load_file(str(fold_file)))
    return model


class ExactSettings(SvdSettings):
    mode: Literal["fold", "svd"] = "fold"
    """fold: FedAvg factors + the residual folded into the base; svd: P̄ re-factorised."""


@register_strategy
class ExactLora(Strategy):
    """P̄ = Σ pₖ·s·BₖAₖ exactly (fold) or at its best rank-r approximation (svd)."""

    name = "exact"
    settings_model = ExactSettings
    settings: ExactSettings

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        self.scaling = method_scaling(ctx.method)
        self.fold: Tensors = {}
        """Base weight name → F (fp32): what devices and the eval model add to the base."""
        self._fold_blob: Optional[bytes] = None

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        rank = rank_of(global_state, adapted_layers(global_state)[0])
        scaling = self.scaling(rank)
        frozen = self.ctx.init or {}
        per_layer = layer_factors(global_state, updates, self.scaling, frozen=frozen)
        if self.settings.mode == "fold":
            new_state = apply_mean_delta(global_state, updates)
        else:
            new_state = apply_mean_delta(heads_of(global_state), updates)
        errors: Dict[str, float] = {}
        folds: Tensors = {}  # kept aside until every layer is done: a bad upload changes nothing
        for prefix, factors in per_layer:
            name_a, name_b = factor_names(prefix)
            mean = factors.mean_product()
            if self.settings.mode == "svd":
                found = top_singular(mean, *factors.stacked(), rank, self.settings.svd_solver)
                b, a = split(found, rank, scaling)
                new_state[name_a], new_state[name_b] = a.float(), b.float()
            a = new_state[name_a] if name_a in new_state else frozen[name_a]
            effective = scaling * (new_state[name_b].to(COMPUTE) @ a.to(COMPUTE))
            if self.settings.mode == "fold":
                name = prefix + BASE_SUFFIX
                folds[name], increment = self._folded(name, mean - effective)
                effective += increment
            errors[prefix] = relative_error(mean, effective)
        if folds:
            self.fold.update(folds)
            self._fold_blob = None
        self.layer_errors = errors
        return new_state

    def _folded(self, name: str, residual: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(F[name] + R stored fp32, the increment as stored: what devices add)."""
        before = self.fold.get(name)
        after = (residual if before is None else before.double() + residual).float()
        increment = after.double() - (0.0 if before is None else before.double())
        return after, increment.to(COMPUTE)

    def fold_blob(self) -> bytes:
        if self._fold_blob is None:
            self._fold_blob = encode_tensors(self.fold)
        return self._fold_blob

    def configure_round(self, round_index: int, global_state: Tensors) -> Dict[str, bytes]:
        return {FOLD_BLOB: self.fold_blob()} if self.fold else {}

    def evaluate(self, global_state: Tensors) -> Dict[str, float]:
        fold_into_base(self.ctx.eval_model, self.fold)
        scores = super().evaluate(global_state)
        if self.fold:
            scores["fold_bytes"] = float(len(self.fold_blob()))
        return scores

    def export(self, global_state: Tensors, out_dir: str) -> None:
        super().export(global_state, out_dir)
        if self.fold:
            Path(out_dir, FOLD_FILE).write_bytes(self.fold_blob())

    def state(self) -> Tensors:
        return dict(self.fold)

    def load_state(self, tensors: Tensors) -> None:
        if self.fold:
            check_saved_state(self.fold, tensors, "exact fold")
        self.fold = dict(tensors)
        self._fold_blob = None
