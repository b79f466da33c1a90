"""Strategies: FedAvg equals a hand-computed weighted mean of the deltas; both registries
(methods, strategies) find every module by scanning their package and refuse a second class
under a name already taken."""

from __future__ import annotations

from typing import Any, List

import pytest
import torch

from jetfed.coordinator.strategies.base import (
    AcceptedUpdate,
    ServerContext,
    Strategy,
    available_strategies,
    make_strategy,
    register_strategy,
)
from jetfed.edge.errors import UserError
from jetfed.edge.methods.base import Tensors, available_methods, get_method, register_method
from jetfed.edge.wire import Update, make_manifest


def accepted(num_samples: int, tensors: dict) -> AcceptedUpdate:
    update = Update(
        experiment="e",
        device_id=f"d{num_samples}",
        round_index=0,
        base_digest="0" * 64,
        num_samples=num_samples,
        local_steps=1,
        train_loss=0.1,
        blob=make_manifest(b"x", 1024),
    )
    return AcceptedUpdate(update, tensors)


def test_fedavg_is_the_sample_weighted_mean() -> None:
    a = {"w": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([[3.0, -2.0]]), "b": torch.tensor([4.0])}
    c = {"w": torch.tensor([[0.0, 0.0]]), "b": torch.tensor([-1.0])}
    updates = [accepted(10, a), accepted(30, b), accepted(60, c)]
    base = {"w": torch.tensor([[10.0, 10.0]]), "b": torch.tensor([1.0])}
    fedavg = make_strategy("fedavg", ServerContext.aggregation_only())
    new = fedavg.aggregate(0, base, updates)
    assert torch.allclose(new["w"], base["w"] + torch.tensor([[0.1 + 0.9, 0.2 - 0.6]]))
    assert torch.allclose(new["b"], base["b"] + torch.tensor([1.2 - 0.6]))


def test_every_strategy_module_is_found_by_the_package_scan() -> None:
    assert set(available_strategies()) >= {
        "fedavg",
        "clipped_fedavg",
        "median",
        "trimmed_mean",
        "split",
        "kd",
        "fedcollm",
    }
    with pytest.raises(UserError, match="unknown aggregation strategy 'nosuch'; known: "):
        make_strategy("nosuch", ServerContext.aggregation_only())


def test_a_second_strategy_under_a_taken_name_is_refused() -> None:
    class Impostor(Strategy):
        name = "median"

        def aggregate(self, round_index: int, global_state: Tensors, updates: List[Any]) -> Tensors:
            return global_state

    available_strategies()  # the real median is registered
    with pytest.raises(ValueError, match="strategy 'median' is registered twice"):
        register_strategy(Impostor)
    assert type(make_strategy("median", ServerContext.aggregation_only())) is not Impostor


def test_a_second_method_under_a_taken_name_is_refused() -> None:
    lora = get_method("lora")

    class Impostor(lora):  # type: ignore[valid-type, misc]
        name = "lora"

    with pytest.raises(ValueError, match="method 'lora' is registered twice"):
        register_method(Impostor)
    assert get_method("lora") is lora
    assert "lora" in available_methods()
