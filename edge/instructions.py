"""Instruction data for causal LMs: rows → (system, prompt, response) → chat-template tokens.

A folder (or file) of rows in one of these shapes, detected from the first row:
- `{question, answer}` (GSM8K): metric `gsm8k`, exact match of the final `#### n` number;
- `{instruction, context?, response}` (Dolly style) or `{prompt, response}`: metric `rouge_l`;
- a classification set (`text` or `text_a`/`text_b`, integer `label`) with `labels.json`: the
  response is the label word, metric `exact_match`.
An optional `prompt.json` beside the split files sets `system` (the system message) and
`instruction` (a line put before each classification prompt). Each client of a federation may
hold a different such folder (its own `--data`), which makes a multi-task federation.

Tokens: the prompt is rendered with the tokenizer's chat template (or a built-in one named by
`model.chat_template`), the response is appended with the end-of-turn token, and only the
response is trained on. A prompt too long is cut from the left (the response is never cut);
batches are padded to their longest row (right padding; labels mask padding and prompt).
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from jetfed.edge.errors import UserError

IGNORE_INDEX = -100
DEFAULT_SYSTEM = "You are a helpful assistant. Answer briefly."
GSM8K_SYSTEM = "You solve math word problems step by step and end with '#### <number>'."
CLASSIFY_SYSTEM = "You classify texts. Answer with the label only."

TEMPLATES: Dict[str, str] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "plain": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}### Question:\n{{ m['content'] }}\n\n"
        "{% else %}### Answer:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Answer:\n{% endif %}"
    ),
}
"""Built-in chat templates for models without one (`model.chat_template: NAME`)."""

METRICS = ("exact_match", "gsm8k", "rouge_l")


@dataclass
class InstructionSet:
    """Parallel columns of one split. `labels` are class indices for classification sets (0
    otherwise), so the partitioners (iid, dirichlet, shards) work unchanged."""

    prompts: List[str]
    responses: List[str]
    system: str
    metric: str
    labels: List[int]
    label_words: Optional[List[str]] = None
    _tokens: Dict[Tuple[int, int], Tuple[array, array]] = field(default_factory=dict, repr=False)
    """(row, max_length) → (prompt ids, response ids), 4 bytes a token (Python ints take 36)."""

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int]) -> InstructionSet:
        return InstructionSet(
            prompts=[self.prompts[i] for i in indices],
            responses=[self.responses[i] for i in indices],
            system=self.system,
            metric=self.metric,
            labels=[self.labels[i] for i in indices],
            label_words=self.label_words,
        )

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1 if self.labels else 0


# --------------------------------------------------------------------------- loading


def _prompt_settings(folder: Path) -> Dict[str, str]:
    path = folder / "prompt.json"
    if not path.exists():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON") from None
    if not isinstance(settings, dict) or set(settings) - {"system", "instruction"}:
        raise UserError(f"{path}: expected an object with 'system' and/or 'instruction'")
    return {key: str(value) for key, value in settings.items()}


def _label_words(folder: Path, origin: str) -> List[str]:
    path = folder / "labels.json"
    if not path.exists():
        raise UserError(
            f"{origin}: a classification set used with a causal LM needs labels.json "
            "(the label words the model answers with)"
        )
    words = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
        raise UserError(f"{path}: expected a JSON list of label words")
    return words


def _text(row: Dict[str, Any], key: str) -> str:
    value = row.get(key)
    return "" if value is None else str(value).strip()


def rows_to_instructions(
    rows: Iterable[Dict[str, Any]], origin: str, folder: Optional[Path] = None
) -> InstructionSet:
    """Detect the row shape from the first row and build the set (one clear line per bad row)."""
    settings = _prompt_settings(folder) if folder is not None else {}
    prompts: List[str] = []
    responses: List[str] = []
    labels: List[int] = []
    shape = ""
    words: Optional[List[str]] = None
    for number, row in enumerate(rows, 1):
        if not shape:
            shape = _shape(row, origin)
            if shape == "classification":
                words = _label_words(folder or Path(origin).parent, origin)
        prompt, response, label = _row(row, shape, words, settings, f"{origin}: row {number}")
        prompts.append(prompt)
        responses.append(response)
        labels.append(label)
    if not prompts:
        raise UserError(f"{origin}: no rows")
    metric = {"gsm8k": "gsm8k", "classification": "exact_match"}.get(shape, "rouge_l")
    default_system = {"gsm8k": GSM8K_SYSTEM, "classification": CLASSIFY_SYSTEM}.get(
        shape, DEFAULT_SYSTEM
    )
    return InstructionSet(
        prompts=prompts,
        responses=responses,
        system=settings.get("system", default_system),
        metric=metric,
        labels=labels,
        label_words=words,
    )


def _shape(row: Dict[str, Any], origin: str) -> str:
    if "question" in row:
        return "gsm8k"
    if "instruction" in row:
        return "dolly"
    if "prompt" in row:
        return "prompt"
    if ("text" in row or "text_a" in row) and "label" in row:
        return "classification"
    raise UserError(
        f"{origin}: instruction rows need {{question, answer}}, {{instruction, context?, "
        f"response}}, {{prompt, response}} or text + label; got {sorted(row)}"
    )


def _row(
    row: Dict[str, Any],
    shape: str,
    words: Optional[List[str]],
    settings: Dict[str, str],
    where: str,
) -> Tuple[str, str, int]:
    label = 0
    if shape == "gsm8k":
        prompt, response = _text(row, "question"), _text(row, "answer")
    elif shape == "dolly":
        prompt, response = _text(row, "instruction"), _text(row, "response")
        context = _text(row, "context")
        if prompt and context:
            prompt = f"{prompt}\n\n{context}"
    elif shape == "prompt":
        prompt, response = _text(row, "prompt"), _text(row, "response")
    else:
        assert words is not None
        try:
            label = int(row["label"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{where}: no integer label") from None
        if not 0 <= label < len(words):
            raise UserError(f"{where}: label {label} outside labels.json's {len(words)} words")
        prompt, response = _classification_prompt(row, words, settings), words[label]
    if not prompt:
        raise UserError(f"{where}: empty prompt")
    if not response:
        raise UserError(f"{where}: no response (every row needs the answer to train on)")
    return prompt, response, label


def _classification_prompt(row: Dict[str, Any], words: List[str], settings: Dict[str, str]) -> str:
    if "text_a" in row:
        first, second = _text(row, "text_a"), _text(row, "text_b")
        body = f"Text 1: {first}\nText 2: {second}" if first or second else ""
    else:
        body = _text(row, "text")
    if not body:
        return ""
    lead = settings.get("instruction")
    question = f"Answer with one of: {', '.join(words)}."
    return "\n\n".join(part for part in (lead, body, question) if part)


def load_instructions(source: str, split: str) -> InstructionSet:
    """One split of a local folder (or a single file) as instruction data."""
    from jetfed.edge.data import read_rows, split_file

    path = Path(source).expanduser()
    if path.is_dir():
        folder, file = path, split_file(path, split)
    elif path.exists():
        folder, file = path.parent, path
    else:
        raise UserError(f"data path {source!r} does not exist")
    return rows_to_instructions(read_rows(file), str(file), folder)


# --------------------------------------------------------------------------- tokens


def apply_template(tokenizer: Any, name: Optional[str]) -> None:
    """Install the built-in template `name` on the tokenizer (None: keep the model's own)."""
    if name is None:
        return
    if name not in TEMPLATES:
        raise UserError(f"model.chat_template {name!r} is not one of {', '.join(TEMPLATES)}")
    tokenizer.chat_template = TEMPLATES[name]


def prompt_text(tokenizer: Any, system: str, prompt: str) -> str:
    """The prompt as the model sees it, ending where the assistant's answer starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"model {tokenizer.name_or_path!r} has no chat template: set model.chat_template "
            f"to one of {', '.join(TEMPLATES)}"
        )
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def end_of_turn_id(tokenizer: Any) -> int:
    return int(tokenizer.eos_token_id)


def row_tokens(
    tokenizer: Any, data: InstructionSet, index: int, max_length: int
) -> Tuple[List[int], List[int]]:
    """(prompt ids, response ids) of one row within `max_length`: the prompt cut from the left."""
    key = (index, max_length)
    if key not in data._tokens:
        text = prompt_text(tokenizer, data.system, data.prompts[index])
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        response = tokenizer(data.responses[index], add_special_tokens=False)["input_ids"]
        response = [*response, end_of_turn_id(tokenizer)]
        room = max_length - len(response)
        if room < 1:
            raise UserError(
                f"a response of {len(response)} tokens does not fit model.max_length="
                f"{max_length}: raise max_length (responses are never truncated)"
            )
        data._tokens[key] = (array("i", prompt[-room:]), array("i", response))
    prompt_ids, response_ids = data._tokens[key]
    return list(prompt_ids), list(response_ids)


def instruction_batch(
    tokenizer: Any, data: InstructionSet, indices: List[int], max_length: int, device: str
) -> Dict[str, Any]:
    """input_ids, attention_mask and labels (response tokens only), padded to the longest row."""
    import torch

    rows = [row_tokens(tokenizer, data, i, max_length) for i in indices]
    width = max(len(p) + len(r) for p, r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, response) in enumerate(rows):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor(prompt + response)
        attention[row, :length] = 1
        labels[row, len(prompt) : length] = torch.tensor(response)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def prompt_batch(
    tokenizer: Any, data: InstructionSet, indices: List[int], max_length: int, device: str
) -> Dict[str, Any]:
    """Prompts only, LEFT-padded for generation (the answer continues at the right edge)."""
    import torch

    prompts = [row_tokens(tokenizer, data, i, max_length)[0] for i in indices]
    width = max(len(p) for p in prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention[row, width - len(prompt) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
