"""Evaluation of a causal LM on instruction data: response-token loss, perplexity, and a bounded
generation metric.

Loss and perplexity cover every validation row (token-weighted). Generation is the expensive
part (greedy decoding of 128 rows × 4 tokens took 46–71 s on 2 CPU cores), so it runs on the
first `generate_rows` rows only with at most `max_new_tokens` new tokens. The metric follows the
data (`InstructionSet.metric`): `exact_match` of the label word (classification sets) or of
GSM8K's final `#### n` number (the last number when the answer has no `####`), `rouge_l` (F1 of
the longest common subsequence, Google's `rouge-score`) for free text.
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field

from jetfed.edge.errors import UserError
from jetfed.edge.instructions import InstructionSet, instruction_batch, prompt_batch

DEFAULT_NEW_TOKENS = {"gsm8k": 160, "rouge_l": 64}
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class GenerationBudget(BaseModel):
    """How much generation the coordinator's evaluation may spend (config `evaluation:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    generate_rows: int = Field(default=16, ge=0)
    """Rows greedily decoded per evaluation (0: loss and perplexity only)."""
    max_new_tokens: Optional[int] = Field(default=None, ge=1, le=4096)
    """None: the longest label word + 1 (classification), 160 (GSM8K), 64 (free text)."""
    batch_size: int = Field(default=8, ge=1)


def normalise(text: str) -> str:
    lowered = text.lower().strip()
    return lowered.strip(string.punctuation + string.whitespace)


def final_number(text: str) -> Optional[str]:
    """GSM8K's answer: the number after `####`, else the last number in the text."""
    _, marker, tail = text.rpartition("####")
    numbers = _NUMBER.findall(tail if marker else text)
    if not numbers:
        return None
    return numbers[0 if marker else -1].replace(",", "").rstrip(".")


def exact_match(metric: str, prediction: str, reference: str) -> bool:
    if metric == "gsm8k":
        expected = final_number(reference)
        return expected is not None and final_number(prediction) == expected
    return normalise(prediction) == normalise(reference)


def rouge_l(predictions: List[str], references: List[str]) -> float:
    """Mean ROUGE-L F1 (stemmed), via Google's rouge-score package."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("ROUGE-L needs the rouge-score package: pip install rouge-score") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)
    ]
    return sum(scores) / max(1, len(scores))


def new_token_budget(tokenizer: Any, data: InstructionSet, budget: GenerationBudget) -> int:
    if budget.max_new_tokens is not None:
        return budget.max_new_tokens
    if data.label_words:
        return 1 + max(
            len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in data.label_words
        )
    return DEFAULT_NEW_TOKENS.get(data.metric, 64)


def evaluate_instructions(
    model: Any,
    tokenizer: Any,
    data: InstructionSet,
    max_length: int,
    device: str,
    budget: GenerationBudget,
) -> Dict[str, float]:
    """`eval_loss`, `perplexity` and `exact_match` or `rouge_l` of the model on `data`."""
    import torch

    from jetfed.edge.causal_lm import generate, response_loss_sum

    model.to(device)
    model.eval()
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), budget.batch_size):
            indices = list(range(start, min(len(data), start + budget.batch_size)))
            batch = instruction_batch(tokenizer, data, indices, max_length, device)
            loss, tokens = response_loss_sum(model, batch)
            total_loss += loss
            total_tokens += tokens
    eval_loss = total_loss / max(1, total_tokens)
    results = {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}
    rows = min(budget.generate_rows, len(data))
    if rows == 0:
        return results
    new_tokens = new_token_budget(tokenizer, data, budget)
    predictions: List[str] = []
    for start in range(0, rows, budget.batch_size):
        indices = list(range(start, min(rows, start + budget.batch_size)))
        predictions += generate(
            model, tokenizer, prompt_batch(tokenizer, data, indices, max_length, device), new_tokens
        )
    references = data.responses[:rows]
    if data.metric == "rouge_l":
        results["rouge_l"] = rouge_l(predictions, references)
    else:
        hits = sum(exact_match(data.metric, p, r) for p, r in zip(predictions, references))
        results["exact_match"] = hits / rows
    return results
