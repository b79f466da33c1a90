"""Architecture facts of the causal LMs users ask about, so the memory budget answers offline.

`jetfed doctor --model qwen2.5-0.5b` must say whether a Jetson fits that model without its
weights or even its config.json being on this machine (HF_HUB_OFFLINE, nothing cached). The
numbers below are copied from each model's public config.json on the Hugging Face Hub (the
source is named per entry); a config built from them on PyTorch's meta device gives the exact
parameter counts and Linear shapes the budget needs. A model that is installed (a folder, the
packaged name, or the Hugging Face cache) is always budgeted from its own config instead.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field


class Architecture(BaseModel):
    """The config.json fields that decide a causal LM's memory; `dtype` is the checkpoint's
    (informational: jetfed trains with fp32 weights, see `jetfed.edge.models`)."""

    model_config = ConfigDict(extra="forbid")

    hub_id: str
    """The Hugging Face id whose config.json these numbers are from."""
    aliases: List[str] = Field(default_factory=list)
    """Other Hub ids with the same architecture (a base model and its -Instruct)."""
    model_type: str
    architecture: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    dtype: str

    def config(self) -> Any:
        """A transformers config of this architecture (no file, no download)."""
        from transformers import AutoConfig

        return AutoConfig.for_model(
            self.model_type,
            architectures=[self.architecture],
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            tie_word_embeddings=self.tie_word_embeddings,
        )


KNOWN_ARCHITECTURES: Dict[str, Architecture] = {
    # https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/blob/main/config.json
    # (the packaged `smollm2`; tests check these against its real config)
    "smollm2": Architecture(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        aliases=["HuggingFaceTB/SmolLM2-135M"],
        model_type="llama",
        architecture="LlamaForCausalLM",
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        vocab_size=49152,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        dtype="bfloat16",
    ),
    # https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/config.json
    # (model card: 0.49B parameters, 24 layers, 14 query / 2 KV heads, tied embeddings)
    "qwen2.5-0.5b": Architecture(
        hub_id="Qwen/Qwen2.5-0.5B-Instruct",
        aliases=["Qwen/Qwen2.5-0.5B"],
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        hidden_size=896,
        num_hidden_layers=24,
        intermediate_size=4864,
        vocab_size=151936,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        dtype="bfloat16",
    ),
    # https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct/blob/main/config.json
    # (model card: 1.23B parameters, GQA, shared input/output embeddings)
    "llama-3.2-1b": Architecture(
        hub_id="meta-llama/Llama-3.2-1B-Instruct",
        aliases=["meta-llama/Llama-3.2-1B"],
        model_type="llama",
        architecture="LlamaForCausalLM",
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=8192,
        vocab_size=128256,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        dtype="bfloat16",
    ),
}


def known_architecture(name_or_id: str) -> Optional[Architecture]:
    """The shipped facts for a short name or Hub id (case-insensitive), or None."""
    wanted = name_or_id.lower()
    for name, architecture in KNOWN_ARCHITECTURES.items():
        ids = [name, architecture.hub_id, *architecture.aliases]
        if wanted in (known.lower() for known in ids):
            return architecture
    return None
