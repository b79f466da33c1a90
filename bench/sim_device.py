"""Thin simulated devices: real protocol participants that do no training.

Each one speaks the wire protocol with the same parts the edge agent uses (its device session,
edge/session.py, `Download`, the `jetfed.edge.wire` messages): retained hello and status, fetch the
task's blobs chunk by chunk with verification, offer a real-size update, answer the coordinator's
pulls, wait for the ack, send its profile records. Everything runs on the link's network thread; one
fleet thread re-sends unacknowledged updates and re-asks stalled downloads. Each device holds three
file descriptors and paho polls them with select(), which fails above descriptor 1024, so large
fleets are split over worker processes (`SimFleetProcesses`).
"""

from __future__ import annotations

import logging
import multiprocessing
import platform
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import jetfed
from jetfed.edge.errors import ProtocolError
from jetfed.edge.logs import log_event
from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.session import DeviceSession
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.edge.topics import Topics
from jetfed.edge.transfer import Download
from jetfed.edge.wire import (
    Ack,
    BlobManifest,
    Hello,
    Nack,
    ProfileBatch,
    Task,
    Update,
    encode_message,
    parse_message,
)

logger = logging.getLogger(__name__)

Meter = Callable[[], Tuple[int, int]]
"""(bytes sent, bytes received) so far on this device's connection, however they are counted."""


@dataclass
class RoundLog:
    """When each step of one round happened on the device (time.monotonic) and the meter then."""

    task_s: float
    meter_at_task: Tuple[int, int]
    download_done_s: Optional[float] = None
    meter_at_download_done: Optional[Tuple[int, int]] = None
    acked_s: Optional[float] = None
    meter_at_ack: Optional[Tuple[int, int]] = None
    update_payload_bytes: int = 0
    update_message_bytes: int = 0
    update_profile_bytes: int = 0
    """Of the Update message, the phase records riding on it."""


@dataclass
class _Round:
    task: Task
    downloads: Dict[str, Download]
    started_unix_s: float
    log: RoundLog
    update: Optional[Update] = None
    last_update_sent_s: float = 0.0


class SimDevice:
    """One simulated device; `update_blob` is the safetensors payload it uploads every round."""

    def __init__(
        self,
        broker_url: str,
        experiment: str,
        device_id: str,
        update_blob: bytes,
        num_samples: int,
        meter: Optional[Meter] = None,
        ack_retry_s: float = 10.0,
    ) -> None:
        self.device_id = device_id
        self.topics = Topics(experiment)
        self.update_blob = update_blob
        self.num_samples = num_samples
        self.ack_retry_s = ack_retry_s
        self.rounds: Dict[int, RoundLog] = {}
        self.nacks: List[Nack] = []
        self._round: Optional[_Round] = None
        self._have_init: Optional[str] = None
        self._lock = threading.RLock()
        self.session = DeviceSession(
            BrokerSpec(url=broker_url),
            experiment,
            device_id,
            self._hello,
            client_id=f"jetfed-sim-{device_id}",
        )
        self.link = self.session.link
        self.meter: Meter = meter or (
            lambda: (self.link.counters.bytes_sent, self.link.counters.bytes_received)
        )
        self.blobs = self.session.blobs
        self.link.on_topic(lambda topic: True, self._handle)  # after the session's pull handler

    def _hello(self) -> Hello:
        return Hello(
            device_id=self.device_id,
            jetfed_version=jetfed.__version__,
            hostname=socket.gethostname(),
            machine=platform.machine(),
            accelerator="cpu",
            memory_total_bytes=0,
            telemetry_backend="none",
            methods=["lora", "federa"],
        )

    def connect(self) -> None:
        self.link.connect()

    def close(self) -> None:
        self.session.close()

    # ------------------------------------------------------------------ network thread

    def _handle(self, topic: str, payload: bytes) -> None:
        with self._lock:
            try:
                if topic == self.topics.task:
                    self._on_task(payload)
                    return
                _, leaf, rest = self.topics.parse_device_topic(topic)
                if leaf == "down" and len(rest) == 2:
                    self._on_chunk(rest[0], int(rest[1]), payload)
                elif leaf == "ack":
                    self._on_ack(parse_message(Ack, payload))
                elif leaf == "nack":
                    self.nacks.append(parse_message(Nack, payload))
            except (ProtocolError, ValueError) as exc:
                log_event(logger, logging.WARNING, "sim.rejected", topic=topic, reason=exc)

    def _on_task(self, payload: bytes) -> None:
        if not payload:
            return
        task = parse_message(Task, payload)
        if task.round_index in self.rounds or self.device_id not in task.selected_devices:
            return
        needed: Dict[str, BlobManifest] = {"global": task.global_state, **task.extra_blobs}
        if task.init_state is not None and self._have_init != task.init_state.digest:
            needed["init"] = task.init_state
        log = RoundLog(task_s=time.monotonic(), meter_at_task=self.meter())
        self.rounds[task.round_index] = log
        downloads = {
            manifest.digest: Download(manifest, self.session.requester(manifest.digest), 8 << 30)
            for manifest in needed.values()
        }
        self._round = _Round(task, downloads, time.time(), log)
        if task.init_state is not None:
            self._have_init = task.init_state.digest
        for download in downloads.values():
            download.start()

    def _on_chunk(self, digest: str, index: int, payload: bytes) -> None:
        current = self._round
        if current is None or digest not in current.downloads or current.update is not None:
            return
        current.downloads[digest].add_chunk(index, payload)
        if all(d.complete for d in current.downloads.values()):
            for download in current.downloads.values():
                download.result()
            current.log.download_done_s = time.monotonic()
            current.log.meter_at_download_done = self.meter()
            self._offer_update(current)

    def _records(
        self, current: _Round, phases: List[Tuple[str, float, float]]
    ) -> List[PhaseRecord]:
        task = current.task
        return [
            PhaseRecord(
                experiment=task.experiment,
                device_id=self.device_id,
                round_index=task.round_index,
                phase=phase,
                method=task.method,
                start_unix_s=start,
                end_unix_s=end,
                duration_s=end - start,
                backend="none",
            )
            for phase, start, end in phases
        ]

    def _offer_update(self, current: _Round) -> None:
        manifest = self.blobs.offer(self.update_blob, current.task.chunk_size_bytes)
        now = time.time()
        started = current.started_unix_s
        current.update = Update(
            experiment=current.task.experiment,
            device_id=self.device_id,
            round_index=current.task.round_index,
            base_digest=current.task.global_state.digest,
            num_samples=self.num_samples,
            local_steps=0,
            train_loss=0.5,
            blob=manifest,
            profile=self._records(
                current, [("download", started, now), ("setup", now, now), ("train", now, now)]
            ),
        )
        log = current.log
        log.update_payload_bytes = len(self.update_blob)
        log.update_message_bytes = len(encode_message(current.update))
        bare = current.update.model_copy(update={"profile": []})
        log.update_profile_bytes = log.update_message_bytes - len(encode_message(bare))
        self._send_update(current)

    def _send_update(self, current: _Round) -> None:
        assert current.update is not None
        current.last_update_sent_s = time.monotonic()
        self.link.publish(
            self.topics.device(self.device_id, "update"), encode_message(current.update)
        )

    def _on_ack(self, ack: Ack) -> None:
        current = self._round
        if current is None or ack.round_index != current.task.round_index:
            return
        current.log.acked_s = time.monotonic()
        current.log.meter_at_ack = self.meter()
        self._round = None
        upload_start = current.started_unix_s
        batch = ProfileBatch(
            device_id=self.device_id,
            round_index=ack.round_index,
            records=self._records(current, [("upload", upload_start, time.time())]),
        )
        self.link.publish(self.topics.device(self.device_id, "profile"), encode_message(batch))

    # ------------------------------------------------------------------ fleet thread

    def poll(self) -> None:
        """Re-ask stalled downloads and re-send an unacknowledged update (as the agent does)."""
        with self._lock:
            current = self._round
            if current is None:
                return
            try:
                for download in current.downloads.values():
                    download.poll()
            except Exception as exc:  # a timed-out download ends this device's round
                log_event(logger, logging.WARNING, "sim.download_failed", reason=exc)
                self._round = None
                return
            waited_s = time.monotonic() - current.last_update_sent_s
            if current.update is not None and waited_s > self.ack_retry_s:
                self._send_update(current)


@dataclass
class SimFleet:
    """Many simulated devices plus the thread that polls them."""

    devices: List[SimDevice] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self, connect_batch: int = 25) -> None:
        for index, device in enumerate(self.devices):
            device.connect()
            if index % connect_batch == connect_batch - 1:
                time.sleep(0.05)
        threading.Thread(target=self._poll_loop, daemon=True).start()

    def _poll_loop(self) -> None:
        while not self._stop.wait(0.5):
            for device in self.devices:
                device.poll()

    def acked_rounds(self) -> int:
        """Rounds every device has been acknowledged for."""
        return min(
            (sum(1 for r in d.rounds.values() if r.acked_s) for d in self.devices), default=0
        )

    def failed(self) -> Optional[str]:
        """The first refusal any device received (a broken run: the bench gives up early)."""
        for device in self.devices:
            if device.nacks:
                return (
                    f"{device.device_id} got nack {device.nacks[0].code}: {device.nacks[0].reason}"
                )
        return None

    def close(self) -> None:
        self._stop.set()
        for device in self.devices:
            device.close()


DEVICES_PER_PROCESS = 120


def _fleet_worker(
    broker_urls: List[str],
    experiment: str,
    device_ids: List[str],
    blobs: List[bytes],
    num_samples: List[int],
    pipe: Any,
) -> None:
    """Worker process: run a SimFleet until told to stop; report nacks early, logs at the end."""
    logging.basicConfig(level=logging.WARNING)
    fleet = SimFleet(
        [
            SimDevice(url, experiment, device_id, blob, samples)
            for url, device_id, blob, samples in zip(broker_urls, device_ids, blobs, num_samples)
        ]
    )
    fleet.start()
    pipe.send(("ready", None))
    reported = False
    while not pipe.poll(0.5):
        nacked = [d for d in fleet.devices if d.nacks]
        if nacked and not reported:
            nack = nacked[0].nacks[0]
            pipe.send(("nack", f"{nacked[0].device_id} got nack {nack.code}: {nack.reason}"))
            reported = True
    pipe.recv()
    fleet.close()
    logs = {d.device_id: {r: asdict(log) for r, log in d.rounds.items()} for d in fleet.devices}
    pipe.send(("logs", logs))


class SimFleetProcesses:
    """Simulated devices spread over worker processes (≤ DEVICES_PER_PROCESS each)."""

    def __init__(
        self,
        broker_url: str,
        experiment: str,
        device_ids: List[str],
        blobs: List[bytes],
        num_samples: List[int],
        device_urls: Optional[List[str]] = None,
    ) -> None:
        """`device_urls`: each device's own broker URL (a failover list through a cluster's
        nodes); default `broker_url` for all."""
        urls = device_urls or [broker_url] * len(device_ids)
        context = multiprocessing.get_context("spawn")
        self._workers: List[Tuple[Any, Any]] = []
        for start in range(0, len(device_ids), DEVICES_PER_PROCESS):
            parent, child = context.Pipe()
            end = start + DEVICES_PER_PROCESS
            process = context.Process(
                target=_fleet_worker,
                args=(
                    urls[start:end],
                    experiment,
                    device_ids[start:end],
                    blobs[start:end],
                    num_samples[start:end],
                    child,
                ),
                daemon=True,
            )
            self._workers.append((process, parent))
        self.nack: Optional[str] = None
        self.rounds: Dict[str, Dict[int, RoundLog]] = {}

    def start(self, timeout_s: float = 120.0) -> None:
        for process, _ in self._workers:
            process.start()
        for _, pipe in self._workers:
            if not pipe.poll(timeout_s):
                raise RuntimeError("a simulated-device worker did not connect its devices")
            pipe.recv()

    def failed(self) -> Optional[str]:
        """The first nack any device got (polled by the bench while the coordinator runs)."""
        for _, pipe in self._workers:
            if self.nack is None and pipe.poll():
                self.nack = pipe.recv()[1]
        return self.nack

    def close(self) -> None:
        for _, pipe in self._workers:
            pipe.send("stop")
        for process, pipe in self._workers:
            while pipe.poll(30):
                kind, payload = pipe.recv()
                if kind == "logs":
                    for device_id, rounds in payload.items():
                        self.rounds[device_id] = {r: RoundLog(**log) for r, log in rounds.items()}
                    break
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
