"""One device's side of the wire, shared by the edge agent, the simulated devices of the
benches (bench/sim_device.py) and the scripted device of the tests (tests/scripted_device.py):
the link with the device's subscriptions and last will, the retained hello and `online` on
every (re)connect, chunk requests for the blobs it fetches, and serving the chunks of the blobs
it offers. What a device does with a task stays with each of them.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

from jetfed.edge.errors import ProtocolError
from jetfed.edge.logs import log_event
from jetfed.edge.memlink import Link, open_link
from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.topics import Topics
from jetfed.edge.transfer import BlobServer
from jetfed.edge.wire import ChunkRequest, Hello, encode_message, parse_message

logger = logging.getLogger(__name__)

DEVICE_LEAVES = ("down/#", "pull", "ack", "nack")
"""What every device subscribes to on its own topics (besides the experiment's task)."""


class DeviceSession:
    """`hello()` is asked on every (re)connect (what a device says about itself may change)."""

    def __init__(
        self,
        broker: BrokerSpec,
        experiment: str,
        device_id: str,
        hello: Callable[[], Hello],
        client_id: str,
        extra_subscriptions: Sequence[str] = (),
        serve_pulls: bool = True,
        background: bool = False,
        announce_on_connect: bool = True,
    ) -> None:
        """`serve_pulls=False`: the owner answers `pull` itself, and `announce_on_connect=False`:
        it calls `announce` when it chooses (a scripted device that misbehaves or stays silent);
        `background`: chunks are published from a worker thread (BlobServer) where the link
        runs handlers on its network thread (`serve_in_background`)."""
        self.topics = Topics(experiment)
        self.device_id = device_id
        self._hello = hello
        dev = self.topics.device
        self.link: Link = open_link(
            broker,
            client_id=client_id,
            subscriptions=[
                self.topics.task,
                *(dev(device_id, leaf) for leaf in DEVICE_LEAVES),
                *extra_subscriptions,
            ],
            will=(dev(device_id, "status"), b"offline"),
            on_connected=self.announce if announce_on_connect else None,
        )
        self.blobs = BlobServer(
            self.publish_raw,
            chunk_size_bytes=1 << 20,
            background=background and self.link.serve_in_background,
        )
        if serve_pulls:
            pull_topic = dev(device_id, "pull")
            self.link.on_topic(lambda topic: topic == pull_topic, self.serve_pull)

    def publish_raw(self, topic: str, payload: bytes) -> None:
        self.link.publish(topic, payload)

    def publish(self, leaf: str, payload: bytes, device_id: Optional[str] = None) -> int:
        """On this device's `leaf` (or, to script a forgery, another device's)."""
        return self.link.publish(self.topics.device(device_id or self.device_id, leaf), payload)

    def announce(self) -> None:
        """On every (re)connect: retained hello and `online`, so a coordinator that (re)starts
        later still learns about this device the moment it subscribes."""
        dev = self.topics.device
        self.link.publish(dev(self.device_id, "hello"), encode_message(self._hello()), retain=True)
        self.link.publish(dev(self.device_id, "status"), b"online", retain=True)

    def close(self) -> None:
        self.link.close(final=(self.topics.device(self.device_id, "status"), b"offline"))

    def requester(self, digest: str) -> Callable[[List[int]], None]:
        """What a `Download` of blob `digest` calls to ask the coordinator for chunks."""
        want = self.topics.device(self.device_id, "want")

        def request(indices: List[int]) -> None:
            message = ChunkRequest(device_id=self.device_id, digest=digest, indices=list(indices))
            self.link.publish(want, encode_message(message))

        return request

    def serve_pull(self, topic: str, payload: bytes) -> None:
        """Network thread: the coordinator asks for chunks of one of our offered blobs."""
        try:
            request = parse_message(ChunkRequest, payload)
            self.blobs.serve(
                request.digest,
                request.indices,
                lambda digest, index: self.topics.chunk(self.device_id, "up", digest, index),
            )
        except ProtocolError as exc:
            log_event(logger, logging.WARNING, "pull.rejected", reason=exc)
