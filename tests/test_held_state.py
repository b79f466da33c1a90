"""A coordinator running `full` holds the model once: its global state is the evaluation model's
own parameters (shared storage) from the start, and an aggregation writes over them, still
FedAvg's result to the bit, its update norm measured against the previous state (read back from
the blob offered to devices). Real coordinator, real MiniLM (1 layer); no round runs, so no
broker is contacted."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict

import torch

from jetfed.coordinator.config import load_config
from jetfed.coordinator.records import RoundMetrics
from jetfed.coordinator.server import Coordinator
from jetfed.coordinator.strategies.base import AcceptedUpdate
from jetfed.coordinator.strategies.fedavg import apply_mean_delta
from jetfed.edge.methods.base import Tensors
from jetfed.edge.mqtt import BrokerSpec
from tests.fleet import write_config
from tests.test_full_aggregation import announced

UNUSED_BROKER = BrokerSpec(url="mqtt://127.0.0.1:1")


def assert_held_by_model(state: Tensors, model: torch.nn.Module) -> None:
    params: Dict[str, torch.Tensor] = dict(model.named_parameters())
    assert set(state) == {name for name, p in params.items() if p.requires_grad}
    for name, value in state.items():
        assert value.data_ptr() == params[name].data_ptr(), name


def test_full_global_state_is_the_evaluation_models_parameters(
    tmp_path: Path, sst2_dir: Path
) -> None:
    torch.set_num_threads(1)
    path = write_config(tmp_path, "it-held", "full", sst2_dir)
    coordinator = Coordinator(load_config(str(path), ["model.num_hidden_layers=1"]), UNUSED_BROKER)
    model = coordinator.strategy.ctx.eval_model
    assert_held_by_model(coordinator.global_state, model)

    before = {name: value.clone() for name, value in coordinator.global_state.items()}
    generator = torch.Generator().manual_seed(0)
    updates = [
        AcceptedUpdate(
            announced(samples),
            {n: torch.randn(v.shape, generator=generator) * 1e-3 for n, v in before.items()},
        )
        for samples in (3, 5)
    ]
    expected = apply_mean_delta(before, updates)
    offered = coordinator.blobs.offer_tensors(coordinator.global_state)
    metrics = RoundMetrics(round_index=0, status="skipped", method="full")
    coordinator._aggregate(metrics, updates, offered.digest)  # over the held state itself

    assert metrics.status == "aggregated"
    assert_held_by_model(coordinator.global_state, model)
    for name, value in expected.items():
        assert torch.equal(coordinator.global_state[name], value), name
    change = math.sqrt(sum(float((expected[n].double() - before[n]).pow(2).sum()) for n in before))
    assert math.isclose(metrics.extra["update_norm"], change, rel_tol=1e-9)
