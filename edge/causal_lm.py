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


def vocab_size(model: Any) -> int:
    """Rows of the lm_head (config.vocab_size; may exceed the tokenizer's length)."""
    return int(_parts(model)[1].weight.shape[0])


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> Any:
    import torch

    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction=reduction)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count the real tokens (0 at each row's first one), whatever the
    padding side: what unsplit training and both halves of split learning rebuild from the mask
    (equal to Hugging Face's default `arange` on right-padded rows' real tokens)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def logits_at_responses(
    head: Any, hidden: torch.Tensor, labels: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, vocab], targets [N]): `head` applied to the N hidden states (last layer,
    normed) that predict a response token, and those tokens."""
    targets = labels[:, 1:]
    where = targets != IGNORE_INDEX
    return head(hidden[:, :-1][where]), targets[where]


def head_loss(head: Any, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the response tokens, from the final hidden states (split
    learning's server or U-shaped device; `response_loss` for the whole model)."""
    return _cross_entropy(*logits_at_responses(head, hidden, labels))


def response_logits(model: Any, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, vocab], targets [N]) at the N positions that predict a response token."""
    decoder, head = _parts(model)
    mask = batch["attention_mask"]
    hidden = decoder(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=positions(mask),
        use_cache=False,
    ).last_hidden_state
    return logits_at_responses(head, hidden, batch["labels"])


def response_loss(model: Any, batch: Dict[str, Any]) -> torch.Tensor:
    """Mean cross-entropy over the batch's response tokens (the training loss)."""
    return _cross_entropy(*response_logits(model, batch))


def response_loss_sum(model: Any, batch: Dict[str, Any]) -> Tuple[float, int]:
    """(summed cross-entropy, token count) over the response tokens, for token-weighted means."""
    logits, targets = response_logits(model, batch)
    return float(_cross_entropy(logits, targets, "sum")), int(targets.numel())


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
