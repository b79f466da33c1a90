"""FedAvg gives bit-identical results whatever order the updates arrive in, so a rerun or a
resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import itertools

import torch

from jetfed.coordinator.strategies.fedavg import FedAvg
from tests.test_robust import strategy
from tests.test_strategies import accepted


def test_fedavg_does_not_depend_on_arrival_order() -> None:
    generator = torch.Generator().manual_seed(0)
    scales = (1e-3, 3e-1, 7e-5, 2.0)
    updates = [
        accepted(n, {"w": torch.randn(64, 32, generator=generator) * s})
        for n, s in zip((7, 1000, 33, 2), scales)
    ]
    global_state = {"w": torch.randn(64, 32, generator=generator)}
    results = []
    for order in itertools.permutations(updates):
        fedavg = strategy("fedavg")
        assert isinstance(fedavg, FedAvg)
        results.append(fedavg.aggregate(0, global_state, list(order))["w"])
    assert all(torch.equal(results[0], other) for other in results[1:])
    total = sum(item.update.num_samples for item in updates)
    mean = sum(item.tensors["w"].double() * item.update.num_samples for item in updates) / total
    assert torch.allclose(results[0], (global_state["w"].double() + mean).float(), atol=0, rtol=0)
