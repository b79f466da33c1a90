"""FeDeRA: federated LoRA initialised from the top-r SVD of each pre-trained weight.

This is PEFT's PiSSA init used federatedly. For W = U S Vᵀ and scaling s = alpha/r:
A₀ = √(S_r/s)·V_rᵀ, B₀ = U_r·√(S_r/s), so s·B₀A₀ is the best rank-r part of W, and the frozen
base becomes the residual W − s·B₀A₀. SVD results differ between libraries, thread counts and
precisions (even in sign), so only the coordinator runs the SVD and ships A₀, B₀ as the run's
fixed `init`; every device rebuilds the residual from those factors in float64, which makes the
residual bitwise identical on every device.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, Optional, Tuple

from jetfed.edge.errors import UserError
from jetfed.edge.methods.base import InitialState, MemoryFootprint, Tensors, register_method
from jetfed.edge.methods.lora import LoraMethod, factor_names
from jetfed.edge.models import quiet_transformers


def _lora_layers(model: Any) -> Iterator[Tuple[str, Any]]:
    """(parameter-name prefix, layer) for every PEFT LoRA layer of the model."""
    for module_name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            yield module_name, module


@register_method
class FederaMethod(LoraMethod):
    name = "federa"
    default_learning_rate = 5e-4
    """PiSSA wants less than LoRA (NOTES.md: 5e-4 worked, 2e-4 was slow)."""

    def memory_footprint(self, model: Any) -> MemoryFootprint:
        """LoRA's, plus the fixed A₀/B₀ copy kept for the export."""
        footprint = super().memory_footprint(model)
        footprint.held_params += self.lora_params(model)
        return footprint

    def svd_factors(self, model: Any) -> Tensors:
        """Exact fp32 SVD of every target weight → PiSSA-scaled A₀, B₀ (coordinator only)."""
        import torch

        rank, scaling = self.config.rank, self.config.scaling
        factors: Dict[str, torch.Tensor] = {}
        for prefix, layer in _lora_layers(model):
            weight = layer.base_layer.weight.detach().to(torch.float32)
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            root = torch.sqrt(s[:rank] / scaling)
            name_a, name_b = factor_names(prefix)
            factors[name_a] = (root[:, None] * vh[:rank]).contiguous()
            factors[name_b] = (u[:, :rank] * root[None, :]).contiguous()
        return factors

    def initial_state(self, seed: int) -> InitialState:
        model = super().build(None, seed)
        init = self.svd_factors(model)
        model = self.build(init, seed)
        return InitialState(global_state=self.get_state(model), init=init)

    def build(self, init: Optional[Tensors], seed: int) -> Any:
        """LoRA model whose base weights are the residuals W − s·B₀A₀ and A=A₀, B=B₀."""
        import torch

        if init is None:
            raise UserError("federa needs the coordinator's SVD factors (the task's init_state)")
        model = super().build(None, seed)
        rank = self.config.rank
        with torch.no_grad():
            for prefix, layer in _lora_layers(model):
                name_a, name_b = factor_names(prefix)
                a0, b0 = init[name_a], init[name_b]
                # the residual uses the init's rank R: a device assigned r < R (flexlora) keeps
                # the run's base and starts from the top-r part, s_r·B_rA_r = s_R·B₀[:, :r]A₀[:r]
                scaling = self.config.model_copy(update={"rank": int(a0.shape[0])}).scaling
                weight = layer.base_layer.weight
                residual = weight.double() - scaling * (b0.double() @ a0.double())
                weight.copy_(residual.to(weight.dtype))
                share = math.sqrt(scaling / self.config.scaling)
                layer.lora_A["default"].weight.copy_(a0[:rank] * share)
                layer.lora_B["default"].weight.copy_(b0[:, :rank] * share)
        model.federa_init = init
        return model

    def export(self, model: Any, out_dir: str) -> None:
        """A rank-2r LoRA on the ORIGINAL base: s·(BA − B₀A₀) = s·[B, −B₀]·[A; A₀].

        PEFT's own PiSSA→LoRA conversion drops the task head; this keeps it.
        """
        import torch

        init: Tensors = model.federa_init
        export = self.peft_model(2 * self.config.rank, 2 * self.config.alpha, seed=0)
        state = self.get_state(model)
        factors = dict(model.named_parameters())  # A is no state under freeze_a
        with torch.no_grad():
            for prefix, layer in _lora_layers(export):
                name_a, name_b = factor_names(prefix)
                layer.lora_A["default"].weight.copy_(torch.cat([factors[name_a], init[name_a]], 0))
                layer.lora_B["default"].weight.copy_(torch.cat([factors[name_b], -init[name_b]], 1))
        heads = {name: value for name, value in state.items() if "lora_" not in name}
        self.set_state(export, heads)
        with quiet_transformers():
            export.save_pretrained(out_dir)
