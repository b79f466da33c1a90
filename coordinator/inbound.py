"""Everything devices send, validated before it touches the run: chunk requests (served on
paho's thread), statuses, hellos, profile records, progress, update announcements and their
chunks, with the acks and nacks that answer them.

`Intake` owns the state those checks (coordinator/inbound_checks.py) need (the round being
collected, the records and updates already accepted) and nothing else: the round loop
(coordinator/server.py) opens a round, pumps messages into `dispatch` and reads what was
accepted. A bad message is logged once and answered with a nack on the device's nack topic; it
never changes accepted state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from jetfed.coordinator.config import ExperimentConfig
from jetfed.coordinator.inbound_checks import (
    check_joined,
    check_profile_records,
    check_sender,
    checked_update_tensors,
    profile_key,
)
from jetfed.coordinator.observer import RunObserver, notify
from jetfed.coordinator.registry import DeviceRegistry
from jetfed.coordinator.rundir import RunDir
from jetfed.coordinator.strategies.base import AcceptedUpdate
from jetfed.edge.errors import ProtocolError
from jetfed.edge.heap import release_freed_memory
from jetfed.edge.logs import log_event
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.edge.tensorfile import TensorFile, refuse_index_tensors
from jetfed.edge.topics import Topics, parse_chunk_index
from jetfed.edge.transfer import (
    BlobServer,
    Download,
    SharedWindow,
    TransferTimeout,
)
from jetfed.edge.wire import (
    LIVE_TELEMETRY_MAX_BYTES,
    Ack,
    ChunkRequest,
    Hello,
    LiveTelemetry,
    Nack,
    ProfileBatch,
    Progress,
    RoundFailure,
    Task,
    Update,
    encode_message,
    message_digest,
    mqtt_publish_wire_bytes,
    parse_message,
)

logger = logging.getLogger(__name__)

MAX_REJECTED_CHUNKS = 16
"""A device whose chunks keep failing their checks is refused, not re-asked forever."""

Publish = Callable[[str, bytes], object]


@dataclass
class RoundIntake:
    """Transfers and results of the round in progress."""

    round_index: int
    task: Task
    transfers: Dict[str, Download] = field(default_factory=dict)
    announced: Dict[str, Tuple[Update, str]] = field(default_factory=dict)
    """Per device: the update being pulled and its message digest (what a nack names)."""
    accepted: Dict[str, AcceptedUpdate] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)
    """Per device that reported it could not do the round: its reason (nothing to wait for)."""
    last_accept_s: Optional[float] = None
    collecting: bool = True
    """False once the round stopped collecting: a late update is refused, never acked."""
    spooled: List[Download] = field(default_factory=list)
    """Accepted uploads, read by the strategy's `aggregate`: deleted when the round ends."""
    specs: Dict[str, Dict[str, Tuple[int, ...]]] = field(default_factory=dict)
    """Per device assigned another LoRA rank: the names and shapes its update must have."""


class Intake:
    """Validates and answers what devices send; see the module docstring."""

    def __init__(
        self,
        config: ExperimentConfig,
        topics: Topics,
        registry: DeviceRegistry,
        run_dir: RunDir,
        blobs: BlobServer,
        expected: Dict[str, Tuple[int, ...]],
        publish: Publish,
        publish_raw: Callable[[str, bytes], None],
        on_exchange: Callable[[str, str, bytes], None],
        tell_progress: Callable[[Progress], None],
        start_round: int,
        observers: Sequence[RunObserver] = (),
        check_update: Callable[[TensorFile], None] = refuse_index_tensors,
    ) -> None:
        """`publish` sends answers (acks, nacks); `publish_raw` sends chunk requests (counted
        as round traffic); `tell_progress` hears validated progress of selected devices;
        the run's `observers` (display only) hear what was accepted; `check_update` (the
        strategy's) refuses an upload whose values its names and shapes cannot rule out."""
        self.config = config
        self.topics = topics
        self.registry = registry
        self.run_dir = run_dir
        self.blobs = blobs
        self.expected = expected
        self._publish = publish
        self._publish_raw = publish_raw
        self._on_exchange = on_exchange
        self._tell_progress = tell_progress
        self._observers = observers
        self._check_update = check_update
        self.start_round = start_round
        self.round: Optional[RoundIntake] = None
        self.bytes_up = 0
        """MQTT bytes devices sent since the counter was last reset (per round)."""
        self.messages_handled = 0
        self._window = SharedWindow()
        """Uploads pulled at once share one in-flight budget (memory stays flat in devices)."""
        self._profile_keys = {profile_key(r) for r in run_dir.read_profiles()}
        self.round_records: Dict[int, List[PhaseRecord]] = {}
        self._accepted_blobs: Dict[Tuple[str, int], str] = {}
        """(device, round) → blob digest of every update accepted by this process: an identical
        re-send is re-acked even after its round closed (its ack may have been lost)."""

    def open_round(
        self, task: Task, specs: Optional[Dict[str, Dict[str, Tuple[int, ...]]]] = None
    ) -> None:
        """Collect `task`'s updates; `specs` (device → spec) replaces the run's update spec for
        devices that train at another rank."""
        self.round = RoundIntake(task.round_index, task, specs=dict(specs or {}))

    def close_round(self) -> List[AcceptedUpdate]:
        """Stop collecting; the accepted updates, sorted by device id."""
        inbound = self.round
        assert inbound is not None
        inbound.collecting = False
        for download in inbound.transfers.values():  # unfinished: their window shares go back
            download.close()
        inbound.transfers.clear()
        release_freed_memory()  # before the strategy allocates the next global state
        return [inbound.accepted[d] for d in sorted(inbound.accepted)]

    def release_round(self) -> None:
        """Delete the round's spooled uploads (once aggregated)."""
        if self.round is not None:
            for download in self.round.spooled:
                download.close()

    def is_want(self, topic: str) -> bool:
        return topic.startswith(f"{self.topics.root}/devices/") and topic.endswith("/want")

    def serve_want(self, topic: str, payload: bytes) -> None:
        parsed = self._parse_topic(topic)
        if parsed is None:
            return
        device_id = parsed[0]
        try:
            request = parse_message(ChunkRequest, payload)
            check_sender(device_id, request.device_id)
            self.blobs.serve(
                request.digest,
                request.indices,
                lambda digest, index: self.topics.chunk(device_id, "down", digest, index),
            )
        except ProtocolError as exc:
            self._reject(device_id, None, exc.code or "bad_request", str(exc))

    def dispatch(self, topic: str, payload: bytes) -> None:
        """Route one inbound message; nothing a device sends can raise out of here."""
        parsed = self._parse_topic(topic)
        if parsed is None:
            return
        device_id, leaf, rest = parsed
        self.messages_handled += 1
        self.bytes_up += mqtt_publish_wire_bytes(topic, len(payload))
        try:
            if leaf == "status":
                self._on_status(device_id, payload)
            elif leaf == "hello":
                self._on_hello(device_id, payload)
            elif leaf == "update":
                self._on_update(device_id, payload)
            elif leaf == "up" and len(rest) == 2:
                self._on_chunk(device_id, rest[0], rest[1], payload)
            elif leaf == "profile":
                self._on_profile(device_id, payload)
            elif leaf == "progress":
                self._on_progress(device_id, payload)
            elif leaf == "failed":
                self._on_failed(device_id, payload)
            elif leaf == "telemetry":
                self._on_telemetry(device_id, payload)
            elif leaf == "exchange" and len(rest) >= 2 and rest[0] == "up":
                self._on_exchange(device_id, "/".join(rest[1:]), payload)
        except ProtocolError as exc:
            round_index = self.round.round_index if self.round else None
            code = exc.code or "invalid_" + leaf.replace("/", "_")
            self._reject(device_id, round_index, code, str(exc))
        except Exception as exc:  # a message must never kill the coordinator
            logger.exception("message.crashed topic=%s", topic)
            self._reject(device_id, None, "internal_error", type(exc).__name__)

    def poll_transfers(self) -> None:
        """Re-ask missing chunks; a transfer past its timeout is refused with a nack."""
        inbound = self.round
        if inbound is None:
            return
        for device_id, download in list(inbound.transfers.items()):
            try:
                download.poll()
            except TransferTimeout as exc:
                del inbound.transfers[device_id]
                download.close()
                _, message = inbound.announced[device_id]
                self._reject(device_id, inbound.round_index, "transfer_timeout", str(exc), message)

    def _notify(self, tell: Callable[[RunObserver], None]) -> None:
        notify(self._observers, tell)

    def _parse_topic(self, topic: str) -> Optional[Tuple[str, str, List[str]]]:
        """(device id, leaf, rest), or None after one log line (no device to nack)."""
        try:
            return self.topics.parse_device_topic(topic)
        except ProtocolError as exc:
            log_event(logger, logging.WARNING, "message.rejected", topic=topic, reason=exc)
            return None

    def _reject(
        self,
        device_id: str,
        round_index: Optional[int],
        code: str,
        reason: str,
        digest: Optional[str] = None,
    ) -> None:
        """One log line and a nack; `round_index` + `digest` name a refused update message."""
        log_event(
            logger,
            logging.WARNING,
            "message.rejected",
            device_id=device_id,
            code=code,
            reason=reason,
        )
        nack = Nack(
            device_id=device_id, round_index=round_index, digest=digest, code=code, reason=reason
        )
        self._publish(self.topics.device(device_id, "nack"), encode_message(nack))

    def _on_status(self, device_id: str, payload: bytes) -> None:
        """`online`/`offline`; empty is a cleared retained status (offline)."""
        if payload not in (b"online", b"offline", b""):
            raise ProtocolError(f"status {payload[:32]!r} is not online or offline")
        self.registry.on_status(device_id, payload == b"online")
        record = self.registry.devices[device_id]
        self._notify(lambda observer: observer.on_device(record))

    def _on_hello(self, device_id: str, payload: bytes) -> None:
        hello = parse_message(Hello, payload)
        check_sender(device_id, hello.device_id)
        self.registry.on_hello(hello)
        self.run_dir.append_device(hello)
        record = self.registry.devices[device_id]
        self._notify(lambda observer: observer.on_device(record))
        log_event(
            logger, logging.INFO, "device.hello", device_id=device_id, accelerator=hello.accelerator
        )

    def _on_profile(self, device_id: str, payload: bytes) -> None:
        batch = parse_message(ProfileBatch, payload)
        check_sender(device_id, batch.device_id)
        self._store_profiles(device_id, batch.records)

    def _on_progress(self, device_id: str, payload: bytes) -> None:
        """Display only: a report of a device selected for the round in progress."""
        progress = parse_message(Progress, payload)
        check_sender(device_id, progress.device_id)
        inbound = self.round
        if (
            inbound is not None
            and inbound.collecting
            and progress.round_index == inbound.round_index
            and device_id in inbound.task.selected_devices
        ):
            self._tell_progress(progress)
        if inbound is not None and progress.round_index == inbound.round_index:
            self._notify(lambda observer: observer.on_progress(progress))

    def _on_failed(self, device_id: str, payload: bytes) -> None:
        """A selected device that could not do the round in progress is no longer waited for;
        its reason is the user's one line (a max_length too small, a missing dataset...)."""
        failure = parse_message(RoundFailure, payload)
        check_sender(device_id, failure.device_id)
        inbound = self.round
        if (
            inbound is None
            or not inbound.collecting
            or failure.round_index != inbound.round_index
            or device_id not in inbound.task.selected_devices
            or device_id in inbound.accepted
        ):
            log_event(
                logger,
                logging.INFO,
                "device.round_failed.ignored",
                device_id=device_id,
                round_index=failure.round_index,
                reason="not a selected device's round in progress",
            )
            return
        inbound.failed[device_id] = failure.reason
        log_event(
            logger,
            logging.WARNING,
            "device.round_failed",
            device_id=device_id,
            round_index=failure.round_index,
            reason=failure.reason,
        )

    def _on_telemetry(self, device_id: str, payload: bytes) -> None:
        """Display only, and only while someone watches."""
        if not any(observer.wants_telemetry for observer in self._observers):
            return
        telemetry = parse_message(LiveTelemetry, payload, LIVE_TELEMETRY_MAX_BYTES)
        check_sender(device_id, telemetry.device_id)
        check_joined(device_id, self.registry.joined, self.config.name, "live telemetry")
        self._notify(lambda observer: observer.on_telemetry(telemetry))

    def _store_profiles(self, device_id: str, records: List[PhaseRecord]) -> None:
        """Append records not seen before (devices re-send until an update carries them)."""
        check_profile_records(
            device_id,
            records,
            experiment=self.config.name,
            joined=self.registry.joined,
            latest_round=self.round.round_index if self.round else self.start_round,
        )
        fresh = [r for r in records if profile_key(r) not in self._profile_keys]
        self._profile_keys.update(profile_key(r) for r in fresh)
        for record in fresh:
            self.round_records.setdefault(record.round_index, []).append(record)
        self.run_dir.append_profiles(fresh)

    def _on_update(self, device_id: str, payload: bytes) -> None:
        """Every refusal names the update (its round and message digest), so only the device
        that sent exactly these bytes abandons it."""
        digest = message_digest(payload)
        try:
            update = parse_message(Update, payload)
        except ProtocolError as exc:  # its round is unknown: name the round being collected
            collecting = self.round.round_index if self.round else None
            self._reject(device_id, collecting, "invalid_update", str(exc), digest)
            return
        try:
            self._admit_update(device_id, update, digest)
        except ProtocolError as exc:
            code = exc.code or "invalid_update"
            self._reject(device_id, update.round_index, code, str(exc), digest)

    def _admit_update(self, device_id: str, update: Update, digest: str) -> None:
        inbound = self.round
        check_sender(device_id, update.device_id)
        if update.experiment != self.config.name:
            raise ProtocolError(f"update for experiment {update.experiment!r}", "wrong_experiment")
        if self._accepted_blobs.get((device_id, update.round_index)) == update.blob.digest:
            self._ack(device_id, update)  # a re-send (or a replay) of an accepted update
            return
        if inbound is None or update.round_index != inbound.round_index:
            collecting = "none" if inbound is None else inbound.round_index
            raise ProtocolError(
                f"stale round {update.round_index}; collecting round {collecting}", "stale_round"
            )
        if device_id in inbound.accepted:
            raise ProtocolError(
                "a different update for this round was already accepted", "conflicting_update"
            )
        if not inbound.collecting:
            raise ProtocolError(f"round {inbound.round_index} is closed", "round_closed")
        if device_id not in inbound.task.selected_devices:
            raise ProtocolError(
                f"device {device_id} was not selected for round {inbound.round_index}",
                "not_selected",
            )
        if update.base_digest != inbound.task.for_device(device_id).global_state.digest:
            raise ProtocolError("update was computed against another global state", "wrong_base")
        self._store_profiles(device_id, update.profile)
        if device_id in inbound.transfers and inbound.announced[device_id][0].blob == update.blob:
            return
        topic = self.topics.device(device_id, "pull")
        download = Download(
            update.blob,
            request=lambda indices: self._publish_raw(
                topic,
                encode_message(
                    ChunkRequest(
                        device_id=device_id, digest=update.blob.digest, indices=list(indices)
                    )
                ),
            ),
            max_size_bytes=self.config.transfer.max_update_bytes,
            retry_after_s=self.config.transfer.retry_after_s,
            timeout_s=self.config.transfer.timeout_s,
            window_bytes=self._window,
        )
        previous = inbound.transfers.pop(device_id, None)
        if previous is not None:
            previous.close()
        inbound.transfers[device_id] = download
        inbound.announced[device_id] = (update, digest)
        download.start()

    def _on_chunk(self, device_id: str, digest: str, index_text: str, payload: bytes) -> None:
        inbound = self.round
        download = inbound.transfers.get(device_id) if inbound else None
        if inbound is None or download is None or download.manifest.digest != digest:
            log_event(logger, logging.DEBUG, "chunk.unexpected", device_id=device_id)
            return
        if not inbound.collecting:
            return
        index = parse_chunk_index(index_text)
        update, message = inbound.announced[device_id]
        try:
            self._add_chunk(inbound, device_id, download, index, payload)
        except ProtocolError as exc:
            self._reject(
                device_id, update.round_index, exc.code or "invalid_update", str(exc), message
            )

    def _add_chunk(
        self, inbound: RoundIntake, device_id: str, download: Download, index: int, payload: bytes
    ) -> None:
        try:
            download.add_chunk(index, payload)
        except ProtocolError as exc:  # already asked for again: no nack, the round goes on
            log_event(logger, logging.WARNING, "chunk.rejected", device_id=device_id, reason=exc)
            if download.rejected_chunks <= MAX_REJECTED_CHUNKS:
                return
            del inbound.transfers[device_id]
            download.close()
            raise ProtocolError(
                f"{download.rejected_chunks} chunks failed their checks, the last: {exc}",
                "bad_chunks",
            ) from None
        if not download.complete:
            return
        del inbound.transfers[device_id]
        update, _ = inbound.announced[device_id]
        try:  # the device's own spec when it trains at another rank than the run's
            tensors = checked_update_tensors(
                download.payload(),
                inbound.specs.get(device_id) or self.expected,
                self._check_update,
                self.config.aggregation.max_update_norm,
            )
        except BaseException:
            download.close()
            raise
        inbound.spooled.append(download)  # read lazily by aggregate, deleted when the round ends
        inbound.accepted[device_id] = AcceptedUpdate(update, tensors)
        inbound.last_accept_s = time.monotonic()
        self._accepted_blobs[(device_id, update.round_index)] = update.blob.digest
        self._ack(device_id, update)
        self._notify(lambda observer: observer.on_accepted(device_id, update.round_index))
        log_event(
            logger,
            logging.INFO,
            "update.accepted",
            device_id=device_id,
            round_index=update.round_index,
        )

    def _ack(self, device_id: str, update: Update) -> None:
        ack = Ack(device_id=device_id, round_index=update.round_index, digest=update.blob.digest)
        self._publish(self.topics.device(device_id, "ack"), encode_message(ack))
