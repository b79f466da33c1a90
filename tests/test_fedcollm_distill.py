"""FedCoLLM's coordinator pieces on the real MiniLM: the LLM reference, the tokenizer check,
and mutual distillation (both adapters learn, frozen weights stay, no gradient crosses over)."""

from __future__ import annotations

import pytest
import torch

from jetfed.coordinator.strategies.distill import check_same_tokenizer, mutual_distillation
from jetfed.edge.data import TextDataset
from jetfed.edge.errors import UserError
from jetfed.edge.methods.fedcollm import FedCoLLMMethod
from jetfed.edge.models import load_tokenizer
from jetfed.edge.wire import ModelRef

SLM = ModelRef(name_or_path="minilm", num_labels=2, max_length=32, num_hidden_layers=1)
TEXTS = ["a gripping, funny film", "dull and far too long", "warm and clever", "a mess"] * 4


def test_llm_reference_follows_the_slm_task() -> None:
    method = FedCoLLMMethod({"llm_num_hidden_layers": 2, "rank": 4}, SLM)
    llm = method.llm_ref()
    assert (llm.name_or_path, llm.num_hidden_layers) == ("minilm", 2)
    assert (llm.num_labels, llm.max_length) == (SLM.num_labels, SLM.max_length)
    assert method.llm_method().config.rank == 4 and method.strategy == "fedcollm"


def test_different_tokenizers_are_a_user_error(minilm_path: str) -> None:
    slm_tokenizer = load_tokenizer(SLM)
    check_same_tokenizer(slm_tokenizer, load_tokenizer(SLM), "minilm", "minilm")
    other = load_tokenizer(SLM)
    other.add_tokens(["fedcollmtoken"])
    with pytest.raises(UserError, match=r"method\.llm 'other' .* different tokenizers"):
        check_same_tokenizer(slm_tokenizer, other, "minilm", "other")


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_mutual_distillation_trains_both_adapters_only(minilm_path: str) -> None:
    method = FedCoLLMMethod(
        {"llm_num_hidden_layers": 2, "server_steps": 2, "server_batch_size": 4}, SLM
    )
    slm = method.build(None, seed=0)
    llm_method = method.llm_method()
    llm = llm_method.build(None, seed=0)
    before = [(trainable(m), frozen(m)) for m in (slm, llm)]
    data = TextDataset(texts_a=TEXTS, labels=[1, 0, 1, 0] * 4)
    slm_loss, llm_loss = mutual_distillation(
        slm, llm, load_tokenizer(SLM), data, method.config, 32, "cpu", seed=0
    )
    assert slm_loss > 0 and llm_loss > 0
    for model, (adapters, base) in zip((slm, llm), before):
        after = trainable(model)
        assert any(not torch.equal(after[n], adapters[n]) for n in adapters)
        assert all(torch.equal(p, base[n]) for n, p in frozen(model).items())
