"""Real-size federated states: the shapes a device really uploads, filled with random deltas."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Tuple

from jetfed.edge.wire import ModelRef

if TYPE_CHECKING:
    import torch

Spec = Dict[str, Tuple[int, ...]]

MINILM = ModelRef(name_or_path="minilm", num_labels=2, max_length=64)


def lora_spec(method: str = "lora") -> Spec:
    """Names and shapes of MiniLM's federated LoRA state (r=8 on query,value + the head)."""
    from jetfed.edge.methods.base import get_method
    from jetfed.edge.tensor_codec import tensor_spec

    instance = get_method(method)({}, MINILM)
    return tensor_spec(instance.get_state(instance.build(None, seed=0)))


def full_spec() -> Spec:
    """Every parameter of the MiniLM classifier: what full fine-tuning uploads."""
    from jetfed.edge.models import load_classifier

    model = load_classifier(MINILM, seed=0)
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


def smollm2_full_spec() -> Spec:
    """Every weight of SmolLM2-135M (538 MB fp32, tied embedding once): what full fine-tuning
    of the packaged causal LM uploads. Read from its safetensors header, nothing loaded."""
    from safetensors import safe_open

    from jetfed.edge.packaged_llm import smollm2_folder

    with safe_open(str(smollm2_folder() / "model.safetensors"), "pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118


def random_tensors(spec: Spec, seed: int, scale: float = 1e-3) -> Dict[str, torch.Tensor]:
    """Finite fp32 tensors of `spec`'s shapes, like a small local update."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) * scale for name, shape in spec.items()}


def raw_bytes(spec: Spec, bytes_per_element: int = 4) -> int:
    """The tensors' own bytes: the floor any encoding is compared against."""
    total = 0
    for shape in spec.values():
        count = 1
        for dim in shape:
            count *= dim
        total += count * bytes_per_element
    return total


def accepted_update(index: int, tensors: Dict[str, torch.Tensor]) -> Any:
    """An in-memory `AcceptedUpdate` of device `d{index:03d}` with 100 + index samples, as the
    intake would hand it to a strategy (no blob behind it)."""
    from jetfed.coordinator.strategies.base import AcceptedUpdate
    from jetfed.edge.wire import Update, make_manifest

    manifest = make_manifest(b"\x00", 1)
    update = Update(
        experiment="bench",
        device_id=f"d{index:03d}",
        round_index=0,
        base_digest="0" * 64,
        num_samples=100 + index,
        local_steps=1,
        train_loss=0.5,
        blob=manifest,
    )
    return AcceptedUpdate(update, tensors)
