"""The contract every registered method meets, run in one process over the in-memory link
(edge/memlink.py) with the coordinator and two agents exactly as deployed; a new method gets
it for free. Also: what a method gets from the house whatever it forgets (its train phase)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
import torch

from jetfed.coordinator.config import ExperimentConfig, parse_config
from jetfed.coordinator.demo import DEMO_DATA
from jetfed.coordinator.server import Coordinator
from jetfed.coordinator.strategies.base import Strategy
from jetfed.edge.agent import EdgeAgent, EdgeConfig
from jetfed.edge.data import TextDataset
from jetfed.edge.memlink import MemBroker
from jetfed.edge.methods.base import (
    FederatedMethod,
    InitialState,
    LocalResult,
    LocalRound,
    Tensors,
    available_methods,
    run_local_round,
)
from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.telemetry.phases import Profiler
from jetfed.edge.tensor_codec import tensor_spec
from jetfed.edge.wire import ModelRef, TrainingConfig


class Forgetful(FederatedMethod):
    """Opens no phase and counts nothing: its local round only returns a result."""

    name = "forgetful"

    def initial_state(self, seed: int) -> InitialState:
        return InitialState(global_state={"w": torch.zeros(1)})

    def build(self, init: Optional[Tensors], seed: int) -> Any:
        return None

    def local_round(self, job: LocalRound) -> LocalResult:
        job.counters.extra["mine"] = 1.0
        return LocalResult(
            tensors={"w": torch.ones(1)}, num_samples=1, train_loss=0.0, local_steps=3
        )


def test_a_method_that_opens_no_phase_still_gets_its_train_record() -> None:
    ref = ModelRef(name_or_path="minilm", num_labels=2)
    profiler = Profiler("exp", "dev-0", method="forgetful")
    job = LocalRound(
        model=None,
        tokenizer=None,
        dataset=TextDataset(texts_a=["a"], labels=[0]),
        training=TrainingConfig(),
        model_ref=ref,
        round_index=2,
        seed=0,
        device="cpu",
        global_state={"w": torch.zeros(1)},
        profiler=profiler,
    )
    run_local_round(Forgetful({}, ref), job)
    (record,) = profiler.drain()
    assert (record.phase, record.round_index) == ("train", 2)
    assert record.extra == {"mine": 1.0, "steps": 3.0}


# --------------------------------------------------------------------------- every method

SETTINGS: Dict[str, Dict[str, Any]] = {
    "split": {"cut_layer": 1},
    "kd": {"proxy_size": 8, "server_steps": 2, "server_batch_size": 4},
    "fedcollm": {
        "llm_num_hidden_layers": 2,
        "aux_size": 8,
        "server_steps": 2,
        "server_batch_size": 4,
    },
}


def contract_config(method: str, output_dir: Path) -> ExperimentConfig:
    """One round, two devices, a two-layer MiniLM, two local steps."""
    return parse_config(
        {
            "name": f"contract-{method}",
            "model": {"name_or_path": "minilm", "max_length": 32, "num_hidden_layers": 2},
            "method": {"name": method, **SETTINGS.get(method, {})},
            "training": {"local_steps": 2, "batch_size": 4, "learning_rate": 1e-2},
            "data": {
                "path": str(DEMO_DATA),
                "partition": {"kind": "iid", "num_clients": 2},
                "max_eval_samples": 8,
            },
            "rounds": {"count": 1, "min_clients": 2, "deadline_s": 120, "wait_for_devices_s": 30},
            "output_dir": str(output_dir),
        },
        "contract",
    )


def load_export(out_dir: Path, ref: ModelRef) -> Any:
    """What a user does with the exported global model: a PEFT adapter or a whole model."""
    if (out_dir / "adapter_config.json").exists():
        from peft import PeftModel

        from jetfed.edge.models import load_classifier

        return PeftModel.from_pretrained(load_classifier(ref), str(out_dir))
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(out_dir))


@pytest.mark.parametrize("method", available_methods())
def test_method_contract(method: str, tmp_path: Path, minilm_path: str) -> None:
    """State round trip, the initial state against the update spec, one in-memory round that
    aggregates and changes the global state, and an export that loads."""
    torch.set_num_threads(1)
    config = contract_config(method, tmp_path)
    with MemBroker(f"contract-{method}") as broker:
        coordinator = Coordinator(config, BrokerSpec(url=broker.url))
        instance = coordinator.method

        model = instance.build(coordinator.init, seed=1)
        moved = {name: value + 0.5 for name, value in instance.get_state(model).items()}
        instance.set_state(model, moved)
        assert all(value.equal(moved[name]) for name, value in instance.get_state(model).items())
        assert instance.state_spec(model) == tensor_spec(instance.get_state(model))

        initial = {name: value.clone() for name, value in coordinator.global_state.items()}
        strategy_state = set(coordinator.strategy.state())
        if type(coordinator.strategy).update_spec is Strategy.update_spec:
            assert tensor_spec(initial) == coordinator.strategy.update_spec()

        agents = [
            EdgeAgent(
                EdgeConfig(
                    broker=BrokerSpec(url=broker.url),
                    device_id=f"dev-{i}",
                    experiment=config.name,
                    data=str(DEMO_DATA),
                    num_threads=1,
                    telemetry="psutil",
                    idle_baseline_s=0,
                )
            )
            for i in range(2)
        ]
        threads = [threading.Thread(target=agent.run, daemon=True) for agent in agents]
        for thread in threads:
            thread.start()
        try:
            (metrics,) = coordinator.run()
        finally:
            for agent in agents:
                agent.stop()
            for thread in threads:
                thread.join(timeout=30)
    assert metrics.status == "aggregated" and metrics.num_aggregated == 2
    changed = coordinator.global_state
    assert set(changed) == set(initial)
    state_changed = any(not changed[name].equal(initial[name]) for name in initial)
    assert state_changed or strategy_state != coordinator.strategy.state().keys(), (
        "neither the global state nor the strategy's state (kd: the consensus) changed"
    )
    assert load_export(config.run_dir / "global" / "round-0000", coordinator.model_ref) is not None
    trained = {r.device_id for r in coordinator.run_dir.read_profiles() if r.phase == "train"}
    assert trained == {"dev-0", "dev-1"}, "the agent opens the train phase for every method"
