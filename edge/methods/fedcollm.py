"""FedCoLLM: devices tune a small model (SLM) with LoRA; the coordinator co-tunes a large one (LLM).

On devices this is plain federated LoRA on the experiment's `model` (the SLM). The coordinator
(`coordinator/strategies/distill.py`) averages the SLM adapters, then distils LLM → SLM and SLM →
LLM on its auxiliary labelled data (CE + λ·KL at temperature T each way) and broadcasts the updated
SLM adapter: only the SLM's LoRA ever crosses the network. `method.llm` names the LLM (any Hugging
Face id or path sharing the SLM's tokenizer, e.g. Qwen2.5-0.5B with Qwen2.5-1.5B); the offline pair
is MiniLM with `model.num_hidden_layers: 3` as the SLM and the full 6-layer MiniLM as the LLM;
for causal LMs (instruction data, response tokens) SmolLM2 truncated as the SLM and SmolLM2
(`method.llm: smollm2`, all 30 layers unless `llm_num_hidden_layers`) as the LLM.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from jetfed.edge.distillation import DistillationSettings
from jetfed.edge.methods.base import register_method
from jetfed.edge.methods.lora import LoraMethod
from jetfed.edge.wire import ModelRef


class FedCoLLMSettings(DistillationSettings):
    llm: str = "minilm"
    """The coordinator's large model: a Hugging Face id or a local path."""
    llm_revision: Optional[str] = None
    llm_num_hidden_layers: Optional[int] = Field(default=None, ge=1)
    aux_split: str = "train"
    """Split of the coordinator's data.path holding its auxiliary labelled data."""
    aux_size: int = Field(default=256, ge=1, le=1_000_000)
    aux_seed: int = 0


@register_method
class FedCoLLMMethod(LoraMethod):
    name = "fedcollm"
    config_model = FedCoLLMSettings
    config: FedCoLLMSettings
    strategy = "fedcollm"

    def llm_ref(self) -> ModelRef:
        """The LLM: the SLM's task (labels, sequence length, kind, chat template, dtype)."""
        return self.model_ref.model_copy(
            update={
                "name_or_path": self.config.llm,
                "revision": self.config.llm_revision,
                "num_hidden_layers": self.config.llm_num_hidden_layers,
            }
        )

    def llm_method(self) -> LoraMethod:
        """LoRA on the LLM with the SLM's rank, alpha, dropout and target modules."""
        lora = self.config.model_dump(include={"rank", "alpha", "dropout", "target_modules"})
        return LoraMethod(lora, self.llm_ref())
