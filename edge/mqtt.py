"""One MQTT connection (paho-mqtt 2.x) that survives broker restarts and network drops.

paho's network thread reconnects with backoff; on every (re)connect we re-subscribe and publish
the retained `online` status. A broker spec may name several URLs (the nodes of a cluster): the
first that answers is used, and every lost connection or failed attempt moves to the next one in
order (one log line per switch), so a device whose node dies carries on through another node.

Inbound messages land on a queue that the owner's single thread drains, so protocol state is
never touched from two threads. Handlers registered with `on_topic` run on paho's thread instead:
used only for serving blob chunks, which must keep flowing while the owner is busy training.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Union
from urllib.parse import urlparse

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel, ConfigDict, Field, field_validator

from jetfed.edge.errors import UserError
from jetfed.edge.logs import log_event
from jetfed.edge.wire import DEFAULT_MAX_MESSAGE_BYTES, check_publish_size, mqtt_publish_wire_bytes

logger = logging.getLogger(__name__)

CONNECT_WAIT_S = 10.0
"""How long `connect` retries a broker that is not up (yet) before one line names the cause: a
broker still starting gets this long, a mistyped address is not a minute's silence, and a
device service is restarted by its manager (install_jetson.sh's unit: Restart=on-failure)."""
CONNECT_ATTEMPT_S = 5.0
CONNECT_RETRY_S = 1.0
# CONNACK reasons that may pass (MQTT 5 codes, which paho also uses for 3.1.1 brokers):
# server unavailable, server busy. Anything else refuses the same credentials again.
RETRYABLE_REFUSALS = (136, 137)
PROBE_ATTEMPTS = 3
PROBE_WAIT_S = 5.0
SUBSCRIBE_ATTEMPTS = 5
SUBSCRIBE_RETRY_S = 1.0
"""A subscription the broker refuses (SUBACK failure) is asked for again, 1 s, 2 s, 4 s ...
apart, up to SUBSCRIBE_ATTEMPTS in all, then one error line: nothing on that topic would ever
arrive."""
PROBE_TOPIC_HEADROOM_BYTES = 256
"""Probe payloads are this much larger than a chunk: the longest chunk topic minus the probe's."""
NOT_AUTHORISED = (134, 135)  # bad user name or password, not authorised


def refusal_text(reason_code: Any, username: Optional[str]) -> str:
    """One line for a broker's refusal, saying what to fix."""
    if reason_code.value in NOT_AUTHORISED:
        who = f"user {username!r}" if username else "an anonymous client"
        return f"{who} is not authorised ({reason_code}): check the username and password"
    return str(reason_code)


Endpoint = Tuple[str, int, bool]  # host, port, tls


class BrokerSpec(BaseModel):
    """Where the broker is and how to authenticate: `mqtt://host:1883` or `mqtts://host:8883`.

    `url` may list several nodes of one cluster, comma-separated (or a YAML list), tried in order:
    `mqtt://node-a:1883,mqtt://node-b:1883`. They share the credentials and TLS settings."""

    model_config = ConfigDict(extra="forbid")

    url: str = "mqtt://127.0.0.1:1883"
    username: Optional[str] = None
    password: Optional[str] = None
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    keepalive_s: int = Field(default=30, ge=5)
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=1024)

    @field_validator("url", mode="before")
    @classmethod
    def _join_list(cls, value: Union[str, List[str]]) -> str:
        return ",".join(value) if isinstance(value, list) else value

    def urls(self) -> List[str]:
        """The broker URLs in the order they are tried."""
        return [part.strip() for part in self.url.split(",") if part.strip()]

    def endpoints(self) -> List[Endpoint]:
        """(host, port, tls) of every URL; UserError for a malformed one or mixed TLS."""
        found = [_endpoint_of(url) for url in self.urls()]
        if not found:
            raise UserError("broker url is empty: give mqtt://HOST:1883 or mqtts://HOST:8883")
        if len({tls for _, _, tls in found}) > 1:
            raise UserError(
                f"broker urls {self.url!r} mix mqtt:// and mqtts://: list the nodes of one "
                "cluster with the same scheme"
            )
        return found

    def endpoint(self) -> Endpoint:
        """The first endpoint, after checking every URL."""
        return self.endpoints()[0]


def _endpoint_of(url: str) -> Endpoint:
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parsed.hostname:
        raise UserError(f"broker url {url!r} must look like mqtt://HOST:1883 or mqtts://HOST:8883")
    tls = parsed.scheme in ("mqtts", "ssl")
    return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


def apply_credentials(client: paho.Client, spec: BrokerSpec) -> Tuple[str, int]:
    """Username/password and TLS from `spec` on a paho client; returns the first (host, port)."""
    if spec.username:
        client.username_pw_set(spec.username, spec.password)
    host, port, tls = spec.endpoint()
    if tls:
        client.tls_set(
            ca_certs=spec.ca_file,
            certfile=spec.cert_file,
            keyfile=spec.key_file,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    return host, port


@dataclass
class LinkCounters:
    """Estimated MQTT packet bytes in each direction (payload + topic + headers)."""

    bytes_sent: int = 0
    bytes_received: int = 0


Handler = Callable[[str, bytes], None]


class MqttLink:
    """A reconnecting client with a last will, fixed subscriptions and an inbound queue."""

    serve_in_background: ClassVar[bool] = True
    """`on_topic` handlers run on paho's network thread, which must get back to the socket:
    blob chunks are read and published from a worker thread (`BlobServer(background=True)`)."""

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
        self._subscriptions = list(subscriptions)
        self._handlers: List[Tuple[Callable[[str], bool], Handler]] = []
        self._on_connected = on_connected
        self._connected = threading.Event()
        self._answered = threading.Event()  # the first CONNACK arrived (accepted or refused)
        self._refusal: Optional[str] = None
        self._counter_lock = threading.Lock()
        self.connect_count = 0
        self._closing = False
        self._client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=15)
        self._client.connect_timeout = CONNECT_ATTEMPT_S
        self._client.max_queued_messages_set(0)
        host, port = apply_credentials(self._client, spec)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_connect_fail = self._handle_connect_fail
        self._client.on_subscribe = self._handle_subscribe
        self._subscribing: Dict[int, str] = {}  # message id → topic, until its SUBACK
        self._subscribe_lock = threading.Lock()
        self._refusals: Dict[str, int] = {}
        self.refused_subscriptions: Dict[str, str] = {}
        """Topic → the broker's reason, for subscriptions it kept refusing (given up)."""
        self._endpoints = [(h, p) for h, p, _ in spec.endpoints()]
        self._current = 0
        self._host, self._port = host, port

    # ------------------------------------------------------------------ lifecycle

    def on_topic(self, matches: Callable[[str], bool], handler: Handler) -> None:
        """Run `handler` on paho's thread for topics where `matches(topic)` (not queued)."""
        self._handlers.append((matches, handler))

    def connect(self, timeout_s: float = CONNECT_WAIT_S) -> None:
        """Connect within `timeout_s`, then leave reconnecting to paho's network thread.

        A broker that is not up yet is retried until then; what retrying cannot fix (wrong
        credentials, a failed TLS handshake) is one UserError at once, naming the cause."""
        started_s = time.monotonic()
        deadline_s = started_s + timeout_s
        while (cause := self._open_socket()) is not None:
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                raise UserError(self._no_connection(started_s, cause))
            if self._switch(cause) == 0:  # every node tried once: back off before the next pass
                time.sleep(min(CONNECT_RETRY_S, remaining_s))
        self._client.loop_start()
        self._answered.wait(max(0.0, deadline_s - time.monotonic()))
        if self._connected.is_set():
            return
        self._client.disconnect()
        self._client.loop_stop()
        if self._refusal is not None:
            raise UserError(
                f"the broker at {self.broker_url} refused the connection: {self._refusal}"
            )
        raise UserError(
            self._no_connection(
                started_s,
                f"{self._host}:{self._port} took the TCP connection but never answered the "
                "MQTT connect (a TLS listener? then use mqtts://)",
            )
        )

    def _no_connection(self, started_s: float, cause: str) -> str:
        """The line for giving up, with the time really waited (an attempt may overrun)."""
        waited_s = time.monotonic() - started_s
        return f"no connection to the broker at {self.spec.url} after {waited_s:.0f} s: {cause}"

    @property
    def broker_url(self) -> str:
        """The URL of the node this link uses (or tries) now."""
        return self.spec.urls()[self._current]

    def _switch(self, cause: str) -> int:
        """Move to the next URL of the list (a log line when there is another); its index."""
        if len(self._endpoints) == 1:
            return 0
        previous = self.broker_url
        self._current = (self._current + 1) % len(self._endpoints)
        self._host, self._port = self._endpoints[self._current]
        log_event(
            logger,
            logging.WARNING,
            "mqtt.switch",
            client_id=self.client_id,
            from_url=previous,
            to_url=self.broker_url,
            cause=cause,
        )
        return self._current

    def _switch_reconnect_target(self, cause: str) -> None:
        """After a lost connection or failed attempt, point paho's reconnect at the next URL.
        paho offers no public way to change the address of a client that is reconnecting."""
        if len(self._endpoints) > 1 and not self._closing:
            self._switch(cause)
            self._client._host, self._client._port = self._host, self._port

    def _open_socket(self) -> Optional[str]:
        """One TCP (and TLS) connect and the MQTT CONNECT; why it failed, or None."""
        address = f"{self._host}:{self._port}"
        try:
            self._client.connect(self._host, self._port, keepalive=self.spec.keepalive_s)
        except ssl.SSLError as exc:
            raise UserError(f"TLS with the broker at {self.broker_url} failed: {exc}") from None
        except ConnectionRefusedError:
            return f"nothing is listening at {address}"
        except socket.gaierror as exc:
            return f"cannot resolve {self._host!r} ({exc.strerror})"
        except OSError as exc:
            return f"no answer from {address} ({exc.strerror or type(exc).__name__})"
        except ValueError as exc:
            raise UserError(f"cannot reach the broker at {self.broker_url}: {exc}") from None
        return None

    def close(self, final: Optional[Tuple[str, bytes]] = None) -> None:
        """Publish `final` (retained) if given, then disconnect cleanly."""
        if final is not None and self._connected.is_set():
            info = self._client.publish(final[0], final[1], qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2)
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    # ------------------------------------------------------------------ publish

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Queue a QoS 1 publish after the size check; returns the estimated wire bytes."""
        check_publish_size(topic, len(payload), self.spec.max_message_bytes)
        self._client.publish(topic, payload, qos=1, retain=retain)
        wire_bytes = mqtt_publish_wire_bytes(topic, len(payload))
        with self._counter_lock:
            self.counters.bytes_sent += wire_bytes
        return wire_bytes

    def check_message_limit(self, topic: str, payload_bytes: int, setting: str) -> None:
        """Send one message a little larger than `payload_bytes` to ourselves on `topic` and wait
        for it, a few times; UserError naming `setting` if it never comes back.

        Brokers differ in their largest message (NATS: max_payload, Mosquitto:
        message_size_limit) and some drop a bigger publish silently: checked at start, that is
        one line, not a transfer that stalls mid-round."""
        probe = bytes(payload_bytes + PROBE_TOPIC_HEADROOM_BYTES)
        arrived = threading.Event()

        def on_probe(_topic: str, payload: bytes) -> None:
            if len(payload) == len(probe):
                arrived.set()

        entry = (topic.__eq__, on_probe)
        self._handlers.append(entry)
        self._client.subscribe(topic, qos=1)
        started_s = time.monotonic()
        try:
            for _ in range(PROBE_ATTEMPTS):  # the first may race the subscription
                self._client.publish(topic, probe, qos=1)
                if arrived.wait(PROBE_WAIT_S):
                    return
        finally:
            self._client.unsubscribe(topic)
            # a copy of an earlier try may still be on its way: swallowed here, it never
            # reaches the inbox (where it read as a rejected message at every start)
            self._handlers[self._handlers.index(entry)] = (topic.__eq__, lambda *_: None)
        raise UserError(
            f"the broker at {self.broker_url} never delivered a {len(probe)}-byte message "
            f"({PROBE_ATTEMPTS} tries in {time.monotonic() - started_s:.0f} s): its message "
            f"size limit is below {setting}={payload_bytes}; lower {setting} or raise the "
            "broker's limit (docs/BROKERS.md)"
        )

    def wait_published(self, timeout_s: float = 30.0) -> bool:
        """Wait until paho has no outgoing messages left in flight (best effort)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._client._out_messages:  # paho exposes no public in-flight count
                return True
            time.sleep(0.01)
        return False

    def drain(self, handle: Handler, timeout_s: float) -> None:
        """Handle queued messages on the calling thread: waits up to `timeout_s` for the first,
        then handles whatever else is already queued."""
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

    # ------------------------------------------------------------------ callbacks

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            if self.connect_count == 0:
                self._refusal = refusal_text(reason_code, self.spec.username)
                if reason_code.value not in RETRYABLE_REFUSALS:
                    client.disconnect()  # retrying the same credentials cannot succeed
                    self._answered.set()
                    return
            log_event(logger, logging.WARNING, "mqtt.refused", reason=str(reason_code))
            return
        self._refusals.clear()
        for topic in self._subscriptions:
            self._subscribe(topic)
        self.connect_count += 1
        log_event(
            logger, logging.INFO, "mqtt.connected", client_id=self.client_id, broker=self.broker_url
        )
        self._connected.set()
        self._answered.set()
        if self._on_connected is not None:
            self._on_connected()

    def _subscribe(self, topic: str) -> None:
        with self._subscribe_lock:  # its SUBACK may come back before subscribe() returns
            result, mid = self._client.subscribe(topic, qos=1)
            if result == paho.MQTT_ERR_SUCCESS and mid is not None:
                self._subscribing[mid] = topic

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        """A refused subscription is asked for again, then given up with one error line. A
        NATS cluster refuses one when it cannot create the session's consumer in time (load, a
        node that just died); without asking again, that topic would stay silent for good."""
        with self._subscribe_lock:
            topic = self._subscribing.pop(mid, None)
        failed = [code for code in reason_codes if code.is_failure]
        if topic is None or not failed:
            return
        attempt = self._refusals.get(topic, 0) + 1
        self._refusals[topic] = attempt
        if attempt < SUBSCRIBE_ATTEMPTS:
            log_event(
                logger, logging.WARNING, "mqtt.subscribe_refused", topic=topic,
                reason=str(failed[0]), attempt=attempt,
            )  # fmt: skip
            retry = threading.Timer(
                SUBSCRIBE_RETRY_S * 2 ** (attempt - 1), self._resubscribe, (topic,)
            )
            retry.daemon = True
            retry.start()
            return
        self.refused_subscriptions[topic] = str(failed[0])
        log_event(
            logger, logging.ERROR, "mqtt.subscription_refused", topic=topic,
            broker=self.broker_url, reason=str(failed[0]), attempts=attempt,
            hint="the broker's ACL or limits refuse it: nothing on this topic will arrive",
        )  # fmt: skip

    def _resubscribe(self, topic: str) -> None:
        if self._connected.is_set() and not self._closing:
            self._subscribe(topic)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        if self._connected.is_set() and not self._closing:
            log_event(
                logger,
                logging.WARNING,
                "mqtt.disconnected",
                broker=self.broker_url,
                reason=str(reason_code),
            )
        self._switch_reconnect_target(f"connection lost ({reason_code})")
        self._connected.clear()

    def _handle_connect_fail(self, client, userdata) -> None:  # type: ignore[no-untyped-def]
        self._switch_reconnect_target("reconnect failed")

    def _handle_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        topic, payload = message.topic, bytes(message.payload)
        with self._counter_lock:
            self.counters.bytes_received += mqtt_publish_wire_bytes(topic, len(payload))
        for matches, handler in self._handlers:
            if matches(topic):
                try:
                    handler(topic, payload)
                except Exception as exc:  # a handler must never kill paho's network thread
                    log_event(
                        logger, logging.WARNING, "mqtt.handler_failed", topic=topic, error=exc
                    )
                return
        self.inbox.put((topic, payload))
