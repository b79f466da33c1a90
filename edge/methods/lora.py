"""Plain federated LoRA: A random, B zero; devices train A, B and (classifiers) the task head.

Classifiers and causal LMs alike: the model's kind picks PEFT's task type. `target_modules` is
a list, a comma-separated string (`q_proj,v_proj`) or `all-linear`; unset, PEFT's per-model
default (query/value for BERT, q_proj/v_proj for Llama-style decoders).

Two options serve LoRA-aware aggregation (docs/AGGREGATION.md): `freeze_a` (FFA-LoRA) keeps A
at the shared init the coordinator ships once, so only B trains and travels and FedAvg of B is
exact (Σ pₖBₖA = B̄A); a task's `lora_fold` blob (the `exact` strategy, FedEx-LoRA) is added to
the frozen base weights before training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Union

from pydantic import Field, model_validator

from jetfed.edge.errors import ProtocolError
from jetfed.edge.methods.base import (
    FederatedMethod,
    InitialState,
    LocalResult,
    LocalRound,
    MemoryFootprint,
    MethodConfig,
    Tensors,
    register_method,
)
from jetfed.edge.models import default_target_modules, is_causal_lm, load_model, quiet_transformers

if TYPE_CHECKING:
    import torch

FOLD_BLOB = "lora_fold"
"""The task's extra blob (the `exact` strategy): base weight name → what is added to it."""


def factor_names(prefix: str) -> Tuple[str, str]:
    """A's and B's parameter names for the PEFT LoRA layer `prefix`."""
    return f"{prefix}.lora_A.default.weight", f"{prefix}.lora_B.default.weight"


A_SUFFIX, B_SUFFIX = factor_names("")


def fold_into_base(model: Any, fold: Mapping[str, torch.Tensor]) -> None:
    """Each named base weight := its value before any fold + the fold, summed in float64: the
    coordinator and every device hold the same bits, whichever rounds they took part in."""
    import torch

    params = dict(model.named_parameters())
    originals = model.__dict__.setdefault("unfolded_base", {})
    with torch.no_grad():
        for name, value in fold.items():
            weight = params.get(name)
            if weight is None or tuple(weight.shape) != tuple(value.shape):
                raise ProtocolError(f"fold tensor {name} {tuple(value.shape)} fits no base weight")
            original = originals.setdefault(name, weight.detach().clone())
            weight.copy_((original.double() + value.double()).to(weight.dtype))


class LoraSettings(MethodConfig):
    rank: int = Field(default=8, ge=1, le=4096)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: Optional[Union[List[str], str]] = None
    freeze_a: bool = False
    """FFA-LoRA (`aggregation.strategy: ffa`): A stays at the shared init, only B is trained
    and uploaded (half the upload)."""
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
        """With `freeze_a`, A is set from `init` (if given) and frozen: no gradient, no upload."""
        model = self.peft_model(self.config.rank, self.config.alpha, seed)
        if self.config.freeze_a:
            for name, param in model.named_parameters():
                if name.endswith(A_SUFFIX):
                    if init is not None and name in init:
                        param.data.copy_(init[name])
                    param.requires_grad_(False)
        return model

    def run_facts(self) -> Dict[str, float]:
        config = self.config
        return {
            "lora_rank": config.rank,
            "lora_alpha": config.alpha,
            "lora_scaling": config.scaling,
        }

    def initial_state(self, seed: int) -> InitialState:
        """With `freeze_a`, the A factors become the run's fixed init (the same on every
        device whatever its RNG)."""
        model = self.build(None, seed)
        init = None
        if self.config.freeze_a:
            init = {
                name: param.detach().clone()
                for name, param in model.named_parameters()
                if name.endswith(A_SUFFIX)
            }
        return InitialState(global_state=self.get_state(model), init=init)

    def local_round(self, job: LocalRound) -> LocalResult:
        """The default round, after folding the task's `lora_fold` (exact) into the base."""
        from jetfed.edge.tensor_codec import decode_tensors

        fold = job.extra_blobs.get(FOLD_BLOB)
        if fold is not None:
            fold_into_base(job.model, decode_tensors(fold))
        return super().local_round(job)

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
