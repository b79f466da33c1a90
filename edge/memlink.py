"""An in-memory twin of `MqttLink`, so a coordinator and N agents run in one process with the
same code (tests, simulations): broker URL `memory://NAME` names a `MemBroker` created in this
process, and `open_link` picks the link for a broker URL.

The broker keeps MQTT's semantics the protocol relies on: topic filters with `+` and `#`
(paho's own matcher), retained messages (an empty retained payload clears one), a last will
published when a link drops without closing, size limits.

What differs is only which thread does the work: the publishing thread delivers. A message with
an `on_topic` handler runs it there (where paho runs handlers on its network thread); anything
else lands on `inbox` for the owner's thread to `drain`. A delivery thread per link, and a blob
server's worker thread (`serve_in_background`), would only add thread switches: in a 100-device
simulation they were ~300 threads and most of a round's CPU.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, ClassVar, Dict, List, Optional, Tuple, Union
from urllib.parse import urlparse

from paho.mqtt.client import topic_matches_sub
from paho.mqtt.matcher import MQTTMatcher

from jetfed.edge.errors import UserError
from jetfed.edge.logs import log_event
from jetfed.edge.mqtt import CONNECT_WAIT_S, BrokerSpec, Handler, LinkCounters, MqttLink
from jetfed.edge.wire import check_publish_size, mqtt_publish_wire_bytes

logger = logging.getLogger(__name__)

SCHEME = "memory"


class MemBroker:
    """Routes publishes between the `MemLink`s attached to it; reachable as `memory://NAME`."""

    _brokers: ClassVar[Dict[str, MemBroker]] = {}
    _brokers_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str) -> None:
        self.name = name
        self.url = f"{SCHEME}://{name}"
        self._lock = threading.Lock()
        self._links: Dict[str, MemLink] = {}
        self._filters = MQTTMatcher()
        """Topic filter → {client id: link}: a publish finds its receivers through paho's
        trie, not by testing every link's every filter (which made a round of a 100-device
        simulation quadratic in the devices)."""
        self._retained: Dict[str, bytes] = {}
        with MemBroker._brokers_lock:
            if name in MemBroker._brokers:
                raise ValueError(f"an in-memory broker named {name!r} already exists")
            MemBroker._brokers[name] = self

    @classmethod
    def named(cls, url: str) -> MemBroker:
        name = urlparse(url).netloc
        with cls._brokers_lock:
            broker = cls._brokers.get(name)
        if broker is None:
            raise UserError(f"no in-memory broker {url!r} in this process")
        return broker

    def close(self) -> None:
        with MemBroker._brokers_lock:
            MemBroker._brokers.pop(self.name, None)

    def __enter__(self) -> MemBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def attach(self, link: MemLink) -> None:
        """Like a clean-session CONNECT: a client id already connected is taken over."""
        with self._lock:
            previous = self._links.get(link.client_id)
            if previous is not None:
                self._index(previous, add=False)
            self._links[link.client_id] = link
            self._index(link, add=True)
            retained = dict(self._retained)
        if previous is not None and previous is not link:
            previous.lose_connection()
        for topic, payload in retained.items():
            if link.subscribed(topic):
                link.deliver(topic, payload)

    def detach(self, link: MemLink, will: Optional[Tuple[str, bytes]]) -> None:
        with self._lock:
            if self._links.get(link.client_id) is link:
                del self._links[link.client_id]
                self._index(link, add=False)
        if will is not None:
            self.publish(will[0], will[1], retain=True)

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            receivers = {
                client_id: link
                for members in self._filters.iter_match(topic)
                for client_id, link in members.items()
            }
        for link in receivers.values():
            link.deliver(topic, payload)

    def _index(self, link: MemLink, add: bool) -> None:
        """Add `link` under each of its filters, or remove it (caller holds the lock)."""
        for topic_filter in link.subscriptions:
            try:
                members: Dict[str, MemLink] = self._filters[topic_filter]
            except KeyError:
                if not add:
                    continue
                members = {}
                self._filters[topic_filter] = members
            if add:
                members[link.client_id] = link
            elif members.get(link.client_id) is link:
                del members[link.client_id]
                if not members:
                    del self._filters[topic_filter]


class MemLink:
    """`MqttLink`'s public surface over a `MemBroker`."""

    def __init__(
        self,
        spec: BrokerSpec,
        client_id: str,
        subscriptions: List[str],
        will: Optional[Tuple[str, bytes]] = None,
        on_connected: Optional[Callable[[], None]] = None,
    ) -> None:
        self.spec = spec
        self.client_id = client_id
        self.inbox: queue.Queue[Tuple[str, bytes]] = queue.Queue()
        self.counters = LinkCounters()
        self.connect_count = 0
        self._subscriptions = list(subscriptions)
        self._will = will
        self._on_connected = on_connected
        self._handlers: List[Tuple[Callable[[str], bool], Handler]] = []
        self._connected = threading.Event()
        self._counter_lock = threading.Lock()
        self._broker: Optional[MemBroker] = None

    serve_in_background: ClassVar[bool] = False
    """Handlers run on the publisher's thread, which has no socket to get back to: blob chunks
    are served right there (`MqttLink.serve_in_background`)."""

    def on_topic(self, matches: Callable[[str], bool], handler: Handler) -> None:
        """Run `handler` on the publishing thread for topics where `matches(topic)`."""
        self._handlers.append((matches, handler))

    def connect(self, timeout_s: float = CONNECT_WAIT_S) -> None:
        self._broker = MemBroker.named(self.spec.url)
        self._connected.set()
        self.connect_count += 1
        self._broker.attach(self)
        log_event(logger, logging.INFO, "mqtt.connected", client_id=self.client_id)
        if self._on_connected is not None:
            self._on_connected()

    def close(self, final: Optional[Tuple[str, bytes]] = None) -> None:
        """Publish `final` (retained) if given, then disconnect cleanly (no last will)."""
        if final is not None and self.connected:
            self.publish(final[0], final[1], retain=True)
        self._disconnect(will=None)

    def lose_connection(self) -> None:
        """Drop without a clean disconnect: the broker publishes the last will."""
        self._disconnect(will=self._will)

    def _disconnect(self, will: Optional[Tuple[str, bytes]]) -> None:
        if not self._connected.is_set():
            return
        self._connected.clear()
        if self._broker is not None:
            self._broker.detach(self, will)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Size-checked like MqttLink; returns the wire bytes MQTT would have used."""
        check_publish_size(topic, len(payload), self.spec.max_message_bytes)
        wire_bytes = mqtt_publish_wire_bytes(topic, len(payload))
        with self._counter_lock:
            self.counters.bytes_sent += wire_bytes
        if self.connected and self._broker is not None:
            self._broker.publish(topic, bytes(payload), retain)
        return wire_bytes

    def check_message_limit(self, topic: str, payload_bytes: int, setting: str) -> None:
        """`MqttLink.check_message_limit`'s twin: the in-memory broker has no limit beyond the
        link's own `max_message_bytes`, which every publish checks."""

    def wait_published(self, timeout_s: float = 30.0) -> bool:
        return True  # a publish is routed before `publish` returns

    def drain(self, handle: Handler, timeout_s: float) -> None:
        """As MqttLink.drain: wait up to `timeout_s` for the first, then what is queued."""
        try:
            topic, payload = self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            return
        while True:
            handle(topic, payload)
            try:
                topic, payload = self.inbox.get_nowait()
            except queue.Empty:
                return

    @property
    def subscriptions(self) -> List[str]:
        return list(self._subscriptions)

    def subscribed(self, topic: str) -> bool:
        return any(topic_matches_sub(sub, topic) for sub in self._subscriptions)

    def deliver(self, topic: str, payload: bytes) -> None:
        """Count the message received, then run its handler (on this, the publishing thread)
        or put it on `inbox`."""
        with self._counter_lock:
            self.counters.bytes_received += mqtt_publish_wire_bytes(topic, len(payload))
        handler = next((h for matches, h in self._handlers if matches(topic)), None)
        if handler is None:
            self.inbox.put((topic, payload))
            return
        try:
            handler(topic, payload)
        except Exception as exc:  # as on paho's thread: a handler never fails the publisher
            log_event(logger, logging.WARNING, "mqtt.handler_failed", topic=topic, error=exc)


Link = Union[MqttLink, MemLink]


def open_link(
    spec: BrokerSpec,
    client_id: str,
    subscriptions: List[str],
    will: Optional[Tuple[str, bytes]] = None,
    on_connected: Optional[Callable[[], None]] = None,
) -> Link:
    """A `MemLink` for `memory://NAME`, otherwise an `MqttLink`."""
    if urlparse(spec.url).scheme == SCHEME:
        return MemLink(spec, client_id, subscriptions, will, on_connected)
    return MqttLink(spec, client_id, subscriptions, will, on_connected)
