"""A device not pinned to an experiment serves whichever coordinator announces a run, one run at a
time, says what it waits for, refuses a forged announcement, and never speaks in two
experiments at once (real Mosquitto, real agent)."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, List, Tuple

import paho.mqtt.client as mqtt
import pytest

from jetfed.edge.agent import EdgeConfig
from jetfed.edge.lobby import Lobby
from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.wire import Announcement, encode_message
from tests.brokers import MosquittoBroker

Message = Tuple[str, bytes]


class Watcher:
    """Sees every jetfed message on the broker, in order."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.messages: queue.Queue[Message] = queue.Queue()
        self.seen: List[Message] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        subscribed = threading.Event()
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("jetfed/#", qos=1)
        self.client.loop_start()
        assert subscribed.wait(10)

    def announce(self, experiment: str, payload: bytes) -> None:
        self.client.publish(f"jetfed/{experiment}/coordinator", payload, qos=1, retain=True)

    def wait_for(self, wanted: Callable[[str, bytes], bool], timeout_s: float = 60) -> None:
        while True:
            topic, payload = self.messages.get(timeout=timeout_s)
            self.seen.append((topic, payload))
            if wanted(topic, payload):
                return

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def status(experiment: str, value: bytes) -> Callable[[str, bytes], bool]:
    return lambda t, p: t == f"jetfed/{experiment}/devices/dev-0/status" and p == value


def announcement(experiment: str) -> bytes:
    return encode_message(Announcement(experiment=experiment, started_unix_s=1.0))


def test_an_unpinned_device_follows_the_experiment_that_announces_itself(
    mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = EdgeConfig(
        broker=BrokerSpec(url=mosquitto.url),
        device_id="dev-0",
        telemetry="psutil",
        idle_baseline_s=0,
    )
    watcher = Watcher(mosquitto)
    lobby = Lobby(config)
    thread = threading.Thread(target=lobby.run, daemon=True)
    thread.start()
    try:
        forged = Announcement(experiment="exp-c", started_unix_s=0)
        watcher.announce("exp-b", encode_message(forged))
        watcher.announce("exp-a", announcement("exp-a"))
        watcher.wait_for(status("exp-a", b"online"))
        watcher.announce("exp-a", b"")  # the run ended
        watcher.wait_for(status("exp-a", b"offline"))
        watcher.announce("exp-b", announcement("exp-b"))
        watcher.wait_for(status("exp-b", b"online"))
    finally:
        lobby.stop()
        thread.join(timeout=30)
        watcher.close()
    assert not thread.is_alive()
    device = [(t, p) for t, p in watcher.seen if "/devices/dev-0/" in t]
    device_topics = [t for t, _ in device]
    # exp-a only until its offline, then exp-b only: never both, never the forged one first
    switch = device.index(("jetfed/exp-a/devices/dev-0/status", b"offline"))
    assert all(t.startswith("jetfed/exp-a/") for t in device_topics[: switch + 1])
    assert all(t.startswith("jetfed/exp-b/") for t in device_topics[switch + 1 :])
    logs = caplog.text
    assert "edge.waiting" in logs and "listening=jetfed/+/coordinator" in logs
    assert f"broker={mosquitto.url}" in logs
    assert "listening=jetfed/exp-a/task" in logs
    assert "announcement.rejected topic=jetfed/exp-b/coordinator" in logs
