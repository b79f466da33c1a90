"""Failover lists, the start-up message-size probe and refused subscriptions of
jetfed.edge.mqtt.MqttLink, on real Mosquittos (and a NATS, which refuses a subscription in its
SUBACK)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, List, Tuple

import pytest

from jetfed.edge import mqtt
from jetfed.edge.errors import UserError
from jetfed.edge.mqtt import BrokerSpec, MqttLink
from tests.brokers import MosquittoBroker, NatsBroker, binary, free_port
from tests.fleet import wait_for


def _link(url: str, inbox_topic: str = "t/#") -> MqttLink:
    return MqttLink(BrokerSpec(url=url), client_id="failover-test", subscriptions=[inbox_topic])


def test_url_list_from_yaml_or_commas() -> None:
    spec = BrokerSpec.model_validate({"url": ["mqtt://a:1883", "mqtt://b:1884"]})
    assert spec.urls() == ["mqtt://a:1883", "mqtt://b:1884"]
    assert BrokerSpec(url="mqtt://a:1883, mqtt://b").endpoints() == [
        ("a", 1883, False),
        ("b", 1883, False),
    ]
    with pytest.raises(UserError, match="mix mqtt:// and mqtts://"):
        BrokerSpec(url="mqtt://a,mqtts://b").endpoints()
    with pytest.raises(UserError, match="'http://b' must look like"):
        BrokerSpec(url="mqtt://a,http://b").endpoints()


def test_link_fails_over_to_the_next_node_and_logs_each_switch(
    mosquitto_factory: Callable[..., MosquittoBroker], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = mosquitto_factory(), mosquitto_factory()
    dead = f"mqtt://127.0.0.1:{free_port()}"
    link = _link(f"{dead},{first.url},{second.url}")
    caplog.set_level(logging.WARNING, logger="jetfed.edge.mqtt")
    link.connect(timeout_s=20)
    try:
        assert link.broker_url == first.url
        first.stop()
        wait_for(lambda: link.connect_count == 2 and link.connected, 30, "the reconnect")
        assert link.broker_url == second.url
        link.publish("t/after-switch", b"still here")
        got: List[Tuple[str, bytes]] = []
        link.drain(lambda topic, payload: got.append((topic, payload)), timeout_s=10)
        assert got == [("t/after-switch", b"still here")]
    finally:
        link.close()
    switches = [r.getMessage() for r in caplog.records if "mqtt.switch" in r.getMessage()]
    assert len(switches) == 2, switches
    assert f"from_url={dead} to_url={first.url}" in switches[0]
    assert f"from_url={first.url} to_url={second.url}" in switches[1]


def test_message_over_the_broker_limit_is_one_line_at_start(
    mosquitto_factory: Callable[..., MosquittoBroker],
) -> None:
    port = free_port()
    broker = mosquitto_factory(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmessage_size_limit 100000", port=port
    )
    link = _link(broker.url)
    link.connect(timeout_s=20)
    try:
        link.check_message_limit("jetfed/probe-test/probe", 50_000, "transfer.chunk_size_bytes")
        with pytest.raises(UserError) as refused:
            link.check_message_limit(
                "jetfed/probe-test/probe", 1 << 20, "transfer.chunk_size_bytes"
            )
    finally:
        link.close()
    line = str(refused.value)
    assert "\n" not in line
    assert "size limit is below transfer.chunk_size_bytes=1048576" in line
    assert broker.url in line


NATS_DENYING = """
accounts { A { jetstream: enabled, users: [
  { user: u, password: p, permissions: { subscribe: { deny: ["jetfed.denied.>"] } } } ] } }
no_auth_user: u
"""


def test_a_refused_subscription_is_asked_again_then_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if binary("nats-server") is None:
        pytest.skip("nats-server is not installed: apt-get install nats-server")
    monkeypatch.setattr(mqtt, "SUBSCRIBE_RETRY_S", 0.05)
    broker = NatsBroker(tmp_path / "nats", free_port(), extra_config=NATS_DENYING)
    broker.start()
    link = MqttLink(
        BrokerSpec(url=broker.url),
        client_id="refused-test",
        subscriptions=["jetfed/allowed/x", "jetfed/denied/x"],
    )
    try:
        with caplog.at_level(logging.INFO, logger="jetfed.edge.mqtt"):
            link.connect(timeout_s=20)
            wait_for(lambda: link.refused_subscriptions, 20, "the refusal given up")
    finally:
        link.close()
        broker.stop()
    assert list(link.refused_subscriptions) == ["jetfed/denied/x"]
    retries = [r for r in caplog.records if "mqtt.subscribe_refused" in r.getMessage()]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(retries) == mqtt.SUBSCRIBE_ATTEMPTS - 1
    assert len(errors) == 1 and "topic=jetfed/denied/x" in errors[0].getMessage()
