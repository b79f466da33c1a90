"""One federated round (2 devices, LoRA, MiniLM) through each MQTT 3.1.1 broker jetfed supports:
Mosquitto (the reference), amqtt (embedded), RabbitMQ's MQTT plugin and NATS's MQTT gateway."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.brokers import free_port
from tests.fleet import jetfed, log_tail, read_metrics, start_edges, stop, write_config

BROKERS = {"mosquitto": "mosquitto", "rabbitmq": "rabbitmq_broker", "nats": "nats_broker"}


@pytest.mark.parametrize("broker_kind", ["mosquitto", "amqtt", "rabbitmq", "nats"])
def test_one_round_through_each_broker(
    broker_kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    minilm_path: str,
    sst2_dir: Path,
) -> None:
    name = f"brokers-{broker_kind}"
    config = write_config(tmp_path, name, "lora", sst2_dir, rounds=1)
    if broker_kind == "amqtt":
        port = free_port()
        url = f"mqtt://127.0.0.1:{port}"
        where = ["--embedded-port", str(port)]
    else:
        url = request.getfixturevalue(BROKERS[broker_kind]).url
        where = ["--broker", url]
    coordinator = jetfed("-v", "coordinator", "run", str(config), *where, log=tmp_path / "c.log")
    edges = start_edges(url, name, sst2_dir, 2, tmp_path / "logs")
    try:
        assert coordinator.wait(timeout=600) == 0, log_tail(
            tmp_path / "c.log", *(tmp_path / "logs").iterdir()
        )
    finally:
        stop([coordinator, *edges])
    metrics = read_metrics(tmp_path / "runs" / name)
    assert [(m["round_index"], m["status"], m["num_aggregated"]) for m in metrics] == [
        (0, "aggregated", 2)
    ]
