"""A scripted device: a real protocol participant on the device session the agent uses
(edge/session.py: link, retained hello and status, chunk requests) that says exactly what a
test tells it to, including things a correct edge never would (wrong ids, stale rounds, broken
tensors, corrupt chunks): it answers pulls itself, so it can serve corrupt chunks."""

from __future__ import annotations

import queue
import time
from typing import Dict, Optional, Tuple, Union

import torch

from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.session import DeviceSession
from jetfed.edge.tensor_codec import decode_tensors, encode_tensors
from jetfed.edge.topics import Topics
from jetfed.edge.transfer import Download
from jetfed.edge.wire import (
    Ack,
    BlobManifest,
    ChunkRequest,
    Hello,
    Nack,
    Task,
    Update,
    encode_message,
    make_manifest,
    parse_message,
)

Reply = Union[Ack, Nack]


class ScriptedDevice:
    def __init__(self, broker_url: str, experiment: str, device_id: str) -> None:
        self.topics = Topics(experiment)
        self.experiment = experiment
        self.device_id = device_id
        dev = self.topics.device
        self.session = DeviceSession(
            BrokerSpec(url=broker_url),
            experiment,
            device_id,
            self.hello,
            client_id=f"scripted-{device_id}",
            serve_pulls=False,
            announce_on_connect=False,
        )
        self.link = self.session.link
        self.served: Dict[str, Tuple[BlobManifest, bytes]] = {}
        self._first_serve: Dict[str, bytes] = {}
        pull_topic = dev(device_id, "pull")
        self.link.on_topic(lambda topic: topic == pull_topic, self._serve_pull)
        self.tasks: queue.Queue[Task] = queue.Queue()
        self.replies: queue.Queue[Reply] = queue.Queue()
        self._download: Optional[Download] = None

    # ------------------------------------------------------------------ connection

    def hello(self) -> Hello:
        return Hello(
            device_id=self.device_id,
            jetfed_version="scripted",
            hostname="test",
            machine="x86_64",
            accelerator="cpu",
            memory_total_bytes=1 << 30,
            methods=["lora"],
        )

    def join(self) -> None:
        """Connect, then the retained hello and `online` a real edge sends (`link.connect()`
        alone: a device that never says hello)."""
        self.link.connect()
        self.session.announce()

    def close(self) -> None:
        self.session.close()

    def publish(self, leaf: str, payload: bytes, device_id: Optional[str] = None) -> None:
        self.session.publish(leaf, payload, device_id)

    # ------------------------------------------------------------------ inbound

    def pump(self, timeout_s: float) -> None:
        try:
            topic, payload = self.link.inbox.get(timeout=timeout_s)
        except queue.Empty:
            return
        if topic == self.topics.task:
            if payload:
                self.tasks.put(parse_message(Task, payload))
            return
        _, leaf, rest = self.topics.parse_device_topic(topic)
        if leaf == "down" and self._download is not None:
            if rest[0] == self._download.manifest.digest:
                self._download.add_chunk(int(rest[1]), payload)
        elif leaf == "ack":
            self.replies.put(parse_message(Ack, payload))
        elif leaf == "nack":
            self.replies.put(parse_message(Nack, payload))

    def wait_task(self, timeout_s: float = 120.0) -> Task:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.pump(0.1)
            if not self.tasks.empty():
                return self.tasks.get()
        raise TimeoutError(f"{self.device_id}: no task within {timeout_s} s")

    def wait_reply(self, timeout_s: float = 30.0) -> Reply:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.replies.empty():
                return self.replies.get()
            self.pump(0.1)
        raise TimeoutError(f"{self.device_id}: no ack or nack within {timeout_s} s")

    def no_reply_within(self, timeout_s: float) -> bool:
        try:
            self.wait_reply(timeout_s)
        except TimeoutError:
            return True
        return False

    # ------------------------------------------------------------------ blobs

    def fetch(self, manifest: BlobManifest, timeout_s: float = 60.0) -> Dict[str, torch.Tensor]:
        """Download a coordinator blob through `want` / `down/` exactly as an edge does."""
        request = self.session.requester(manifest.digest)
        download = Download(manifest, request, max_size_bytes=1 << 30, retry_after_s=2.0)
        self._download = download
        download.start()
        deadline = time.monotonic() + timeout_s
        while not download.complete:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.device_id}: global state not fetched")
            self.pump(0.1)
            download.poll()
        self._download = None
        return decode_tensors(download.result())

    def offer(
        self, data: bytes, manifest: Optional[BlobManifest] = None, served: Optional[bytes] = None
    ) -> BlobManifest:
        """Offer `data` announced by `manifest` (default: its true one); `served`, if given, is
        what the first pull gets instead (a corrupt copy), later pulls get `data`."""
        manifest = manifest or make_manifest(data, 1 << 20)
        self.served[manifest.digest] = (manifest, data)
        if served is not None:
            self._first_serve[manifest.digest] = served
        return manifest

    def offer_tensors(self, tensors: Dict[str, torch.Tensor], dtype: str = "fp32") -> BlobManifest:
        return self.offer(encode_tensors(tensors, dtype))

    def _serve_pull(self, topic: str, payload: bytes) -> None:
        request = parse_message(ChunkRequest, payload)
        if request.digest not in self.served:
            return
        manifest, data = self.served[request.digest]
        data = self._first_serve.pop(request.digest, data)
        for index in request.indices:
            start, end = manifest.chunk_range(index)
            chunk_topic = self.topics.chunk(self.device_id, "up", request.digest, index)
            self.link.publish(chunk_topic, data[start:end])

    # ------------------------------------------------------------------ updates

    def update(self, task: Task, blob: BlobManifest, **fields: object) -> Update:
        values: Dict[str, object] = {
            "experiment": self.experiment,
            "device_id": self.device_id,
            "round_index": task.round_index,
            "base_digest": task.global_state.digest,
            "num_samples": 10,
            "local_steps": 1,
            "train_loss": 0.5,
            "blob": blob,
        }
        values.update(fields)
        return Update(**values)  # type: ignore[arg-type]

    def send(self, update: Update, device_id: Optional[str] = None) -> None:
        self.publish("update", encode_message(update), device_id)
