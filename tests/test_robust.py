"""Robust strategies: clipping, coordinate-wise median, trimmed mean, and the norm bound."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch

from jetfed.coordinator.strategies.base import (
    AcceptedUpdate,
    ServerContext,
    Strategy,
    make_strategy,
)
from jetfed.coordinator.strategies.robust import update_norm
from jetfed.edge.errors import UserError
from tests.test_strategies import accepted


def strategy(name: str, **settings: Any) -> Strategy:
    """Only `settings` matter to these strategies' aggregation; the model fields stay empty."""
    return make_strategy(name, ServerContext.aggregation_only(settings))


def updates_of(values: List[List[float]], samples: List[int]) -> List[AcceptedUpdate]:
    return [accepted(n, {"w": torch.tensor(v)}) for v, n in zip(values, samples)]


GLOBAL: Dict[str, torch.Tensor] = {"w": torch.tensor([1.0, 1.0, 1.0])}


def test_median_ignores_an_outlier_and_sample_counts() -> None:
    updates = updates_of([[0.1, 0.2, 0.3], [0.2, 0.1, 0.5], [1e6, -1e6, 0.4]], [1, 1, 1000])
    new = strategy("median").aggregate(0, GLOBAL, updates)
    assert torch.allclose(new["w"], torch.tensor([1.2, 1.1, 1.4]))


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    updates = updates_of([[0.0], [1.0], [3.0], [100.0]], [1, 1, 1, 1])
    new = strategy("median").aggregate(0, {"w": torch.tensor([0.0])}, updates)
    assert torch.allclose(new["w"], torch.tensor([2.0]))


def test_trimmed_mean_drops_the_fraction_at_each_end() -> None:
    values = [[float(v)] for v in (-100, 1, 2, 3, 4, 5, 6, 7, 8, 1000)]
    updates = updates_of(values, [1] * 10)
    new = strategy("trimmed_mean", trim_fraction=0.1).aggregate(
        0, {"w": torch.tensor([0.0])}, updates
    )
    assert torch.allclose(new["w"], torch.tensor([4.5]))
    untrimmed = strategy("trimmed_mean", trim_fraction=0.0).aggregate(
        0, {"w": torch.tensor([0.0])}, updates
    )
    assert torch.allclose(untrimmed["w"], torch.tensor([sum(v[0] for v in values) / 10]))


def test_clipped_fedavg_scales_only_large_deltas_then_weights_by_samples() -> None:
    updates = updates_of([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]], [1, 3])
    new = strategy("clipped_fedavg", clip_norm=2.0).aggregate(0, GLOBAL, updates)
    clipped_first = torch.tensor([3.0, 4.0, 0.0]) * (2.0 / 5.0)
    expected = GLOBAL["w"] + 0.25 * clipped_first + 0.75 * torch.tensor([0.0, 0.0, 1.0])
    assert torch.allclose(new["w"], expected)


def test_update_norm_is_the_global_l2_norm_over_all_tensors() -> None:
    assert update_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == 5.0


@pytest.mark.parametrize(
    ("name", "settings", "line"),
    [
        ("fedavg", {"clip_norm": 1.0}, "aggregation.clip_norm: unknown field"),
        ("clipped_fedavg", {}, "aggregation.clip_norm: Field required"),
        ("trimmed_mean", {"trim_fraction": 0.5}, "aggregation.trim_fraction: Input should be less"),
        ("median", {"trim_fraction": 0.1}, "aggregation.trim_fraction: unknown field"),
        ("trimmed_mean", {"trim_fration": 0.1}, "aggregation.trim_fration: unknown field"),
    ],
)
def test_setting_mistakes_are_one_line_user_errors(
    name: str, settings: Dict[str, Any], line: str
) -> None:
    """Each strategy validates its `aggregation:` keys with its settings model, refusing what
    it would ignore; the error is one line naming the key and the strategy."""
    with pytest.raises(UserError) as caught:
        strategy(name, **settings)
    message = str(caught.value)
    assert message.startswith(line) and message.endswith(f"(strategy {name})")
    assert "\n" not in message
