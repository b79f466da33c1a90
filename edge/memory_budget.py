"""Will local training fit? Memory estimated from the model's config, before any weight loads.

The model is instantiated on PyTorch's `meta` device (shapes, no storage), so parameter counts
and the LoRA target layers are exact for any architecture transformers knows. Its config comes
from the model when it is installed, else from the facts jetfed ships for the causal LMs users
ask about (`jetfed.edge.architectures`: SmolLM2, Qwen2.5-0.5B, Llama-3.2-1B), so a device's
budget can be planned offline. On top of that:

- weights fp32 (the methods train in fp32), gradients and AdamW's two moments for the trainable
  parameters only;
- activations of an encoder layer kept for the backward pass, per token:
  ≈ 12·hidden + 2·intermediate values, plus heads·seq attention probabilities, all fp32, with the
  batch padded to `max_length` (the worst case: batches are padded to their longest sample);
- with `gradient_checkpointing` (`model.gradient_checkpointing`), only each layer's input is
  kept, plus one layer's activations while it is recomputed;
- causal LMs: the lm_head's logits where the loss is (jetfed.edge.causal_lm gathers the response
  positions first): batch × response tokens × vocab fp32 values, LOGITS_COPIES of them (logits,
  log-softmax, their gradient); response tokens default to `max_length` (the worst case). A
  naive loop over all positions would hold this for every token, prompt and padding included;
- the runtime: Python + torch + transformers + peft as imported by the agent. On CPU that is
  RUNTIME_CPU_BYTES (measured: torch 2.13 CPU, transformers 5.23, x86); CUDA adds its context
  and kernels, CUDA_RUNTIME_BYTES (an assumption, not a measurement: cuBLAS/cuDNN handles on
  Orin are of this order).

What the DEVICE holds is the method's own fact: `FederatedMethod.memory_footprint(model)` counts
held and trainable parameters, the layers whose activations are kept and the forward graphs per
step, with the counting helpers below (`lora_params`, `head_params`). So any
registered method is budgeted, and a new one that trains every weight is by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict

from jetfed.edge.errors import UserError, one_line

FP32_BYTES = 4
ADAMW_STATES = 2
RUNTIME_CPU_BYTES = 420 << 20
CUDA_RUNTIME_BYTES = 1 << 30
ACTIVATION_HIDDEN_FACTOR = 12
ACTIVATION_INTERMEDIATE_FACTOR = 2
LOGITS_COPIES = 3


class MemoryEstimate(BaseModel):
    """Bytes per component of one device's training process; `total_bytes` is their sum."""

    model_config = ConfigDict(extra="forbid")

    model: str
    source: str
    """Where the architecture came from (its config.json, or the facts jetfed ships)."""
    method: str
    batch_size: int
    max_length: int
    total_params: int
    trainable_params: int
    layers_on_device: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    logits_bytes: int = 0
    runtime_bytes: int
    total_bytes: int


@dataclass
class BudgetModel:
    """A model on the meta device (shapes only) and where its architecture came from."""

    model: Any
    source: str


def budget_model(name_or_path: str, num_labels: int = 2) -> BudgetModel:
    """The model (causal LM or classifier, by its config) on the meta device: from its own
    config.json when it is installed (folder, packaged name, Hugging Face cache), else from the
    architecture facts jetfed ships (`jetfed.edge.architectures`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from jetfed.edge.architectures import KNOWN_ARCHITECTURES, known_architecture
    from jetfed.edge.models import quiet_transformers, resolve_model_path

    with quiet_transformers():
        try:
            path = resolve_model_path(name_or_path)
            try:
                config = AutoConfig.from_pretrained(path, num_labels=num_labels)
            except (OSError, ValueError) as exc:
                raise UserError(
                    f"--model {name_or_path!r}: cannot read its config: {one_line(exc)}"
                ) from None
            source = f"the config.json of {path}"
        except UserError as exc:
            known = known_architecture(name_or_path)
            if known is None:
                raise UserError(
                    f"{exc} (architectures known without download: "
                    f"{', '.join(KNOWN_ARCHITECTURES)})"
                ) from None
            config = known.config()
            source = f"{known.hub_id}'s config.json, as shipped with jetfed"
        causal = any(a.endswith("ForCausalLM") for a in config.architectures or [])
        auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        with torch.device("meta"):
            return BudgetModel(model=auto.from_config(config), source=source)


def lora_params(
    model: Any,
    rank: int,
    targets: Union[List[str], str, None] = None,
    layers: Optional[int] = None,
) -> int:
    """r·(in + out) per targeted Linear (the architecture's default targets unless given;
    `all-linear`: every Linear inside a layer), in the first `layers` layers if given."""
    import torch

    from jetfed.edge.models import default_target_modules

    every = targets == "all-linear"
    names = [] if every else list(targets or default_target_modules(model))
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        index = _layer_index(name)
        if not (index is not None if every else name.rsplit(".", 1)[-1] in names):
            continue
        if layers is not None and index not in range(layers):
            continue
        count += rank * (module.in_features + module.out_features)
    return count


def _layer_index(name: str) -> Optional[int]:
    """`bert.encoder.layer.3.attention...` → 3."""
    parts = name.split(".")
    for before, part in zip(parts, parts[1:]):
        if before in ("layer", "layers", "h", "block") and part.isdigit():
            return int(part)
    return None


def head_params(model: Any) -> int:
    """Parameters of the task head (`classifier.*` or `score.*`)."""
    from jetfed.edge.train import is_head_parameter

    return sum(p.numel() for name, p in model.named_parameters() if is_head_parameter(name))


def num_layers(model: Any) -> int:
    return int(model.config.num_hidden_layers)


class TrainingBudget:
    """One model and method on the meta device, estimated at any batch: the model is built once
    (a 1B-parameter meta model takes seconds), the per-batch arithmetic is cheap."""

    def __init__(
        self,
        name_or_path: str,
        method: str,
        max_length: int,
        num_labels: int = 2,
        method_config: Optional[Mapping[str, Any]] = None,
    ) -> None:
        from jetfed.edge.methods.base import get_method
        from jetfed.edge.wire import ModelRef

        ref = ModelRef(name_or_path=name_or_path, num_labels=num_labels, max_length=max_length)
        federated = get_method(method)(method_config or {}, ref)
        self.name_or_path, self.method, self.max_length = name_or_path, method, max_length
        built = budget_model(name_or_path, num_labels)
        self.model, self.source = built.model, built.source
        self.footprint = federated.memory_footprint(self.model)
        self.total_params = sum(param.numel() for param in self.model.parameters())
        self.causal = type(self.model).__name__.endswith("ForCausalLM")

    def estimate(
        self,
        batch_size: int,
        cuda: bool = False,
        response_tokens: Optional[int] = None,
        gradient_checkpointing: bool = False,
    ) -> MemoryEstimate:
        config, footprint, max_length = self.model.config, self.footprint, self.max_length
        hidden = int(config.hidden_size)
        intermediate = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
        heads = int(config.num_attention_heads)
        tokens = batch_size * max_length
        per_layer = (
            tokens
            * (ACTIVATION_HIDDEN_FACTOR * hidden + ACTIVATION_INTERMEDIATE_FACTOR * intermediate)
            + batch_size * heads * max_length * max_length
        )
        kept = footprint.layers * per_layer
        if gradient_checkpointing:  # each layer's input, plus one layer recomputed at a time
            kept = footprint.layers * tokens * hidden + per_layer
        activations = footprint.graphs * (kept + tokens * hidden) * FP32_BYTES
        logits = 0
        if self.causal and footprint.logits_on_device:
            answer = min(max_length, response_tokens or max_length)
            logits = batch_size * answer * int(config.vocab_size) * FP32_BYTES * LOGITS_COPIES
        runtime = RUNTIME_CPU_BYTES + (CUDA_RUNTIME_BYTES if cuda else 0)
        weights = footprint.held_params * FP32_BYTES
        gradients = footprint.trainable_params * FP32_BYTES
        optimizer = footprint.trainable_params * FP32_BYTES * ADAMW_STATES
        return MemoryEstimate(
            model=self.name_or_path,
            source=self.source,
            method=self.method,
            batch_size=batch_size,
            max_length=max_length,
            total_params=self.total_params,
            trainable_params=footprint.trainable_params,
            layers_on_device=footprint.layers,
            weights_bytes=weights,
            gradients_bytes=gradients,
            optimizer_bytes=optimizer,
            activations_bytes=activations,
            logits_bytes=logits,
            runtime_bytes=runtime,
            total_bytes=weights + gradients + optimizer + activations + logits + runtime,
        )


def estimate_training_memory(
    name_or_path: str,
    method: str,
    batch_size: int,
    max_length: int,
    num_labels: int = 2,
    method_config: Optional[Mapping[str, Any]] = None,
    cuda: bool = False,
    response_tokens: Optional[int] = None,
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """Peak memory of a device's local round for the registered `method` (with its `method:`
    settings, e.g. rank or cut_layer), from the model's config alone."""
    budget = TrainingBudget(name_or_path, method, max_length, num_labels, method_config)
    return budget.estimate(batch_size, cuda, response_tokens, gradient_checkpointing)


def describe(estimate: MemoryEstimate) -> List[str]:
    """Short `component size` lines for a report."""
    mib = 1 << 20
    return [
        f"weights {estimate.weights_bytes / mib:.0f} MiB",
        f"grads+AdamW {(estimate.gradients_bytes + estimate.optimizer_bytes) / mib:.0f} MiB "
        f"({estimate.trainable_params:,} trainable)",
        f"activations {estimate.activations_bytes / mib:.0f} MiB",
        *([f"logits {estimate.logits_bytes / mib:.0f} MiB"] if estimate.logits_bytes else []),
        f"runtime {estimate.runtime_bytes / mib:.0f} MiB",
    ]
