"""The coordinator's round state machine, with checkpoint and resume.

Each round: wait for `min_clients` ready devices → select → publish the task (retained) and offer
the global state → collect updates until every selected device answered or the deadline passed →
aggregate if at least `min_clients` arrived → evaluate → export → checkpoint → metrics.

All protocol state is owned by the thread calling `run()`; paho's thread only queues inbound
messages and serves chunk requests. Every inbound message is validated; a bad one is logged once
and answered with a nack on the device's nack topic, and it never changes accepted state.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

from coordinator.config import ExperimentConfig, config_digest, resume_conflicts
from coordinator.records import CheckpointState, RoundMetrics
from coordinator.registry import DeviceRegistry
from coordinator.rundir import RunDir
from coordinator.strategies.base import AcceptedUpdate, ServerContext, Strategy, make_strategy
from edge.data import TextDataset, load_split
from edge.errors import ProtocolError, UserError
from edge.logs import log_event
from edge.methods.base import FederatedMethod, Tensors, get_method
from edge.mqtt import BrokerSpec, MqttLink
from edge.telemetry.records import PhaseRecord
from edge.tensorfile import UPDATE_DTYPES, TensorFile
from edge.transfer import BlobServer, Download, TransferTimeout
from edge.wire import (
    Ack,
    Announcement,
    ChunkRequest,
    Hello,
    ModelRef,
    Nack,
    ProfileBatch,
    Progress,
    Task,
    Topics,
    Update,
    encode_message,
    mqtt_publish_wire_bytes,
    parse_message,
)

logger = logging.getLogger(__name__)

DEVICE_TO_COORDINATOR = (
    "status",
    "hello",
    "update",
    "profile",
    "progress",
    "want",
    "up/#",
    "exchange/up/#",
)
LAST_UPLOAD_RECORDS_WAIT_S = 5.0
MAX_REJECTED_CHUNKS = 16
"""A device whose chunks keep failing their checks is refused, not re-asked forever."""


@dataclass
class _Inbound:
    """Transfers and results of the round in progress."""

    round_index: int
    task: Task
    transfers: Dict[str, Download] = field(default_factory=dict)
    announced: Dict[str, Update] = field(default_factory=dict)
    accepted: Dict[str, AcceptedUpdate] = field(default_factory=dict)
    last_accept_s: Optional[float] = None
    collecting: bool = True
    """False once the round stopped collecting: a late update is refused, never acked."""
    spooled: List[Download] = field(default_factory=list)
    """Accepted uploads, read by the strategy's `aggregate`: deleted when the round ends."""


def profile_key(record: PhaseRecord) -> Tuple[str, int, str, float]:
    return (record.device_id, record.round_index, record.phase, record.start_unix_s)


def device_totals(records: List[PhaseRecord]) -> Dict[str, float]:
    """Energy (J) and peak RSS over the devices' records of one round. The idle baseline is no
    part of a round; energy is summed only when every phase measured it (never a partial sum)."""
    totals: Dict[str, float] = {}
    work = [r for r in records if r.phase != "idle"]
    energies = [r.energy_j for r in work if r.energy_j is not None]
    if work and len(energies) == len(work):
        totals["energy_j"] = float(sum(energies))
    peaks = [r.peak_rss_bytes for r in work if r.peak_rss_bytes is not None]
    if peaks:
        totals["peak_rss_bytes"] = float(max(peaks))
    return totals


class Coordinator:
    def __init__(
        self,
        config: ExperimentConfig,
        broker: BrokerSpec,
        resume: bool = False,
        on_round: Optional[Callable[[RoundMetrics], None]] = None,
        on_progress: Optional[Callable[[Progress], None]] = None,
    ) -> None:
        self.config = config
        self.broker = broker
        self.topics = Topics(config.name)
        self.run_dir = RunDir(config.run_dir)
        self.on_round = on_round
        self.on_progress = on_progress
        """Told each selected device's validated progress reports (the live table)."""
        self._stop = False
        if self.run_dir.exists() and not resume:
            raise UserError(
                f"run directory {self.run_dir.path} already exists: pass --resume to continue it "
                "or choose another experiment name"
            )
        self.validation = self._load_validation()
        self.model_ref = ModelRef(
            name_or_path=config.model.name_or_path,
            revision=config.model.revision,
            num_labels=config.model.num_labels or self._num_labels(),
            max_length=config.model.max_length,
            num_hidden_layers=config.model.num_hidden_layers,
        )
        self.method: FederatedMethod = get_method(config.method.name)(
            config.method.settings(), self.model_ref
        )
        self.start_round = 0
        self.wall_clock_offset_s = 0.0
        self.global_state: Tensors = {}
        self.init: Optional[Tensors] = None
        self._saved_strategy_state: Tensors = {}
        self.registry = DeviceRegistry(config.data.client_indices)
        self._setup_state(resume)
        from edge.models import load_tokenizer, pick_device

        self.strategy: Strategy = make_strategy(
            config.aggregation.strategy or self.method.strategy,
            ServerContext(
                method=self.method,
                model_ref=self.model_ref,
                eval_model=self.method.build(self.init, seed=config.seed),
                tokenizer=load_tokenizer(self.model_ref),
                validation=self.validation,
                init=self.init,
                torch_device=pick_device(config.eval_device),
                settings=config.aggregation.settings(),
                send=self._send_exchange,
                data_path=config.data.path,
            ),
        )
        if self._saved_strategy_state:
            self.strategy.load_state(self._saved_strategy_state)
        self.expected = self.strategy.update_spec()
        self.blobs = BlobServer(
            self._publish_raw, config.transfer.chunk_size_bytes, background=True
        )
        self.link = MqttLink(
            broker,
            client_id=f"jetfed-coordinator-{config.name}",
            subscriptions=[self.topics.all_devices(leaf) for leaf in DEVICE_TO_COORDINATOR],
            will=(self.topics.coordinator, b""),
            on_connected=self._announce,
        )
        self._started_unix_s = time.time()
        self.link.on_topic(self._is_want, self._serve_want)
        self._inbound: Optional[_Inbound] = None
        self._profile_keys = {profile_key(r) for r in self.run_dir.read_profiles()}
        self._round_records: Dict[int, List[PhaseRecord]] = {}
        self._round_bytes = {"up": 0, "down": 0}
        self._messages_handled = 0
        self._announcements_settled = False

    # ------------------------------------------------------------------ setup

    def _load_validation(self) -> TextDataset:
        data = self.config.data
        dataset = load_split(data.path, data.validation_split)
        if data.max_eval_samples is not None and len(dataset) > data.max_eval_samples:
            dataset = dataset.subset(range(data.max_eval_samples))
        return dataset

    def _num_labels(self) -> int:
        from pathlib import Path

        labels_file = Path(self.config.data.path) / "labels.json"
        if labels_file.exists():
            import json

            return len(json.loads(labels_file.read_text()))
        return max(2, self.validation.num_classes)

    def _setup_state(self, resume: bool) -> None:
        if resume and (self.run_dir.checkpoint_dir / "state.json").exists():
            conflicts = resume_conflicts(self.run_dir.load_config(), self.config)
            if conflicts:
                raise UserError(
                    f"--resume: {self.config.name}'s config changed since the checkpoint "
                    f"({'; '.join(conflicts[:3])}); only rounds.count and broker may change"
                )
            state, self.global_state, self.init, self._saved_strategy_state = (
                self.run_dir.load_checkpoint()
            )
            self.start_round = state.completed_round + 1
            self.wall_clock_offset_s = state.wall_clock_s
            self.registry.client_indices.update(state.client_indices)
            log_event(logger, logging.WARNING, "run.resumed", next_round=self.start_round)
            return
        initial = self.method.initial_state(seed=self.config.seed)
        self.global_state = initial.global_state
        self.init = initial.init
        self.run_dir.create(self.config.model_dump(mode="json", exclude={"broker"}))

    # ------------------------------------------------------------------ paho thread

    def _announce(self) -> None:
        """On every (re)connect: the retained announcement devices that are not pinned to an
        experiment join by (cleared at the end of the run, or by the last will)."""
        announcement = Announcement(
            experiment=self.config.name, started_unix_s=self._started_unix_s
        )
        self.link.publish(self.topics.coordinator, encode_message(announcement), retain=True)

    def _publish_raw(self, topic: str, payload: bytes) -> None:
        self._round_bytes["down"] += self.link.publish(topic, payload)

    def _send_exchange(self, device_id: str, subtopic: str, payload: bytes) -> None:
        self._publish_raw(self.topics.device(device_id, f"exchange/down/{subtopic}"), payload)

    def _is_want(self, topic: str) -> bool:
        return topic.startswith(f"{self.topics.root}/devices/") and topic.endswith("/want")

    def _serve_want(self, topic: str, payload: bytes) -> None:
        parsed = self._parse_topic(topic)
        if parsed is None:
            return
        device_id = parsed[0]
        try:
            request = parse_message(ChunkRequest, payload)
            self._check_sender(device_id, request.device_id)
            self.blobs.serve(
                request.digest,
                request.indices,
                lambda digest, index: self.topics.chunk(device_id, "down", digest, index),
            )
        except ProtocolError as exc:
            self._reject(device_id, None, exc.code or "bad_request", str(exc))

    # ------------------------------------------------------------------ run

    def stop(self) -> None:
        self._stop = True

    def run(self) -> List[RoundMetrics]:
        self.link.connect()
        self.link.check_message_limit(
            f"{self.topics.root}/probe",
            self.config.transfer.chunk_size_bytes,
            "transfer.chunk_size_bytes",
        )
        started_s = time.monotonic() - self.wall_clock_offset_s
        init_manifest = None
        if self.init is not None:
            init_manifest = self.blobs.offer_tensors(self.init)
        results: List[RoundMetrics] = []
        previous_done_s: Optional[float] = None
        try:
            for round_index in range(self.start_round, self.config.rounds.count):
                if self._stop:
                    break
                metrics = self._run_round(round_index, init_manifest, started_s, previous_done_s)
                previous_done_s = self._inbound.last_accept_s if self._inbound else None
                results.append(metrics)
                if self.on_round is not None:
                    self.on_round(metrics)
            self._await_upload_records(LAST_UPLOAD_RECORDS_WAIT_S)
        finally:
            self.link.publish(self.topics.task, b"", retain=True)
            self.link.publish(self.topics.coordinator, b"", retain=True)
            self.link.wait_published(5)
            self.link.close()
            self.run_dir.write_profile_tables()
        return results

    def _await_upload_records(self, timeout_s: float) -> None:
        """A device reports a round's upload phase only once that upload was acknowledged (on
        its next update, or a profile message): wait briefly for the last round's ones."""
        inbound = self._inbound
        if inbound is None or self._stop:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            records = self._round_records.get(inbound.round_index, [])
            reported = {r.device_id for r in records if r.phase == "upload"}
            if set(inbound.accepted) <= reported:
                return
            self._pump(0.1)

    def _run_round(
        self,
        round_index: int,
        init_manifest: object,
        started_s: float,
        previous_done_s: Optional[float],
    ) -> RoundMetrics:
        round_start_s = time.monotonic()
        self._round_bytes = {"up": 0, "down": 0}
        selected = self._select(round_index)
        extra = self.strategy.configure_round(round_index, self.global_state)
        global_manifest = self.blobs.offer_tensors(self.global_state)
        extra_manifests = {name: self.blobs.offer(data) for name, data in extra.items()}
        now = time.time()
        task = Task(
            experiment=self.config.name,
            round_index=round_index,
            method=self.method.name,
            method_config=self.config.method.settings(),
            model=self.model_ref,
            training=self.config.training,
            partition=self.config.data.partition,
            client_indices={d: self.registry.client_indices[d] for d in selected},
            selected_devices=selected,
            global_state=global_manifest,
            init_state=init_manifest,  # type: ignore[arg-type]
            extra_blobs=extra_manifests,
            update_dtype=self.config.transfer.update_dtype,
            chunk_size_bytes=self.config.transfer.chunk_size_bytes,
            issued_unix_s=now,
            deadline_unix_s=now + self.config.rounds.deadline_s,
        )
        self._inbound = _Inbound(round_index, task)
        self.link.publish(self.topics.task, encode_message(task), retain=True)
        overhead_s = None if previous_done_s is None else time.monotonic() - previous_done_s
        log_event(
            logger,
            logging.INFO,
            "round.task_published",
            round_index=round_index,
            devices=len(selected),
        )
        self._collect(task)
        inbound = self._inbound
        inbound.collecting = False
        accepted = [inbound.accepted[d] for d in sorted(inbound.accepted)]
        aggregate_s = eval_s = 0.0
        metrics = RoundMetrics(
            round_index=round_index,
            status="skipped",
            method=self.method.name,
            devices=sorted(inbound.accepted),
            num_selected=len(selected),
            num_aggregated=len(accepted),
            overhead_s=overhead_s,
        )
        if len(accepted) >= self.config.rounds.min_clients:
            t0 = time.monotonic()
            self.global_state = self.strategy.aggregate(round_index, self.global_state, accepted)
            aggregate_s = time.monotonic() - t0
            metrics.status = "aggregated"
            total = sum(a.update.num_samples for a in accepted)
            metrics.train_loss = (
                sum(a.update.train_loss * a.update.num_samples for a in accepted) / total
            )
        else:
            log_event(
                logger,
                logging.WARNING,
                "round.skipped",
                round_index=round_index,
                accepted=len(accepted),
                min_clients=self.config.rounds.min_clients,
            )
        for digest in [global_manifest.digest, *(m.digest for m in extra_manifests.values())]:
            self.blobs.withdraw(digest)
        for download in inbound.spooled:
            download.close()
        t0 = time.monotonic()
        evaluation = dict(self.strategy.evaluate(self.global_state))
        eval_s = time.monotonic() - t0
        self.strategy.export(self.global_state, str(self.run_dir.adapter_dir(round_index)))
        metrics.accuracy = evaluation.pop("accuracy", None)
        metrics.eval_loss = evaluation.pop("eval_loss", None)
        metrics.extra.update(evaluation)
        metrics.aggregate_s = aggregate_s
        metrics.eval_s = eval_s
        metrics.extra.update(device_totals(self._round_records.get(round_index, [])))
        metrics.bytes_up = self._round_bytes["up"]
        metrics.bytes_down = self._round_bytes["down"]
        metrics.round_s = time.monotonic() - round_start_s
        metrics.wall_clock_s = time.monotonic() - started_s
        self.save_checkpoint(round_index, metrics.wall_clock_s)
        # profiles.parquet/.csv are rewritten from every record at the end of run(), not here:
        # per round that cost ~100 ms with 10 devices, growing with devices × rounds.
        self.run_dir.append_metrics(metrics)
        return metrics

    def save_checkpoint(self, completed_round: int, wall_clock_s: float) -> None:
        """Everything `--resume` needs to continue after `completed_round`."""
        self.run_dir.save_checkpoint(
            CheckpointState(
                experiment=self.config.name,
                config_digest=config_digest(self.config),
                completed_round=completed_round,
                client_indices=self.registry.client_indices,
                wall_clock_s=wall_clock_s,
                has_init=self.init is not None,
            ),
            self.global_state,
            self.init,
            self.strategy.state(),
        )

    # ------------------------------------------------------------------ devices

    def _select(self, round_index: int) -> List[str]:
        """Wait for enough ready devices with a data shard, then pick this round's devices."""
        rounds = self.config.rounds
        partition = self.config.data.partition
        deadline = time.monotonic() + rounds.wait_for_devices_s
        eligible: List[str] = []
        while True:
            self._pump(0.2)
            ready = self.registry.ready()
            # Indices (hence shards and seeds) go to a whole quorum at once, in sorted id order,
            # never in the order devices happened to arrive: reruns train identically.
            if len(ready) >= rounds.min_clients:
                if partition.kind != "none":
                    self.registry.assign_indices(ready, partition.num_clients)
                else:
                    self.registry.assign_indices(ready, len(self.registry.devices) + 1)
            eligible = [d for d in ready if d in self.registry.client_indices]
            if len(eligible) >= rounds.min_clients and not self._announcements_settled:
                self._settle_announcements()
                continue
            if len(eligible) >= rounds.min_clients or self._stop:
                break
            if time.monotonic() > deadline:
                raise UserError(
                    f"only {len(eligible)} of rounds.min_clients={rounds.min_clients} devices "
                    f"joined within {rounds.wait_for_devices_s:.0f} s (ready: {ready}); a device "
                    "pinned with --experiment/JETFED_EXPERIMENT serves only that experiment"
                )
        count = rounds.clients_per_round or len(eligible)
        rng = random.Random(self.config.seed * 7919 + round_index)
        return sorted(rng.sample(eligible, min(count, len(eligible))))

    def _settle_announcements(self, quiet_s: float = 0.3, cap_s: float = 3.0) -> None:
        """Once per process, at the first quorum: devices already waiting announce themselves as
        retained messages that arrive in bursts, so read until the broker has been quiet for
        `quiet_s`; the first selection (and the client indices) then sees all of them, not
        whichever came first."""
        self._announcements_settled = True
        give_up = time.monotonic() + cap_s
        while time.monotonic() < give_up:
            before = self._messages_handled
            self._pump(quiet_s)
            if self._messages_handled == before:
                return

    def _collect(self, task: Task) -> None:
        """Until every selected device's update is accepted, or the deadline passes."""
        inbound = self._inbound
        assert inbound is not None
        deadline_s = time.monotonic() + (task.deadline_unix_s - time.time())
        selected = set(task.selected_devices)
        while (
            set(inbound.accepted) != selected and time.monotonic() < deadline_s and not self._stop
        ):
            self._pump(0.1)
            if self._only_offline_devices_missing(selected - set(inbound.accepted)):
                break
            for device_id, download in list(inbound.transfers.items()):
                try:
                    download.poll()
                except TransferTimeout as exc:
                    del inbound.transfers[device_id]
                    self._reject(device_id, task.round_index, "transfer_timeout", str(exc))

    def _only_offline_devices_missing(self, missing: Set[str]) -> bool:
        """Quorum is in and every missing device has been offline for the grace period: waiting
        for the deadline would only delay the round (dropped devices rejoin a later one)."""
        inbound = self._inbound
        assert inbound is not None
        rounds = self.config.rounds
        if len(inbound.accepted) < rounds.min_clients or inbound.transfers.keys() & missing:
            return False
        if not all(self.registry.offline_for_s(d) > rounds.offline_grace_s for d in missing):
            return False
        log_event(
            logger,
            logging.INFO,
            "round.closed_early",
            round_index=inbound.round_index,
            offline=",".join(sorted(missing)),
        )
        return True

    def _pump(self, timeout_s: float) -> None:
        self.link.drain(self._dispatch, timeout_s)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        """Route one inbound message; nothing a device sends can raise out of here."""
        parsed = self._parse_topic(topic)
        if parsed is None:
            return
        device_id, leaf, rest = parsed
        self._messages_handled += 1
        self._round_bytes["up"] += mqtt_publish_wire_bytes(topic, len(payload))
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
            elif leaf == "exchange" and len(rest) >= 2 and rest[0] == "up":
                self.strategy.on_exchange(device_id, "/".join(rest[1:]), payload)
        except ProtocolError as exc:
            round_index = self._inbound.round_index if self._inbound else None
            code = exc.code or "invalid_" + leaf.replace("/", "_")
            self._reject(device_id, round_index, code, str(exc))
        except Exception as exc:  # a message must never kill the coordinator
            logger.exception("message.crashed topic=%s", topic)
            self._reject(device_id, None, "internal_error", type(exc).__name__)

    def _parse_topic(self, topic: str) -> Optional[Tuple[str, str, List[str]]]:
        """(device id, leaf, rest), or None after one log line (no device to nack)."""
        try:
            return self.topics.parse_device_topic(topic)
        except ProtocolError as exc:
            log_event(logger, logging.WARNING, "message.rejected", topic=topic, reason=exc)
            return None

    def _reject(self, device_id: str, round_index: Optional[int], code: str, reason: str) -> None:
        log_event(
            logger,
            logging.WARNING,
            "message.rejected",
            device_id=device_id,
            code=code,
            reason=reason,
        )
        nack = Nack(device_id=device_id, round_index=round_index, code=code, reason=reason)
        self.link.publish(self.topics.device(device_id, "nack"), encode_message(nack))

    def _check_sender(self, device_id: str, claimed: str) -> None:
        if claimed != device_id:
            raise ProtocolError(
                f"device_id {claimed!r} inside the message does not match the topic",
                "sender_mismatch",
            )

    def _on_status(self, device_id: str, payload: bytes) -> None:
        """`online`/`offline`; empty is a cleared retained status (offline)."""
        if payload not in (b"online", b"offline", b""):
            raise ProtocolError(f"status {payload[:32]!r} is not online or offline")
        self.registry.on_status(device_id, payload == b"online")

    def _on_hello(self, device_id: str, payload: bytes) -> None:
        hello = parse_message(Hello, payload)
        self._check_sender(device_id, hello.device_id)
        self.registry.on_hello(hello)
        self.run_dir.append_device(hello)
        log_event(
            logger, logging.INFO, "device.hello", device_id=device_id, accelerator=hello.accelerator
        )

    def _on_profile(self, device_id: str, payload: bytes) -> None:
        batch = parse_message(ProfileBatch, payload)
        self._check_sender(device_id, batch.device_id)
        self._store_profiles(device_id, batch.records)

    def _on_progress(self, device_id: str, payload: bytes) -> None:
        """Display only: a report of a device selected for the round in progress."""
        progress = parse_message(Progress, payload)
        self._check_sender(device_id, progress.device_id)
        inbound = self._inbound
        if (
            self.on_progress is not None
            and inbound is not None
            and inbound.collecting
            and progress.round_index == inbound.round_index
            and device_id in inbound.task.selected_devices
        ):
            self.on_progress(progress)

    def _store_profiles(self, device_id: str, records: List[PhaseRecord]) -> None:
        """Append records not seen before (devices re-send until an update carries them)."""
        if any(r.device_id != device_id or r.experiment != self.config.name for r in records):
            raise ProtocolError("profile records name another device or experiment")
        fresh = [r for r in records if profile_key(r) not in self._profile_keys]
        self._profile_keys.update(profile_key(r) for r in fresh)
        for record in fresh:
            self._round_records.setdefault(record.round_index, []).append(record)
        self.run_dir.append_profiles(fresh)

    def _on_update(self, device_id: str, payload: bytes) -> None:
        inbound = self._inbound
        update = parse_message(Update, payload)
        self._check_sender(device_id, update.device_id)
        if update.experiment != self.config.name:
            raise ProtocolError(f"update for experiment {update.experiment!r}", "wrong_experiment")
        if inbound is None or update.round_index != inbound.round_index:
            collecting = "none" if inbound is None else inbound.round_index
            raise ProtocolError(
                f"stale round {update.round_index}; collecting round {collecting}", "stale_round"
            )
        accepted = inbound.accepted.get(device_id)
        if accepted is not None:
            if accepted.update.blob.digest != update.blob.digest:
                raise ProtocolError(
                    "a different update for this round was already accepted", "conflicting_update"
                )
            self._ack(device_id, update)
            return
        if not inbound.collecting:
            raise ProtocolError(f"round {inbound.round_index} is closed", "round_closed")
        if device_id not in inbound.task.selected_devices:
            raise ProtocolError(
                f"device {device_id} was not selected for round {inbound.round_index}",
                "not_selected",
            )
        if update.base_digest != inbound.task.global_state.digest:
            raise ProtocolError("update was computed against another global state", "wrong_base")
        self._store_profiles(device_id, update.profile)
        if (
            device_id in inbound.transfers
            and inbound.announced[device_id].blob.digest == update.blob.digest
        ):
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
        )
        inbound.transfers[device_id] = download
        inbound.announced[device_id] = update
        download.start()

    def _on_chunk(self, device_id: str, digest: str, index_text: str, payload: bytes) -> None:
        inbound = self._inbound
        download = inbound.transfers.get(device_id) if inbound else None
        if inbound is None or download is None or download.manifest.digest != digest:
            log_event(logger, logging.DEBUG, "chunk.unexpected", device_id=device_id)
            return
        if not inbound.collecting:
            return
        if not index_text.isdigit():
            raise ProtocolError(f"chunk index {index_text!r} is not a number")
        try:
            download.add_chunk(int(index_text), payload)
        except ProtocolError as exc:  # already asked for again: no nack, the round goes on
            log_event(logger, logging.WARNING, "chunk.rejected", device_id=device_id, reason=exc)
            if download.rejected_chunks <= MAX_REJECTED_CHUNKS:
                return
            del inbound.transfers[device_id]
            inbound.announced.pop(device_id, None)
            download.close()
            raise ProtocolError(
                f"{download.rejected_chunks} chunks failed their checks, the last: {exc}",
                "bad_chunks",
            ) from None
        if not download.complete:
            return
        del inbound.transfers[device_id]
        update = inbound.announced.pop(device_id)
        try:
            candidate = self._decode_update(update, download)
        except BaseException:
            download.close()
            raise
        inbound.spooled.append(download)  # read by aggregate
        inbound.accepted[device_id] = candidate
        inbound.last_accept_s = time.monotonic()
        self._ack(device_id, update)
        log_event(
            logger,
            logging.INFO,
            "update.accepted",
            device_id=device_id,
            round_index=update.round_index,
        )

    def _decode_update(self, update: Update, download: Download) -> AcceptedUpdate:
        """Validate a complete upload from its spool file, which the strategy then reads
        lazily (it is kept until the round ends)."""
        try:
            tensors = TensorFile(download.result_path(), self.expected, UPDATE_DTYPES)
        except ProtocolError as exc:
            raise ProtocolError(str(exc), exc.code or "invalid_tensors") from None
        bound = self.config.aggregation.max_update_norm
        if bound is not None and tensors.l2_norm > bound:
            raise ProtocolError(
                f"update L2 norm {tensors.l2_norm:.4g} exceeds aggregation.max_update_norm="
                f"{bound:g}",
                code="update_norm_too_large",
            )
        return AcceptedUpdate(update, tensors)

    def _ack(self, device_id: str, update: Update) -> None:
        ack = Ack(device_id=device_id, round_index=update.round_index, digest=update.blob.digest)
        self.link.publish(self.topics.device(device_id, "ack"), encode_message(ack))
