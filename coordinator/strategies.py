"""Aggregation strategies by name: the coordinator-side half of each method.

Shaped like Flower's Strategy: `configure_round` adds what the round's task needs beyond the
global state, `aggregate` turns accepted updates into the next global state. A method names its
strategy (`FederatedMethod.strategy`); the experiment config may override it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Type

import torch

from edge.errors import UserError
from edge.methods.base import FederatedMethod, Tensors
from edge.wire import Update


@dataclass
class AcceptedUpdate:
    """A verified update: its announcement and its decoded tensors (fp32)."""

    update: Update
    tensors: Tensors


class Strategy:
    """FedAvg over deltas: global + Σ nₖ·Δₖ / Σ nₖ (for LoRA: A, B and the head separately)."""

    name = "fedavg"

    def __init__(self, method: FederatedMethod) -> None:
        self.method = method

    def configure_round(self, round_index: int, global_state: Tensors) -> Dict[str, bytes]:
        """Extra blobs (name → bytes) that devices fetch with the task; none for FedAvg."""
        return {}

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        return apply_mean_delta(global_state, updates)


def weighted_mean(updates: List[AcceptedUpdate]) -> Tensors:
    """Σ nₖ·tₖ / Σ nₖ per tensor name, accumulated in float64."""
    total = float(sum(item.update.num_samples for item in updates))
    names = updates[0].tensors.keys()
    mean: Tensors = {}
    for name in names:
        acc = torch.zeros_like(updates[0].tensors[name], dtype=torch.float64)
        for item in updates:
            acc += item.tensors[name].double() * (item.update.num_samples / total)
        mean[name] = acc.to(torch.float32)
    return mean


def apply_mean_delta(global_state: Tensors, updates: List[AcceptedUpdate]) -> Tensors:
    delta = weighted_mean(updates)
    return {
        name: (value.double() + delta[name].double()).float()
        for name, value in global_state.items()
    }


_STRATEGIES: Dict[str, Type[Strategy]] = {"fedavg": Strategy}


def register_strategy(cls: Type[Strategy]) -> Type[Strategy]:
    _STRATEGIES[cls.name] = cls
    return cls


def make_strategy(name: str, method: FederatedMethod) -> Strategy:
    factory: Callable[[FederatedMethod], Strategy] | None = _STRATEGIES.get(name)
    if factory is None:
        raise UserError(
            f"unknown aggregation strategy {name!r}; known: {', '.join(sorted(_STRATEGIES))}"
        )
    return factory(method)
