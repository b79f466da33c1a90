"""FedCoLLM end to end over a real Mosquitto: 2 devices tune a 3-layer MiniLM (SLM) while the
coordinator co-tunes the full 6-layer MiniLM (LLM); only the SLM adapter crosses the network."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from jetfed.edge.methods.fedcollm import FedCoLLMMethod
from jetfed.edge.wire import ModelRef
from tests.brokers import MosquittoBroker
from tests.fleet import jetfed, log_tail, read_metrics, start_edges, stop, write_config

HEADER_BYTES = 8192
"""Allowance for one safetensors header: a JSON entry per tensor name."""


def slm_adapter_bytes() -> int:
    """fp32 bytes of the SLM's federated tensors (LoRA on query/value + the task head)."""
    method = FedCoLLMMethod({}, ModelRef(name_or_path="minilm", num_labels=2, num_hidden_layers=3))
    state = method.get_state(method.build(None, seed=0))
    return sum(t.numel() for t in state.values()) * 4


def test_fedcollm_two_devices_one_round(
    tmp_path: Path, mosquitto: MosquittoBroker, minilm_path: str, sst2_dir: Path
) -> None:
    name = "it-fedcollm"
    config = write_config(tmp_path, name, "fedcollm", sst2_dir, rounds=1)
    log = tmp_path / "coord.log"
    overrides = [
        "--set",
        "model.num_hidden_layers=3",
        "--set",
        "method.aux_size=64",
        "--set",
        "method.server_steps=3",
    ]
    coordinator = jetfed(
        "-v", "coordinator", "run", str(config), "--broker", mosquitto.url, *overrides, log=log
    )
    edges = start_edges(mosquitto.url, name, sst2_dir, 2, tmp_path / "logs")
    try:
        assert coordinator.wait(timeout=600) == 0, log_tail(log, *(tmp_path / "logs").iterdir())
    finally:
        stop([coordinator, *edges])
    run_dir = tmp_path / "runs" / name
    (metrics,) = read_metrics(run_dir)
    assert metrics["status"] == "aggregated" and metrics["num_aggregated"] == 2
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert 0.0 <= metrics["extra"]["llm_accuracy"] <= 1.0
    assert metrics["extra"]["llm_eval_loss"] > 0
    adapter = slm_adapter_bytes()
    assert 2 * adapter < metrics["extra"]["update_payload_bytes"] <= 2 * (adapter + HEADER_BYTES)
    assert 2 * adapter < metrics["bytes_down"] <= 2 * (adapter + 4 * HEADER_BYTES)
    export = run_dir / "global" / "round-0000"
    slm = load_file(str(export / "adapter_model.safetensors"))
    llm = load_file(str(export / "llm" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in llm.values()) > sum(t.numel() for t in slm.values())
