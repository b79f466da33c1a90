"""Chunked transfers through a real Mosquitto: a 91 MB MiniLM full-model delta survives a dropped
client and a broker restart (only the missing chunks travel again), a corrupted chunk is fetched
again, a manifest that lies about its size is refused, chunks a broker drops for their size end
in one line naming the limit, and several devices' uploads interleave."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import paho.mqtt.client as paho
import pytest
import torch
from paho.mqtt.enums import CallbackAPIVersion

from jetfed.edge.errors import ProtocolError
from jetfed.edge.mqtt import BrokerSpec, MqttLink
from jetfed.edge.spool import pooled
from jetfed.edge.tensorfile import TensorFile
from jetfed.edge.topics import Topics
from jetfed.edge.transfer import BlobServer, Download, TransferTimeout
from jetfed.edge.wire import BlobManifest, ChunkRequest, encode_message, parse_message
from tests.brokers import MosquittoBroker, free_port

TOPICS = Topics("xfer")
RECEIVER_ID = "jetfed-test-receiver"
WINDOW_BYTES = 8 << 20
CHUNK_BYTES = 1 << 20


class Sender:
    """A device's side: a BlobServer answering `pull` requests in the background, as the agent."""

    def __init__(self, url: str, device_id: str, corrupt: Optional[Callable[[str], bool]] = None):
        self.device_id = device_id
        self.link = MqttLink(
            BrokerSpec(url=url),
            client_id=f"jetfed-test-{device_id}",
            subscriptions=[TOPICS.device(device_id, "pull")],
        )
        self._corrupt = corrupt
        self.blobs = BlobServer(self._publish, CHUNK_BYTES, background=True)
        pull = TOPICS.device(device_id, "pull")
        self.link.on_topic(lambda topic: topic == pull, self._serve)
        self.link.connect()

    def _publish(self, topic: str, payload: bytes) -> None:
        if self._corrupt is not None and self._corrupt(topic):
            payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        self.link.publish(topic, payload)

    def _serve(self, topic: str, payload: bytes) -> None:
        request = parse_message(ChunkRequest, payload)
        self.blobs.serve(
            request.digest,
            request.indices,
            lambda digest, index: TOPICS.chunk(self.device_id, "up", digest, index),
        )


class Receiver:
    """The coordinator's side: pulls chunks into Downloads and drains its inbox, as the server."""

    def __init__(self, url: str) -> None:
        self.link = MqttLink(
            BrokerSpec(url=url), client_id=RECEIVER_ID, subscriptions=[TOPICS.all_devices("up/#")]
        )
        self.link.connect()
        self.rejections: List[str] = []

    def download(self, device_id: str, manifest: BlobManifest, **options: float) -> Download:
        pull = TOPICS.device(device_id, "pull")

        def request(indices: List[int]) -> None:
            message = ChunkRequest(device_id=device_id, digest=manifest.digest, indices=indices)
            self.link.publish(pull, encode_message(message))

        return Download(
            manifest,
            request,
            max_size_bytes=1 << 30,
            retry_after_s=float(options.get("retry_after_s", 1.0)),
            timeout_s=float(options.get("timeout_s", 60.0)),
            window_bytes=WINDOW_BYTES,
        )

    def run(
        self,
        downloads: Dict[str, Download],
        on_chunk: Callable[[Download], None] = lambda download: None,
        limit_s: float = 180.0,
    ) -> None:
        """Start the downloads (device id → download) and drive them to completion."""
        for download in downloads.values():
            download.start()
        deadline = time.monotonic() + limit_s
        while not all(d.complete for d in downloads.values()):
            assert time.monotonic() < deadline, "transfer did not finish"
            try:
                topic, payload = self.link.inbox.get(timeout=0.2)
            except queue.Empty:
                topic = ""
            if topic:
                device_id, _, rest = TOPICS.parse_device_topic(topic)
                download = downloads[device_id]
                try:
                    download.add_chunk(int(rest[1]), payload)
                except ProtocolError as exc:
                    self.rejections.append(str(exc))
                on_chunk(download)
            for download in downloads.values():
                download.poll()


@pytest.fixture(scope="module")
def minilm_delta(minilm_path: str) -> Dict[str, torch.Tensor]:
    """A full-model delta with MiniLM's real names and shapes (~91 MB in fp32)."""
    from jetfed.edge.methods.base import get_method
    from jetfed.edge.wire import ModelRef

    method = get_method("full")({}, ModelRef(name_or_path=minilm_path, num_labels=2))
    generator = torch.Generator().manual_seed(0)
    state = method.get_state(method.build(None, seed=0))
    return {n: torch.randn(t.shape, generator=generator) * 1e-3 for n, t in state.items()}


@pytest.fixture
def pair(mosquitto: MosquittoBroker) -> Iterator[tuple]:
    sender, receiver = Sender(mosquitto.url, "dev-0"), Receiver(mosquitto.url)
    yield sender, receiver
    sender.link.close()
    receiver.link.close()


def drop_client(broker: MosquittoBroker, client_id: str) -> None:
    """The broker drops a connected client when another connects with its id (a takeover)."""
    impostor = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
    impostor.connect(broker.host, broker.port)
    impostor.loop_start()
    time.sleep(0.3)
    impostor.disconnect()
    impostor.loop_stop()


def assert_exact(download: Download, delta: Dict[str, torch.Tensor]) -> None:
    received = TensorFile(download.payload(), {n: tuple(t.shape) for n, t in delta.items()})
    for name, tensor in delta.items():
        assert torch.equal(received[name], tensor), name


@pytest.mark.parametrize("cut", ["client_dropped", "broker_restarted"])
def test_91mb_delta_resumes_after_a_cut_and_resends_only_missing_chunks(
    cut: str, pair: tuple, mosquitto: MosquittoBroker, minilm_delta: Dict[str, torch.Tensor]
) -> None:
    sender, receiver = pair
    manifest = sender.blobs.offer_tensors(minilm_delta)
    assert manifest.size_bytes > 90_000_000 and manifest.chunk_count > 80
    download = receiver.download("dev-0", manifest)
    connects_before = receiver.link.connect_count
    cut_done: List[int] = []

    def cut_once(d: Download) -> None:
        received = d.manifest.chunk_count - len(d.missing())
        if not cut_done and received >= d.manifest.chunk_count // 3:
            cut_done.append(received)
            if cut == "client_dropped":
                drop_client(mosquitto, RECEIVER_ID)
            else:
                mosquitto.restart()

    receiver.run({"dev-0": download}, on_chunk=cut_once)
    assert cut_done, "the cut never happened"
    assert receiver.link.connect_count > connects_before, "the receiver never reconnected"
    assert download.requests_sent > 1
    window_chunks = WINDOW_BYTES // CHUNK_BYTES
    # only what was in flight at the cut travels again: at most one window of extra chunks
    assert (
        manifest.chunk_count <= sender.blobs.chunks_served <= manifest.chunk_count + window_chunks
    )
    assert download.chunks_requested <= manifest.chunk_count + window_chunks
    assert_exact(download, minilm_delta)
    download.close()
    assert not Path(download.path).exists() or pooled(download.path)  # kept for reuse only


def test_corrupted_chunk_is_rejected_and_fetched_again(mosquitto: MosquittoBroker) -> None:
    corrupted: List[str] = []

    def corrupt_first_copy_of_chunk_3(topic: str) -> bool:
        if topic.endswith("/3") and not corrupted:
            corrupted.append(topic)
            return True
        return False

    sender = Sender(mosquitto.url, "dev-0", corrupt=corrupt_first_copy_of_chunk_3)
    receiver = Receiver(mosquitto.url)
    try:
        tensors = {"w": torch.arange(6 * CHUNK_BYTES // 4, dtype=torch.float32).reshape(-1, 64)}
        manifest = sender.blobs.offer_tensors(tensors)
        download = receiver.download("dev-0", manifest)
        receiver.run({"dev-0": download}, limit_s=60)
        assert corrupted and receiver.rejections == ["chunk 3 digest mismatch"]
        assert download.rejected_chunks == 1
        assert sender.blobs.chunks_served == manifest.chunk_count + 1
        assert_exact(download, tensors)
    finally:
        sender.link.close()
        receiver.link.close()


def test_manifest_that_lies_about_its_size_is_refused(pair: tuple) -> None:
    sender, receiver = pair
    manifest = sender.blobs.offer_tensors({"w": torch.ones(3 * CHUNK_BYTES // 4 + 100)})
    # claims 64 bytes less in the last chunk (chunk count unchanged, so the schema accepts it)
    lying = BlobManifest(**{**manifest.model_dump(), "size_bytes": manifest.size_bytes - 64})
    download = receiver.download("dev-0", lying, retry_after_s=0.3, timeout_s=2.0)
    with pytest.raises(TransferTimeout, match="1 of 4 chunks missing"):
        receiver.run({"dev-0": download}, limit_s=30)
    assert any("expected" in reason for reason in receiver.rejections)
    # and a claim larger than the receiver accepts is refused before anything is asked for
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        Download(manifest, lambda indices: None, max_size_bytes=manifest.size_bytes - 1)


def test_broker_dropping_over_limit_chunks_is_one_error_naming_the_limit(
    mosquitto_factory: Callable[..., MosquittoBroker],
) -> None:
    """Mosquitto's message_size_limit drops a bigger QoS 1 publish silently (PUBACK, no
    delivery): the chunks are asked for again a bounded number of times, then one line says so."""
    port = free_port()
    broker = mosquitto_factory(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmessage_size_limit 100000", port=port
    )
    sender, receiver = Sender(broker.url, "dev-0"), Receiver(broker.url)
    try:
        manifest = sender.blobs.offer(bytes(3 * CHUNK_BYTES))
        download = receiver.download("dev-0", manifest, retry_after_s=0.3, timeout_s=1.5)
        with pytest.raises(TransferTimeout) as stalled:
            receiver.run({"dev-0": download}, limit_s=30)
    finally:
        sender.link.close()
        receiver.link.close()
    assert sender.blobs.chunks_served >= 3  # served, and dropped by the broker
    line = str(stalled.value)
    assert "\n" not in line
    assert f"drops messages of {CHUNK_BYTES} bytes" in line
    assert "message_size_limit" in line and "transfer.chunk_size_bytes" in line
    assert 2 <= download.retries_without_progress <= 1.5 / 0.3 + 1
    assert download.requests_sent == 1 + download.retries_without_progress
    download.close()


def test_many_devices_interleave(mosquitto: MosquittoBroker) -> None:
    senders = [Sender(mosquitto.url, f"dev-{i}") for i in range(3)]
    receiver = Receiver(mosquitto.url)
    try:
        payloads = {
            s.device_id: {"w": torch.full((12 * CHUNK_BYTES // 4 // 32, 32), float(i))}
            for i, s in enumerate(senders)
        }
        manifests = {s.device_id: s.blobs.offer_tensors(payloads[s.device_id]) for s in senders}
        downloads = {d: receiver.download(d, manifest) for d, manifest in manifests.items()}
        arrivals: List[str] = []
        first_done: List[int] = []

        def note(download: Download) -> None:
            arrivals.append(download.manifest.digest)
            if download.complete and not first_done:
                first_done.append(len(arrivals))

        receiver.run(downloads, on_chunk=note)
        for device_id, download in downloads.items():
            assert_exact(download, payloads[device_id])
        # every device's chunks were flowing before the first transfer finished
        assert len(set(arrivals[: first_done[0]])) == 3, "transfers ran one after another"
    finally:
        for sender in senders:
            sender.link.close()
        receiver.link.close()
