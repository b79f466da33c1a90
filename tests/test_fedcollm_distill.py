"""FedCoLLM's coordinator pieces on real MiniLM and SmolLM2: the LLM reference, the tokenizer
check, and mutual distillation (both adapters learn, frozen weights stay; that no gradient
crosses over is tests/test_kd_losses.py)."""

from __future__ import annotations

from typing import Union

import pytest
import torch

from jetfed.coordinator.strategies.distill import check_same_tokenizer, mutual_distillation
from jetfed.edge.data import TextDataset
from jetfed.edge.errors import UserError
from jetfed.edge.instructions import InstructionSet, load_instructions
from jetfed.edge.methods.fedcollm import FedCoLLMMethod
from jetfed.edge.models import load_tokenizer
from jetfed.edge.wire import ModelRef
from tests.conftest import DATASETS
from tests.llm import SMOLLM2, require_smollm2

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


@pytest.mark.parametrize("causal", [False, True])
def test_mutual_distillation_trains_both_adapters_only(minilm_path: str, causal: bool) -> None:
    """Both adapters learn, frozen weights stay: a 1-layer SLM and a 2-layer LLM of MiniLM
    (classifier) or of SmolLM2 (causal LM, response tokens, top-k support)."""
    settings = {"llm_num_hidden_layers": 2, "server_steps": 2, "server_batch_size": 4}
    slm_ref = SLM
    data: Union[TextDataset, InstructionSet] = TextDataset(texts_a=TEXTS, labels=[1, 0, 1, 0] * 4)
    if causal:
        require_smollm2()
        slm_ref = SMOLLM2.model_copy(update={"num_hidden_layers": 1})
        settings.update(llm="smollm2", top_k=4)
        data = load_instructions(str(DATASETS / "sst2"), "train").subset(range(8))
    method = FedCoLLMMethod(settings, slm_ref)
    slm = method.build(None, seed=0)
    llm_method = method.llm_method()
    llm = llm_method.build(None, seed=0)
    before = [(trainable(m), frozen(m)) for m in (slm, llm)]
    slm_loss, llm_loss = mutual_distillation(
        slm, llm, load_tokenizer(slm_ref), data, method.config, 64, "cpu", seed=0
    )
    assert slm_loss > 0 and llm_loss > 0
    for model, (adapters, base) in zip((slm, llm), before):
        after = trainable(model)
        assert any(not torch.equal(after[n], adapters[n]) for n in adapters)
        assert all(torch.equal(p, base[n]) for n, p in frozen(model).items())
