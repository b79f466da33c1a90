"""Full fine-tuning (the FedLLM baseline every PEFT method is judged against).

Every weight is trained locally, the task head included; devices upload the delta of the whole
model and the coordinator's FedAvg (`coordinator/strategies/fedavg.py`) averages them by
sample count. The payload is the whole model (MiniLM fp32 ≈ 91 MB, GB for larger models), which
is why it travels as chunked, disk-backed blobs and can be compressed (`transfer.update_dtype`:
fp16, bf16 or int8 deltas). The export is a plain Hugging Face folder:
`AutoModelForSequenceClassification.from_pretrained(runs/<exp>/global/round-NNNN)` (or
`AutoModelForCausalLM` for a causal LM; SmolLM2's delta is 538 MB fp32).
"""

from __future__ import annotations

from typing import Any, Optional

from jetfed.edge.methods.base import FederatedMethod, InitialState, Tensors, register_method
from jetfed.edge.models import load_model


@register_method
class FullMethod(FederatedMethod):
    name = "full"
    default_learning_rate = 2e-5
    """5e-5 diverged under skew (NOTES.md); the default memory footprint is full's."""

    def build(self, init: Optional[Tensors], seed: int) -> Any:
        model = load_model(self.model_ref, seed=seed)
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def initial_state(self, seed: int) -> InitialState:
        """The built model's own parameters, not copies of them (the model itself is dropped):
        a copy would hold the whole model twice while the coordinator starts."""
        model = self.build(None, seed)
        return InitialState(
            global_state={name: param.detach() for name, param in model.named_parameters()}
        )
