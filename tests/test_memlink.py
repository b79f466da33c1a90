"""The in-memory link keeps the MQTT semantics the protocol relies on (edge/memlink.py)."""

from __future__ import annotations

import queue
import threading
from typing import List, Tuple

import pytest

from jetfed.edge.errors import UserError
from jetfed.edge.memlink import MemBroker, MemLink, open_link
from jetfed.edge.mqtt import BrokerSpec, MqttLink


def received(link: MemLink, timeout_s: float = 2.0) -> List[Tuple[str, bytes]]:
    got: List[Tuple[str, bytes]] = []
    link.drain(lambda topic, payload: got.append((topic, payload)), timeout_s)
    return got


def test_retained_wildcards_will_and_handlers() -> None:
    with MemBroker("memlink-test") as broker:
        spec = BrokerSpec(url=broker.url)
        device = MemLink(spec, "dev", ["x/devices/dev/#"], will=("x/devices/dev/status", b"off"))
        device.connect()
        device.publish("x/devices/dev/status", b"online", retain=True)
        device.publish("x/task", b"not subscribed")

        served: queue.Queue[str] = queue.Queue()
        coordinator = MemLink(spec, "coord", ["x/devices/+/status", "x/devices/+/want"])
        coordinator.on_topic(
            lambda topic: topic.endswith("/want"),
            lambda topic, _: served.put(threading.current_thread().name),
        )
        coordinator.connect()
        assert received(coordinator) == [("x/devices/dev/status", b"online")]  # retained
        device.publish("x/devices/dev/want", b"{}")
        # the handler ran before publish returned, on the publisher's thread, not the inbox's
        assert served.get_nowait() == threading.current_thread().name
        assert received(coordinator, 0.1) == []
        assert not MemLink.serve_in_background and MqttLink.serve_in_background

        device.lose_connection()
        assert received(coordinator) == [("x/devices/dev/status", b"off")]  # the last will
        coordinator.publish("x/devices/dev/status", b"", retain=True)
        late = MemLink(spec, "late", ["x/#"])
        late.connect()
        assert received(late, 0.2) == []  # an empty retained payload cleared it
        assert coordinator.counters.bytes_sent > 0 and coordinator.counters.bytes_received > 0
        for link in (coordinator, late):
            link.close()


def test_open_link_picks_the_link_by_url() -> None:
    assert isinstance(open_link(BrokerSpec(url="mqtt://127.0.0.1:1"), "c", []), MqttLink)
    link = open_link(BrokerSpec(url="memory://nowhere"), "c", [])
    assert isinstance(link, MemLink)
    with pytest.raises(UserError, match="no in-memory broker"):
        link.connect()
