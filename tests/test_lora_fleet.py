"""LoRA-aware aggregation end to end, the coordinator and real agents in one process: mixed
ranks 4/8/16 over real Mosquitto (flexlora, `assignment:`, a device refused for its memory),
and ffa / exact over the in-memory link (B-only uploads; the fold reaching the devices)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch

from jetfed.coordinator.config import parse_config
from jetfed.coordinator.demo import DEMO_DATA
from jetfed.coordinator.records import RoundMetrics
from jetfed.coordinator.server import Coordinator
from jetfed.edge.agent import EdgeAgent, EdgeConfig
from jetfed.edge.memlink import MemBroker
from jetfed.edge.methods.lora import A_SUFFIX, B_SUFFIX
from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.wire import Hello
from tests.brokers import MosquittoBroker
from tests.scripted_device import ScriptedDevice


def fleet_config(name: str, output_dir: Path, devices: int, count: int, **sections: Any) -> Any:
    """A one-layer MiniLM, two local steps of four samples: the protocol, not the accuracy."""
    raw: Dict[str, Any] = {
        "name": name,
        "model": {"name_or_path": "minilm", "max_length": 32, "num_hidden_layers": 1},
        "method": {"name": "lora"},
        "training": {"local_steps": 2, "batch_size": 4, "learning_rate": 1e-2},
        "data": {
            "path": str(DEMO_DATA),
            "partition": {"kind": "iid", "num_clients": devices},
            "max_eval_samples": 8,
        },
        "rounds": {"count": count, "min_clients": 2, "deadline_s": 120, "wait_for_devices_s": 60},
        "output_dir": str(output_dir),
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return parse_config(raw, name)


def run_fleet(
    coordinator: Coordinator, url: str, experiment: str, count: int
) -> Tuple[List[RoundMetrics], List[EdgeAgent]]:
    agents = [
        EdgeAgent(
            EdgeConfig(
                broker=BrokerSpec(url=url),
                device_id=f"dev-{i}",
                experiment=experiment,
                data=str(DEMO_DATA),
                num_threads=1,
                telemetry="psutil",
                idle_baseline_s=0,
            )
        )
        for i in range(count)
    ]
    threads = [threading.Thread(target=agent.run, daemon=True) for agent in agents]
    for thread in threads:
        thread.start()
    try:
        return coordinator.run(), agents
    finally:
        for agent in agents:
            agent.stop()
        for thread in threads:
            thread.join(timeout=30)


def factor_shapes(agent: EdgeAgent) -> Dict[str, Tuple[int, ...]]:
    """The LoRA factors of the model the agent trained last."""
    model = agent.trainer.built_model
    assert model is not None
    return {
        name: tuple(param.shape)
        for name, param in model.named_parameters()
        if name.endswith((A_SUFFIX, B_SUFFIX))
    }


class SmallDevice(ScriptedDevice):
    """Says hello with 64 MiB: too little for any rank."""

    def hello(self) -> Hello:
        return super().hello().model_copy(update={"memory_total_bytes": 64 << 20})


def test_ranks_4_8_16_federate_over_mosquitto(
    tmp_path: Path, mosquitto: MosquittoBroker, minilm_path: str, caplog: Any
) -> None:
    torch.set_num_threads(1)
    config = fleet_config(
        "hetero",
        tmp_path,
        devices=4,
        count=2,
        method={"rank": 16, "alpha": 16},
        rounds={"min_clients": 3},
        aggregation={"strategy": "flexlora"},
        assignment={
            "ranks": [16, 8, 4],
            "devices": {"dev-0": {"rank": 4}, "dev-1": {"rank": 8}, "dev-2": {"rank": 16}},
        },
    )
    coordinator = Coordinator(config, BrokerSpec(url=mosquitto.url))
    small = SmallDevice(mosquitto.url, config.name, "dev-small")
    small.join()
    try:
        results, agents = run_fleet(coordinator, mosquitto.url, config.name, 3)
    finally:
        small.close()
    assert [m.status for m in results] == ["aggregated", "aggregated"]
    for metrics in results:
        assert metrics.devices == ["dev-0", "dev-1", "dev-2"] and metrics.num_aggregated == 3
        assert {d: a.rank for d, a in metrics.assignments.items()} == {
            "dev-0": 4,
            "dev-1": 8,
            "dev-2": 16,
        }
        assert "dev-small" in metrics.refused and "GiB" in metrics.refused["dev-small"]
        assert metrics.aggregation_error is not None
    for agent, rank in zip(agents, (4, 8, 16)):  # each trained at its own rank
        shapes = factor_shapes(agent)
        assert shapes and all(rank in shape for shape in shapes.values())
    refusals = [r for r in caplog.records if "assignment.refused" in r.getMessage()]
    assert len(refusals) == 1, "one line per refused device, not one per round"
    global_a = [t for n, t in coordinator.global_state.items() if n.endswith(A_SUFFIX)]
    assert all(t.shape[0] == 16 for t in global_a)
    saved = coordinator.run_dir.path / "metrics.jsonl"
    assert '"aggregation_error"' in saved.read_text()


@pytest.mark.parametrize("method", ["lora", "federa"])
def test_ffa_uploads_b_only(method: str, tmp_path: Path, minilm_path: str) -> None:
    torch.set_num_threads(1)
    config = fleet_config(
        "ffa",
        tmp_path,
        devices=2,
        count=1,
        method={"name": method, "freeze_a": True},
        aggregation={"strategy": "ffa"},
    )
    with MemBroker("ffa") as broker:
        coordinator = Coordinator(config, BrokerSpec(url=broker.url))
        init = coordinator.init or {}
        frozen = {n: t.clone() for n, t in init.items() if n.endswith(A_SUFFIX)}
        assert frozen and not any(n.endswith(A_SUFFIX) for n in coordinator.expected)
        (metrics,), agents = run_fleet(coordinator, broker.url, config.name, 2)
    assert metrics.status == "aggregated" and metrics.num_aggregated == 2
    assert metrics.aggregation_error is not None and metrics.aggregation_error.worst < 1e-6
    for agent in agents:  # A never moved on the devices
        model = agent.trainer.built_model
        assert model is not None
        params = dict(model.named_parameters())
        assert all(torch.equal(params[n], t) for n, t in frozen.items())


@pytest.mark.parametrize("method", ["lora", "federa"])
def test_exact_fold_reaches_the_devices(method: str, tmp_path: Path, minilm_path: str) -> None:
    """FeDeRA's base is its residual W − s·B₀A₀: the fold adds to it the same way."""
    torch.set_num_threads(1)
    config = fleet_config(
        "exact",
        tmp_path,
        devices=2,
        count=2,
        method={"name": method},
        aggregation={"strategy": "exact"},
    )
    with MemBroker("exact") as broker:
        coordinator = Coordinator(config, BrokerSpec(url=broker.url))
        results, agents = run_fleet(coordinator, broker.url, config.name, 2)
    assert [m.status for m in results] == ["aggregated", "aggregated"]
    assert all(
        m.aggregation_error is not None and m.aggregation_error.worst < 1e-5 for m in results
    )
    assert results[1].extra["fold_bytes"] > 0
    fold = coordinator.strategy.state()
    assert fold
    for agent in agents:  # round 1 trained on the base + round 0's fold, as the coordinator holds
        model = agent.trainer.built_model
        assert model is not None
        params = dict(model.named_parameters())
        original = model.unfolded_base
        assert set(original) == set(fold)
        for name in fold:
            assert not torch.equal(params[name], original[name])


def test_federa_devices_of_ranks_4_and_8_federate(tmp_path: Path, minilm_path: str) -> None:
    """FeDeRA's residual base stays the run's (rank 8) on a rank-4 device; its start is the
    top-4 part of the global product."""
    torch.set_num_threads(1)
    config = fleet_config(
        "federa-hetero",
        tmp_path,
        devices=2,
        count=1,
        method={"name": "federa", "rank": 8},
        aggregation={"strategy": "flexlora"},
        assignment={"ranks": [8], "devices": {"dev-0": {"rank": 4}}},
    )
    with MemBroker("federa-hetero") as broker:
        coordinator = Coordinator(config, BrokerSpec(url=broker.url))
        initial = dict(coordinator.global_state)
        (metrics,), agents = run_fleet(coordinator, broker.url, config.name, 2)
    assert metrics.status == "aggregated" and metrics.num_aggregated == 2
    assert {d: a.rank for d, a in metrics.assignments.items()} == {"dev-0": 4, "dev-1": 8}
    assert all(4 in shape for shape in factor_shapes(agents[0]).values())
    assert metrics.aggregation_error is not None
    changed = coordinator.global_state
    assert any(not changed[n].equal(initial[n]) for n in initial)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "assignment"),
    [("exact", None), ("flexlora", {"ranks": [8], "devices": {"dev-0": {"rank": 4}}})],
)
def test_causal_lm_strategies(
    strategy: str, assignment: Any, tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """SmolLM2 (2 layers), a coordinator and two edge processes over Mosquitto: the fold and
    mixed ranks on q_proj/v_proj (576→576, 576→192). Processes, not threads: two agents
    loading SmolLM2 at once in one process meet meta tensors (a race outside this code)."""
    from tests.fleet import jetfed, log_tail, read_metrics, start_edges, stop, write_config
    from tests.llm import TINY_LAYERS, require_smollm2

    require_smollm2()
    name = f"causal-{strategy}"
    sections: Dict[str, Any] = {"aggregation": {"strategy": strategy}}
    if assignment:
        sections["assignment"] = assignment
    config = write_config(
        tmp_path,
        name,
        "lora",
        DEMO_DATA,
        model={"name_or_path": "smollm2", "max_length": 48, "num_hidden_layers": TINY_LAYERS},
        training={"local_steps": 1, "batch_size": 2, "learning_rate": 1e-3},
        evaluation={"generate_rows": 1, "max_new_tokens": 2},
        **sections,
    )
    log = tmp_path / "coordinator.log"
    coordinator = jetfed(
        "-v", "coordinator", "run", str(config), "--broker", mosquitto.url, log=log
    )
    edges = start_edges(mosquitto.url, name, DEMO_DATA, 2, tmp_path / "logs")
    try:
        assert coordinator.wait(timeout=600) == 0, log_tail(log, *(tmp_path / "logs").iterdir())
    finally:
        stop([coordinator, *edges])
    rounds = read_metrics(tmp_path / "runs" / name)
    assert [m["status"] for m in rounds] == ["aggregated", "aggregated"]
    for metrics in rounds:
        layers = metrics["aggregation_error"]["layers"]
        assert any("v_proj" in layer for layer in layers)
        if assignment:
            assert metrics["assignments"]["dev-0"]["rank"] == 4


def test_ranks_other_than_the_runs_need_flexlora(tmp_path: Path, minilm_path: str) -> None:
    from jetfed.edge.errors import UserError

    config = fleet_config("fixed-rank", tmp_path, devices=2, count=1, assignment={"ranks": [8, 4]})
    with pytest.raises(UserError, match=r"needs aggregation\.strategy: flexlora"):
        Coordinator(config, BrokerSpec(url="memory://fixed-rank"))
