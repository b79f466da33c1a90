"""Plain federated LoRA: A random, B zero; devices train A, B and (classifiers) the task head.

Classifiers and causal LMs alike: the model's kind picks PEFT's task type. `target_modules` is
a list, a comma-separated string (`q_proj,v_proj`) or `all-linear`; unset, PEFT's per-model
default (query/value for BERT, q_proj/v_proj for Llama-style decoders).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from pydantic import Field, model_validator

from jetfed.edge.methods.base import (
    FederatedMethod,
    InitialState,
    MemoryFootprint,
    MethodConfig,
    Tensors,
    register_method,
)
from jetfed.edge.models import default_target_modules, is_causal_lm, load_model, quiet_transformers


class LoraSettings(MethodConfig):
    rank: int = Field(default=8, ge=1, le=4096)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: Optional[Union[List[str], str]] = None
    alpha_equals_rank: bool = False
    """The α = r convention (scaling α/r = 1, as in the FeDeRA paper's setups) instead of a
    fixed α; the scaling each run trained with is in every round's metrics (`lora_scaling`)."""

    @model_validator(mode="before")
    @classmethod
    def _alpha_from_rank(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("alpha_equals_rank"):
            rank = data.get("rank", cls.model_fields["rank"].default)
            if data.get("alpha", rank) != rank:
                raise ValueError("alpha_equals_rank sets alpha to the rank: drop alpha")
            data = {**data, "alpha": rank}
        return data

    def targets(self, model: Any) -> Union[List[str], str]:
        """The configured targets (`all-linear` passes through), else the model's default."""
        if isinstance(self.target_modules, str):
            if self.target_modules == "all-linear":
                return self.target_modules
            return [name.strip() for name in self.target_modules.split(",") if name.strip()]
        return self.target_modules or default_target_modules(model)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@register_method
class LoraMethod(FederatedMethod):
    name = "lora"
    config_model = LoraSettings
    config: LoraSettings
    default_learning_rate = 1e-3

    def peft_model(self, rank: int, alpha: float, seed: int) -> Any:
        """The base model wrapped by PEFT LoRA (a classifier's head trained as
        `modules_to_save`)."""
        from peft import LoraConfig, TaskType, get_peft_model

        base = load_model(self.model_ref, seed=seed)
        peft_config = LoraConfig(
            task_type=TaskType.CAUSAL_LM if is_causal_lm(base) else TaskType.SEQ_CLS,
            r=rank,
            lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT accepts floats
            lora_dropout=self.config.dropout,
            target_modules=self.config.targets(base),
        )
        with quiet_transformers():
            return get_peft_model(base, peft_config)

    def build(self, init: Optional[Tensors], seed: int) -> Any:
        return self.peft_model(self.config.rank, self.config.alpha, seed)

    def run_facts(self) -> Dict[str, float]:
        config = self.config
        return {
            "lora_rank": config.rank,
            "lora_alpha": config.alpha,
            "lora_scaling": config.scaling,
        }

    def initial_state(self, seed: int) -> InitialState:
        return InitialState(global_state=self.get_state(self.build(None, seed)))

    def lora_params(self, model: Any, layers: Optional[int] = None) -> int:
        """LoRA parameters this method adds to `model` (in its first `layers` layers if given)."""
        from jetfed.edge.memory_budget import lora_params

        return lora_params(model, self.config.rank, self.config.target_modules, layers)

    def memory_footprint(self, model: Any) -> MemoryFootprint:
        """The frozen base, LoRA and the task head trained."""
        from jetfed.edge.memory_budget import head_params, num_layers

        return MemoryFootprint(
            held_params=sum(param.numel() for param in model.parameters()),
            trainable_params=self.lora_params(model) + head_params(model),
            layers=num_layers(model),
        )
