"""FedAvg equals a hand-computed weighted mean of the deltas."""

from __future__ import annotations

import torch

from coordinator.strategies import AcceptedUpdate, apply_mean_delta, weighted_mean
from edge.wire import Update, make_manifest


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
    mean = weighted_mean(updates)
    assert torch.allclose(mean["w"], torch.tensor([[0.1 * 1 + 0.3 * 3, 0.1 * 2 - 0.3 * 2]]))
    assert torch.allclose(mean["b"], torch.tensor([0.3 * 4 - 0.6 * 1]))
    base = {"w": torch.tensor([[10.0, 10.0]]), "b": torch.tensor([1.0])}
    new = apply_mean_delta(base, updates)
    assert torch.allclose(new["w"], base["w"] + mean["w"])
    assert torch.allclose(new["b"], base["b"] + mean["b"])
