"""Streaming FedAvg (what `full` uses): folding updates in one by one from their spool files
gives the collected weighted mean, for every wire dtype, and a skipped round leaves nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch

from coordinator.strategies import (
    AcceptedUpdate,
    FedAvg,
    ServerContext,
    Strategy,
    apply_mean_delta,
)
from edge.tensorfile import UPDATE_DTYPES, TensorFile, write_tensor_file
from edge.wire import Update, make_manifest


def announced(num_samples: int, round_index: int = 0) -> Update:
    return Update(
        experiment="e",
        device_id=f"d{num_samples}",
        round_index=round_index,
        base_digest="0" * 64,
        num_samples=num_samples,
        local_steps=1,
        train_loss=0.1,
        blob=make_manifest(b"x", 1024),
    )


def fedavg() -> FedAvg:
    """The fold-in needs no evaluation model or data: no context."""
    return FedAvg(ServerContext.aggregation_only())


def deltas(count: int) -> List[Dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    shapes = {"emb": (4000, 48), "w": (48, 48), "b": (48,)}
    return [
        {n: torch.randn(s, generator=generator) * 1e-2 for n, s in shapes.items()}
        for _ in range(count)
    ]


@pytest.mark.parametrize("dtype", UPDATE_DTYPES)
def test_streaming_fold_in_equals_collected_mean(tmp_path: Path, dtype: str) -> None:
    updates, samples = deltas(3), [10, 30, 60]
    spec = {name: tuple(t.shape) for name, t in updates[0].items()}
    global_state = {name: torch.ones(shape) for name, shape in spec.items()}
    strategy = fedavg()
    received: List[AcceptedUpdate] = []
    for i, (delta, n) in enumerate(zip(updates, samples)):
        path = str(tmp_path / f"u{i}")
        write_tensor_file(path, delta, dtype)
        tensors = TensorFile(path, spec, UPDATE_DTYPES)
        strategy.accumulate(0, announced(n), tensors)
        received.append(AcceptedUpdate(announced(n), dict(tensors)))
    folded = strategy.finalize(0, global_state, [])
    expected = apply_mean_delta(global_state, received)
    for name in spec:
        assert torch.allclose(folded[name], expected[name], atol=1e-6), name


def test_a_skipped_round_leaves_nothing_behind(tmp_path: Path) -> None:
    first, second = deltas(2)
    global_state = {name: torch.zeros(t.shape) for name, t in first.items()}
    strategy = fedavg()
    strategy.accumulate(0, announced(5, round_index=0), first)  # round 0 then skipped
    strategy.accumulate(1, announced(5, round_index=1), second)
    folded = strategy.finalize(1, global_state, [])
    for name in second:
        assert torch.allclose(folded[name], second[name])
    with pytest.raises(RuntimeError, match="accumulated no update"):
        strategy.finalize(1, global_state, [])


def test_fedavg_streams_and_collecting_strategies_opt_out() -> None:
    assert FedAvg.streaming and not Strategy.streaming
