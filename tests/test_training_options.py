"""Options a learning-rate/heterogeneity study needs: a task head at its own learning rate, the
α = r LoRA convention, ‖ΔW‖ of the global step, a minimum Dirichlet shard size."""

from __future__ import annotations

from typing import Dict

import numpy as np
import pytest
import torch

from jetfed.coordinator.demo import DEMO_DATA
from jetfed.coordinator.update_norm import LORA_A, LORA_B, update_norms
from jetfed.edge.data import load_split, partition
from jetfed.edge.errors import UserError
from jetfed.edge.methods.lora import LoraMethod
from jetfed.edge.models import load_tokenizer
from jetfed.edge.train import evaluate, is_head_parameter, train_local
from jetfed.edge.wire import ModelRef, PartitionSpec, TrainingConfig

REF = ModelRef(name_or_path="minilm", num_labels=2, max_length=32, num_hidden_layers=1)


def moved(before: Dict[str, torch.Tensor], model: torch.nn.Module, head: bool) -> float:
    return max(
        float((p.detach() - before[n]).abs().max())
        for n, p in model.named_parameters()
        if p.requires_grad and is_head_parameter(n) == head
    )


def test_head_learning_rate_drives_only_the_head(minilm_path: str) -> None:
    torch.set_num_threads(1)
    method = LoraMethod({}, REF)
    data = load_split(str(DEMO_DATA), "train").subset(range(8))
    tokenizer = load_tokenizer(REF)
    steps = {}
    for head_lr in (None, 1e-9):
        model = method.build(None, seed=0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        training = TrainingConfig(local_steps=2, batch_size=4, head_learning_rate=head_lr)
        train_local(model, tokenizer, data, training, 32, "cpu", seed=0)
        steps[head_lr] = (moved(before, model, head=True), moved(before, model, head=False))
    assert steps[None][0] > 1e-4 and steps[1e-9][0] < 1e-7  # the head barely moves
    assert steps[1e-9][1] > 1e-4  # the adapters still train at learning_rate


def test_alpha_equals_rank_is_recorded() -> None:
    method = LoraMethod({"rank": 4, "alpha_equals_rank": True}, REF)
    assert method.run_facts() == {"lora_rank": 4, "lora_alpha": 4.0, "lora_scaling": 1.0}
    assert LoraMethod({}, REF).run_facts()["lora_scaling"] == 2.0
    with pytest.raises(UserError, match="alpha_equals_rank sets alpha to the rank"):
        LoraMethod({"rank": 4, "alpha": 8, "alpha_equals_rank": True}, REF)


def test_delta_w_norm_multiplies_lora_factors_out() -> None:
    """B′A′ = BA with other factors: the factors moved, the weight did not."""
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    head = torch.zeros(3)
    before = {f"l{LORA_A}": a, f"l{LORA_B}": b, "classifier.weight": head}
    after = {f"l{LORA_A}": a / 2, f"l{LORA_B}": b * 2, "classifier.weight": head + 1}
    norms = update_norms(before, after, scaling=2.0)
    assert norms["update_norm"] > 1
    assert norms["delta_w_norm"] == pytest.approx(3**0.5)  # the head's step only
    after[f"l{LORA_B}"] = b * 3
    expected = (2 * (b * 3 @ (a / 2) - b @ a)).norm().item() ** 2 + 3
    assert update_norms(before, after, 2.0)["delta_w_norm"] == pytest.approx(expected**0.5)


def test_dirichlet_minimum_shard_size() -> None:
    labels = np.random.default_rng(0).integers(0, 2, 200).tolist()
    spec = PartitionSpec(kind="dirichlet", num_clients=10, alpha=0.1, seed=3)
    plain = partition(labels, spec)
    assert min(map(len, plain)) < 8  # one draw leaves tiny shards
    assert plain == partition(labels, spec.model_copy(update={"min_shard_size": 0}))
    bounded = partition(labels, spec.model_copy(update={"min_shard_size": 8}))
    assert min(map(len, bounded)) >= 8
    assert sorted(i for part in bounded for i in part) == list(range(200))
    assert bounded == partition(labels, spec.model_copy(update={"min_shard_size": 8}))
    with pytest.raises(UserError, match="exceeds the 200 samples"):
        partition(labels, spec.model_copy(update={"min_shard_size": 21}))


def test_evaluation_batched_by_length_scores_every_row_as_in_order(minilm_path: str) -> None:
    """Batches of similar length (less padding) score each row as its own: the accuracy and
    loss of one batch holding every row in file order."""
    torch.set_num_threads(1)
    model = LoraMethod({}, REF).build(None, seed=0)
    data = load_split(str(DEMO_DATA), "validation").subset(range(24))
    tokenizer = load_tokenizer(REF)
    batched = evaluate(model, tokenizer, data, REF.max_length, "cpu", batch_size=5)
    whole = evaluate(model, tokenizer, data, REF.max_length, "cpu", batch_size=24)
    assert batched.accuracy == whole.accuracy and batched.num_samples == 24
    assert batched.loss == pytest.approx(whole.loss, rel=1e-5)
