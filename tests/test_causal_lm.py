"""Causal LMs: model loading, instruction data, the response-only loss, evaluation metrics, and
one clear line for each bad input. Real SmolLM2 weights (2 layers), real datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jetfed.coordinator.config import causal_lm_config, parse_config
from jetfed.edge.causal_lm import response_logits, response_loss
from jetfed.edge.errors import UserError
from jetfed.edge.instruction_eval import exact_match, final_number, rouge_l
from jetfed.edge.instructions import (
    IGNORE_INDEX,
    apply_template,
    instruction_batch,
    load_instructions,
    prompt_text,
    row_tokens,
    rows_to_instructions,
)
from jetfed.edge.models import load_model, load_tokenizer, model_kind
from jetfed.edge.packaged_llm import smollm2_folder
from tests.conftest import DATASETS
from tests.llm import SMOLLM2, TINY_LAYERS, require_smollm2


@pytest.fixture(scope="module")
def smollm2():  # type: ignore[no-untyped-def]
    require_smollm2()
    return load_model(SMOLLM2), load_tokenizer(SMOLLM2)


def _datasets(name: str) -> Path:
    path = DATASETS / name
    if not path.exists():
        pytest.skip(f"real datasets not found at {DATASETS}")
    return path


def test_packaged_model_is_converted_once_and_named_by_its_short_name(smollm2) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = smollm2
    folder = smollm2_folder()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert smollm2_folder() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert model_kind(SMOLLM2) == "causal_lm"
    assert len(model.model.layers) == TINY_LAYERS
    assert model.name_or_path == "smollm2"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.chat_template


def test_kind_comes_from_the_config_unless_given(minilm_path: str) -> None:
    minilm = SMOLLM2.model_copy(update={"name_or_path": "minilm", "num_hidden_layers": None})
    assert model_kind(minilm) == "classifier"
    assert model_kind(minilm.model_copy(update={"kind": "causal_lm"})) == "causal_lm"


def test_response_loss_equals_hugging_face_full_logits_loss(smollm2) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = smollm2
    sst2 = load_instructions(str(_datasets("sst2")), "validation")
    gsm8k = load_instructions(str(_datasets("gsm8k")), "test")
    for data in (sst2, gsm8k):
        batch = instruction_batch(tokenizer, data, [0, 1, 2], 256, "cpu")
        with torch.no_grad():
            ours = response_loss(model, batch)
            reference = model(**batch).loss
            logits, targets = response_logits(model, batch)
        assert abs(float(ours) - float(reference)) <= 1e-5
        # the head ran only at positions predicting a response token, never over prompt/padding
        responses = int((batch["labels"] != IGNORE_INDEX).sum())
        assert logits.shape == (responses, model.config.vocab_size)
        assert targets.shape == (responses,)


def test_prompt_is_cut_from_the_left_and_the_response_never(smollm2) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = smollm2
    data = load_instructions(str(_datasets("gsm8k")), "test").subset([0])
    full_prompt = tokenizer(prompt_text(tokenizer, data.system, data.prompts[0]))["input_ids"]
    max_length = 160
    prompt, response = row_tokens(tokenizer, data, 0, max_length)
    assert len(prompt) + len(response) == max_length < len(full_prompt) + len(response)
    assert prompt == full_prompt[-len(prompt) :]
    assert tokenizer.decode(response, skip_special_tokens=True) == data.responses[0]
    batch = instruction_batch(tokenizer, data, [0], max_length, "cpu")
    kept = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert kept == response


def test_padding_is_dynamic_and_masked(smollm2) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = smollm2
    data = load_instructions(str(_datasets("sst2")), "validation")
    batch = instruction_batch(tokenizer, data, [0, 1], 256, "cpu")
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max()) < 256
    short = int(lengths.argmin())
    assert (batch["labels"][short, int(lengths[short]) :] == IGNORE_INDEX).all()


def test_classification_sets_become_generation_with_label_words() -> None:
    rte = load_instructions(str(_datasets("rte")), "validation")
    words = json.loads((_datasets("rte") / "labels.json").read_text())
    assert rte.metric == "exact_match" and rte.label_words == words
    assert rte.prompts[0].startswith("Text 1: ") and "\nText 2: " in rte.prompts[0]
    assert rte.responses[0] == words[rte.labels[0]]
    assert load_instructions(str(_datasets("gsm8k")), "test").metric == "gsm8k"


def test_dolly_and_prompt_rows_and_a_prompt_json(tmp_path: Path) -> None:
    (tmp_path / "prompt.json").write_text(json.dumps({"system": "Be terse."}))
    rows = [{"instruction": "Name a colour.", "context": "Sky.", "response": "Blue."}]
    data = rows_to_instructions(rows, "dolly", tmp_path)
    assert data.prompts == ["Name a colour.\n\nSky."] and data.system == "Be terse."
    assert data.metric == "rouge_l"
    plain = rows_to_instructions([{"prompt": "Hi", "response": "Hello"}], "plain")
    assert plain.responses == ["Hello"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "What is 2+2?", "response": ""}], "row 1: no response"),
        ([{"question": "Why?"}], "row 1: no response"),
        ([{"prompt": "ok", "response": "a"}, {"prompt": "  ", "response": "b"}], "row 2: empty"),
        ([{"title": "x"}], "instruction rows need"),
    ],
)
def test_bad_rows_are_one_clear_line(rows, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UserError, match=message) as caught:
        rows_to_instructions(rows, "data.jsonl")
    assert "\n" not in str(caught.value)


def test_a_model_without_chat_template_needs_one_by_name(minilm_path: str) -> None:
    tokenizer = load_tokenizer(SMOLLM2.model_copy(update={"name_or_path": "minilm"}))
    with pytest.raises(UserError, match=r"no chat template: set model\.chat_template"):
        prompt_text(tokenizer, "system", "prompt")
    apply_template(tokenizer, "plain")
    assert prompt_text(tokenizer, "Be brief.", "2+2?").endswith("### Answer:\n")
    with pytest.raises(UserError, match="is not one of chatml, plain"):
        apply_template(tokenizer, "llama9")


def test_a_response_longer_than_max_length_is_refused(smollm2) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = smollm2
    data = rows_to_instructions([{"prompt": "Say it.", "response": "word " * 80}], "long")
    with pytest.raises(UserError, match="responses are never truncated"):
        row_tokens(tokenizer, data, 0, 32)


def test_a_classifier_option_on_a_causal_lm_is_refused() -> None:
    require_smollm2()
    model = {"name_or_path": "smollm2", "num_labels": 2}
    raw = {"name": "x", "model": model, "data": {"path": "d"}}
    with pytest.raises(UserError, match=r"model\.num_labels is a classifier option"):
        causal_lm_config(parse_config(raw))


def test_generation_metrics() -> None:
    assert final_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert final_number("the answer is 42.") == "42"
    assert exact_match("gsm8k", "... #### 72", "Natalia ... #### 72")
    assert not exact_match("gsm8k", "no number", "#### 72")
    assert exact_match("exact_match", " Positive.", "positive")
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1.0)
    assert 0.0 < rouge_l(["the cat sat down"], ["a cat sat"]) < 1.0


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    require_smollm2()
    plain = load_model(SMOLLM2)
    checkpointed = load_model(SMOLLM2.model_copy(update={"gradient_checkpointing": True}))
    tokenizer = load_tokenizer(SMOLLM2)
    data = load_instructions(str(_datasets("sst2")), "validation")
    batch = instruction_batch(tokenizer, data, [0, 1], SMOLLM2.max_length, "cpu")
    for model in (plain, checkpointed):
        model.train()
        response_loss(model, batch).backward()
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    grads = [m.model.layers[0].mlp.up_proj.weight.grad for m in (plain, checkpointed)]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_target_modules_default_list_comma_string_or_all_linear() -> None:
    from jetfed.edge.methods.lora import LoraSettings

    assert LoraSettings(target_modules="q_proj, v_proj").targets(None) == ["q_proj", "v_proj"]
    assert LoraSettings(target_modules="all-linear").targets(None) == "all-linear"
    assert LoraSettings(target_modules=["o_proj"]).targets(None) == ["o_proj"]
