"""Bit-reproducible runs: the demo's fleet (lora, 2 devices × 2 rounds) over a real Mosquitto
gives the same global adapter twice with one seed, and another one with another seed; the
simulation of the same experiment (`jetfed simulate`: virtual devices, no broker) ends on the
same global adapter, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file

from jetfed.coordinator.config import ExperimentConfig, parse_config
from jetfed.coordinator.demo import DEMO_DATA, demo_config
from jetfed.coordinator.fleet import run_local_fleet
from jetfed.coordinator.simulate import simulate
from jetfed.edge.train import device_seed
from tests.brokers import MosquittoBroker
from tests.fleet import read_metrics


def tiny_demo(name: str, output_dir: Path, seed: int) -> ExperimentConfig:
    """`jetfed demo --seed SEED --rounds 2 --local-steps 2`, on a one-layer MiniLM."""
    config = demo_config(
        name, "lora", 2, 2, 2, str(DEMO_DATA), str(output_dir), "iid", 1.0, 16, None, seed
    )
    raw = config.model_dump(mode="json")
    raw["model"].update(num_hidden_layers=1, max_length=32)
    raw["training"]["batch_size"] = 4
    return parse_config(raw, "test")


def final_adapter(config: ExperimentConfig) -> Dict[str, torch.Tensor]:
    return load_file(str(config.run_dir / "global/round-0001/adapter_model.safetensors"))


def test_device_seeds_differ_by_experiment_seed_round_and_client() -> None:
    seeds = {device_seed(s, r, c) for s in range(3) for r in range(3) for c in range(3)}
    assert len(seeds) == 27
    assert device_seed(1, 2, 3) == device_seed(1, 2, 3)


def test_same_seed_same_adapter_other_seed_other_adapter(
    tmp_path: Path, mosquitto: MosquittoBroker, minilm_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JETFED_IDLE_BASELINE_S", "0.5")  # the edges' idle power before round 0
    runs = {}
    for name, seed in (("first", 0), ("again", 0), ("other", 1)):
        config = tiny_demo(f"repro-{name}", tmp_path / "runs", seed)
        metrics = run_local_fleet(config, 2, broker_url=mosquitto.url)
        assert [m.num_aggregated for m in metrics] == [2, 2]
        assert config.training.seed == seed
        recorded = [m["client_indices"] for m in read_metrics(config.run_dir)]
        assert recorded == [{"demo-01": 0, "demo-02": 1}] * 2
        runs[name] = final_adapter(config)
    simulated = tiny_demo("repro-simulated", tmp_path / "runs", 0)
    assert [m.num_aggregated for m in simulate(simulated)] == [2, 2]
    recorded = [m["client_indices"] for m in read_metrics(simulated.run_dir)]
    assert recorded == [{"demo-01": 0, "demo-02": 1}] * 2
    runs["simulated"] = final_adapter(simulated)
    first, again, other = runs["first"], runs["again"], runs["other"]
    assert set(first) == set(again) == set(other) == set(runs["simulated"])
    assert all(torch.equal(first[n], again[n]) for n in first), "same seed, another adapter"
    assert all(torch.equal(first[n], runs["simulated"][n]) for n in first), (
        "the simulation ended on another adapter than the deployed run"
    )
    assert any(not torch.equal(first[n], other[n]) for n in first), "another seed, same adapter"
