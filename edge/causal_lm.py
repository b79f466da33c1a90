"""Response-only loss and bounded generation for causal LMs.

The lm_head is applied only where the loss is: hidden states at the positions that predict a
response token are gathered first, so a batch never holds [batch, tokens, vocab] logits over
prompts and padding (at 8 × 256 tokens × SmolLM2's 49,152 words that is 403 MB per fp32 copy,
several copies in forward and backward; gathering cut a run's peak from 6.35 GB to < 3 GB).
The loss equals Hugging Face's `model(**batch).loss` (mean over response tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Tuple

from jetfed.edge.instructions import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def _parts(model: Any) -> Tuple[Any, Any]:
    """(decoder stack, lm_head) of a causal LM, bare or wrapped by PEFT."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def response_logits(model: Any, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, vocab], targets [N]) at the N positions that predict a response token."""
    decoder, head = _parts(model)
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    where = targets != IGNORE_INDEX
    return head(hidden[:, :-1][where]), targets[where]


def response_loss(model: Any, batch: Dict[str, Any]) -> torch.Tensor:
    """Mean cross-entropy over the batch's response tokens (the training loss)."""
    import torch

    logits, targets = response_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def response_loss_sum(model: Any, batch: Dict[str, Any]) -> Tuple[float, int]:
    """(summed cross-entropy, token count) over the response tokens, for token-weighted means."""
    import torch

    logits, targets = response_logits(model, batch)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return float(loss), int(targets.numel())


def generate(model: Any, tokenizer: Any, batch: Dict[str, Any], max_new_tokens: int) -> List[str]:
    """Greedy answers to a left-padded prompt batch, decoded without the prompt."""
    import torch

    with torch.no_grad():
        output = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
    answers = output[:, batch["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(answers, skip_special_tokens=True)]
