"""The edge agent: hello → wait for a task → fetch global state → train → upload → profile.

One thread runs the protocol; paho's thread only queues messages and serves blob chunks the
coordinator pulls (so uploads flow even while the next round trains). What a round does is the
method's business (`edge/methods/`); this loop never changes when a method is added.
"""

from __future__ import annotations

import logging
import platform
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import psutil
from pydantic import BaseModel, ConfigDict, Field

import jetfed
from jetfed.edge.errors import ProtocolError, UserError
from jetfed.edge.exchange import Exchange
from jetfed.edge.local_trainer import LocalTrainer, Trainer, TrainingDevice
from jetfed.edge.logs import log_event
from jetfed.edge.methods.base import available_methods, get_method
from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.progress import ProgressReporter
from jetfed.edge.session import DeviceSession
from jetfed.edge.telemetry.context import DeviceContext
from jetfed.edge.telemetry.live import LivePublisher
from jetfed.edge.telemetry.phases import PhaseCounters, Profiler
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.edge.telemetry.sampler import DEFAULT_RATE_HZ, Sampler
from jetfed.edge.tensorfile import Payload
from jetfed.edge.topics import ID_PATTERN, Topics, parse_chunk_index
from jetfed.edge.transfer import Download, TransferTimeout
from jetfed.edge.wire import (
    ROUND_FAILURE_REASON_CHARS,
    Ack,
    Announcement,
    BlobManifest,
    Hello,
    Nack,
    ProfileBatch,
    RoundFailure,
    Task,
    Update,
    encode_message,
    message_digest,
    parse_message,
)

logger = logging.getLogger(__name__)


class EdgeConfig(BaseModel):
    """How this device joins an experiment (CLI flags / JETFED_* environment variables)."""

    model_config = ConfigDict(extra="forbid")

    broker: BrokerSpec
    device_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    experiment: Optional[str] = Field(default=None, pattern=ID_PATTERN)
    """Pinned experiment; None: serve whichever coordinator announces itself (jetfed.edge.lobby)."""
    data: Optional[str] = None
    train_split: str = "train"
    torch_device: Optional[str] = None
    num_threads: Optional[int] = Field(default=None, ge=1)
    deterministic: bool = False
    """Deterministic CUDA kernels (jetfed.edge.determinism): bit-identical reruns, slower."""
    max_download_bytes: int = Field(default=8 << 30, gt=0)
    transfer_retry_s: float = Field(default=5.0, gt=0)
    transfer_timeout_s: float = Field(default=300.0, gt=0)
    ack_retry_s: float = Field(default=10.0, gt=0)
    telemetry: str = "auto"
    sample_rate_hz: float = Field(default=DEFAULT_RATE_HZ, gt=0, le=1000)
    sysfs_root: str = "/sys"
    idle_baseline_s: float = Field(default=5.0, ge=0)
    link_info: Optional[str] = Field(default=None, max_length=200)
    """How this device reaches the broker (the `--link` spec of an emulated link, or a label
    such as `wifi-5ghz`); its hello's context records it as `link`."""


class RoundAbandoned(Exception):
    """This round cannot finish here (nack, newer task, timeout); wait for the next task."""


NO_TELEMETRY = "none"
"""`telemetry: none`: no sampler thread, no memory readings, records with time and bytes only
(a simulation's virtual devices, which share one process)."""
ANNOUNCEMENT_WAIT_S = 10.0
"""A following agent whose experiment's announcement is not there this long after connecting
serves a run that already ended."""


class EdgeAgent:
    def __init__(
        self, config: EdgeConfig, follow: bool = False, trainer: Optional[Trainer] = None
    ) -> None:
        """`follow`: joined through jetfed.edge.lobby, so serve only while the experiment's
        coordinator announces its run (finishing the round in hand when the announcement goes).
        `trainer`: shared by the virtual devices of a simulation (one model for all of them);
        by default the agent's own."""
        if config.experiment is None:
            raise ValueError("EdgeAgent serves one experiment; jetfed.edge.lobby.Lobby picks it")
        self.config = config
        self.topics = Topics(config.experiment)
        self.device_id = config.device_id
        self.profiler = Profiler(
            config.experiment, config.device_id, memory=config.telemetry != NO_TELEMETRY
        )
        self._context: Optional[DeviceContext] = None
        self._stop = threading.Event()
        self._pending_task: Optional[Task] = None
        self._finished_rounds: Dict[int, str] = {}
        self._downloads: Dict[str, Download] = {}
        self._acks: Set[Tuple[int, str]] = set()
        """(round, blob digest) of every ack: only one naming our own upload completes it."""
        self._nacks: Dict[Tuple[int, str], Nack] = {}
        """(round, message digest) → nack: only one naming the update we sent abandons it."""
        self.trainer: Trainer = trainer or LocalTrainer(config.torch_device)
        self._init_fetched = ""
        """The digest of the fixed init this device downloaded (once per run, as each device
        does, even when a simulation's shared trainer already holds the model built from it)."""
        self._unsent_records: List[PhaseRecord] = []
        self._coordinator_started_unix_s: Optional[float] = None
        dev = self.topics.device
        self.session = DeviceSession(
            config.broker,
            config.experiment,
            config.device_id,
            self.hello,
            client_id=f"jetfed-edge-{config.device_id}",
            extra_subscriptions=[
                self.topics.coordinator,
                dev(self.device_id, "status"),
                dev(self.device_id, "exchange/down/#"),
            ],
            background=True,
        )
        self.link = self.session.link
        self.blobs = self.session.blobs
        self.exchange = Exchange(self.topics, self.device_id, self.link.publish)
        progress_topic = dev(self.device_id, "progress")
        self.progress = ProgressReporter(
            self.device_id,
            lambda payload: self.link.publish(progress_topic, payload),
            self.link.counters,
        )
        self.profiler.on_phase = self.progress.phase
        self.profiler.on_step = self.progress.step
        telemetry_topic = dev(self.device_id, "telemetry")
        self.live = LivePublisher(
            self.device_id, lambda payload: self.link.publish(telemetry_topic, payload)
        )
        self.training_device = TrainingDevice(
            self.device_id, config.data, config.train_split, self.profiler, self.exchange
        )
        prefix = self.exchange.down_prefix
        self.link.on_topic(lambda topic: topic.startswith(prefix), self.exchange.deliver)
        self.follow = follow
        self._announced = threading.Event()

    # ------------------------------------------------------------------ connection

    def _reannounce(self, payload: bytes) -> None:
        """Our retained status says we are gone (a stale last will, a forgery) while we are
        connected: the coordinator would forget us, so announce again."""
        log_event(logger, logging.WARNING, "device.reannounce", status=payload[:16])
        self.session.announce()

    def hello(self) -> Hello:
        import torch

        return Hello(
            device_id=self.device_id,
            jetfed_version=jetfed.__version__,
            hostname=socket.gethostname(),
            machine=platform.machine(),
            accelerator="cuda" if torch.cuda.is_available() else "cpu",
            memory_total_bytes=int(psutil.virtual_memory().total),
            telemetry_backend=self.profiler.backend_name,
            methods=available_methods(),
            context=self._hello_context(),
        )

    def _hello_context(self) -> Dict[str, Any]:
        context = self._context.model_dump(mode="json") if self._context else {}
        if self.config.link_info:
            context["link"] = self.config.link_info
        return context

    # ------------------------------------------------------------------ main loop

    def stop(self) -> None:
        self._stop.set()

    def run(self, max_rounds: Optional[int] = None) -> None:
        """Serve rounds until stopped (or `max_rounds` rounds were uploaded)."""
        import torch

        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        if self.config.deterministic:
            from jetfed.edge.determinism import use_deterministic_kernels

            use_deterministic_kernels()
        self._start_telemetry()
        self.link.connect()
        log_event(
            logger,
            logging.INFO,
            "edge.waiting",
            device_id=self.device_id,
            broker=self.config.broker.url,
            experiment=self.topics.experiment,
            listening=self.topics.task,
        )
        connected_s = time.monotonic()
        try:
            while not self._stop.is_set():
                if max_rounds is not None and len(self._finished_rounds) >= max_rounds:
                    return
                if self._run_ended(connected_s):
                    return
                task = self._pending_task or self._wait_for_task()
                self._pending_task = None
                if task is not None:
                    self._run_round(task)
        finally:
            self.link.close(final=(self.topics.device(self.device_id, "status"), b"offline"))
            if self.profiler.sampler is not None:
                self.profiler.sampler.stop()
                self.profiler.sampler = None

    def _run_ended(self, connected_s: float) -> bool:
        """A following agent whose experiment no longer announces itself (it ended between the
        lobby's choice and this connection: a cleared retained message is never delivered)."""
        if not self.follow or self._announced.is_set():
            return False
        if time.monotonic() - connected_s < ANNOUNCEMENT_WAIT_S:
            return False
        log_event(logger, logging.INFO, "experiment.ended", experiment=self.topics.experiment)
        return True

    def _start_telemetry(self) -> None:
        """Start sampling, measure the idle baseline before any training (its record rides on
        the first update), then read the context the hello carries."""
        config = self.config
        if config.telemetry == NO_TELEMETRY:
            self._context = self.profiler.context()
            return
        self.profiler.sampler = Sampler.auto(
            config.telemetry, rate_hz=config.sample_rate_hz, sysfs_root=config.sysfs_root
        )
        self.live.backend = self.profiler.sampler.backend_name
        self.profiler.sampler.listeners.append(self.live.on_sample)
        if config.idle_baseline_s > 0:
            self.profiler.measure_idle_baseline(config.idle_baseline_s)
        self._context = self.profiler.context()

    def _wait_for_task(self) -> Optional[Task]:
        self._pump(timeout_s=0.5)
        return self._pending_task

    def _pump(self, timeout_s: float) -> None:
        self.link.drain(self._dispatch, timeout_s)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        try:
            if topic == self.topics.task:
                self._on_task(payload)
                return
            if topic == self.topics.coordinator:
                self._on_announcement(payload)
                return
            _, leaf, rest = self.topics.parse_device_topic(topic)
            if leaf == "down" and len(rest) == 2:
                download = self._downloads.get(rest[0])
                if download is not None:
                    download.add_chunk(parse_chunk_index(rest[1]), payload)
            elif leaf == "ack":
                ack = parse_message(Ack, payload)
                self._acks.add((ack.round_index, ack.digest))
            elif leaf == "nack":
                nack = parse_message(Nack, payload)
                log_event(
                    logger, logging.WARNING, "nack.received", code=nack.code, reason=nack.reason
                )
                if nack.round_index is not None and nack.digest is not None:
                    self._nacks[(nack.round_index, nack.digest)] = nack
            elif leaf == "status" and payload != b"online":
                self._reannounce(payload)
        except (ProtocolError, ValueError) as exc:
            log_event(logger, logging.WARNING, "message.rejected", topic=topic, reason=exc)

    def _on_announcement(self, payload: bytes) -> None:
        """Our experiment's coordinator runs (payload) or its run ended (empty). A (re)started
        coordinator hears our hello again: some brokers (RabbitMQ) never deliver retained
        messages to wildcard subscriptions, so it may not have seen our retained one. A device
        that follows announcements (jetfed.edge.lobby) leaves once the run ended."""
        if not payload:
            if self.follow:
                log_event(
                    logger, logging.INFO, "experiment.ended", experiment=self.topics.experiment
                )
                self.stop()
            return
        announcement = parse_message(Announcement, payload)
        self._announced.set()
        if announcement.started_unix_s != self._coordinator_started_unix_s:
            self._coordinator_started_unix_s = announcement.started_unix_s
            self.session.announce()

    def _on_task(self, payload: bytes) -> None:
        if not payload:
            self.live.enabled = False
            return
        task = parse_message(Task, payload)
        if task.experiment != self.config.experiment:
            raise ProtocolError(f"task for experiment {task.experiment!r}")
        self.live.enabled = task.live_telemetry
        if task.round_index in self._finished_rounds:
            return
        if self._pending_task is None or task.round_index >= self._pending_task.round_index:
            self._pending_task = task

    # ------------------------------------------------------------------ one round

    def _run_round(self, task: Task) -> None:
        if task.round_index in self._finished_rounds:
            return
        if self.device_id not in task.selected_devices:
            log_event(logger, logging.INFO, "round.not_selected", round_index=task.round_index)
            return
        task = task.for_device(self.device_id)  # its rank, budget and starting state
        if time.time() > task.deadline_unix_s:
            log_event(logger, logging.WARNING, "round.past_deadline", round_index=task.round_index)
            self._finished_rounds[task.round_index] = "late"
            return
        log_event(logger, logging.INFO, "round.start", round_index=task.round_index)
        self.profiler.method = task.method
        try:
            get_method(task.method)  # a method this device lacks fails the round, not the agent
            with self.profiler.phase("download", task.round_index) as counters:
                blobs = self._download_all(task, counters)
            with self.profiler.phase("setup", task.round_index):
                try:
                    job = self.trainer.prepare(task, blobs, self.training_device)
                finally:
                    self._release_downloads()
            result = self.trainer.run(job)
            with self.profiler.phase("upload", task.round_index) as counters:
                self._upload(task, result, counters)
            self._finished_rounds[task.round_index] = "uploaded"
            log_event(logger, logging.INFO, "round.uploaded", round_index=task.round_index)
        except RoundAbandoned as exc:
            log_event(
                logger, logging.WARNING, "round.abandoned", round_index=task.round_index, reason=exc
            )
            self._finished_rounds[task.round_index] = "abandoned"
        except (ProtocolError, TransferTimeout, UserError) as exc:
            log_event(
                logger, logging.WARNING, "round.failed", round_index=task.round_index, reason=exc
            )
            self._report_failure(task, str(exc))
        except Exception as exc:  # a bug or an OOM in one round must not take the device away
            logger.exception("round.crashed round_index=%s", task.round_index)
            self._report_failure(task, f"{type(exc).__name__}: {exc}")
        finally:
            self._publish_profile(task.round_index)

    def _report_failure(self, task: Task, reason: str) -> None:
        """Tell the coordinator this round will bring no update, and why (its log's one line)."""
        self._finished_rounds[task.round_index] = "failed"
        failure = RoundFailure(
            device_id=self.device_id,
            round_index=task.round_index,
            reason=reason[:ROUND_FAILURE_REASON_CHARS],
        )
        self.link.publish(self.topics.device(self.device_id, "failed"), encode_message(failure))

    def _needed_blobs(self, task: Task) -> Dict[str, BlobManifest]:
        needed = {"global": task.global_state, **task.extra_blobs}
        init = task.init_state
        if init is not None and (
            init.digest != self._init_fetched or self.trainer.needs_init(task)
        ):
            needed["init"] = init
            self._init_fetched = init.digest
        return needed

    def _download_all(self, task: Task, counters: PhaseCounters) -> Dict[str, Payload]:
        """Fetch every blob the task names (verified; name → bytes, or the path of a spool file
        that lives until `_release_downloads`); resumes by re-asking for missing chunks."""
        manifests = self._needed_blobs(task)
        self._release_downloads()
        for manifest in manifests.values():
            download = Download(
                manifest,
                request=self.session.requester(manifest.digest),
                max_size_bytes=self.config.max_download_bytes,
                retry_after_s=self.config.transfer_retry_s,
                timeout_s=self.config.transfer_timeout_s,
            )
            self._downloads[manifest.digest] = download
            download.start()
        received_before = self.link.counters.bytes_received
        sent_before = self.link.counters.bytes_sent
        while not all(d.complete for d in self._downloads.values()):
            self._pump(timeout_s=0.2)
            self._check_superseded(task)
            for download in self._downloads.values():
                download.poll()
        counters.bytes_received += self.link.counters.bytes_received - received_before
        counters.bytes_sent += self.link.counters.bytes_sent - sent_before
        counters.extra["download_payload_bytes"] = float(
            sum(m.size_bytes for m in manifests.values())
        )
        counters.extra["duplicate_chunks"] = float(
            sum(d.duplicate_chunks for d in self._downloads.values())
        )
        return {name: self._downloads[m.digest].payload() for name, m in manifests.items()}

    def _release_downloads(self) -> None:
        for download in self._downloads.values():
            download.close()
        self._downloads = {}

    def _check_superseded(self, task: Task) -> None:
        pending = self._pending_task
        if pending is not None and pending.round_index > task.round_index:
            raise RoundAbandoned(f"round {pending.round_index} started")

    def _upload(self, task: Task, result: Any, counters: PhaseCounters) -> None:
        """Offer the update's tensors, announce them, and wait for the coordinator's ack."""
        manifest = self.blobs.offer_tensors(
            result.tensors, result.wire_dtype or task.update_dtype, task.chunk_size_bytes
        )
        update = Update(
            experiment=task.experiment,
            device_id=self.device_id,
            round_index=task.round_index,
            base_digest=task.global_state.digest,
            num_samples=result.num_samples,
            local_steps=result.local_steps,
            train_loss=result.train_loss,
            blob=manifest,
            metrics=result.metrics,
            profile=self._unsent_records + self.profiler.drain(),
        )
        self._unsent_records = list(update.profile)
        message = encode_message(update)
        refused_key = (task.round_index, message_digest(message))
        sent_before = self.link.counters.bytes_sent
        received_before = self.link.counters.bytes_received
        update_topic = self.topics.device(self.device_id, "update")
        deadline = time.monotonic() + self.config.transfer_timeout_s
        last_sent = 0.0
        try:
            while (task.round_index, manifest.digest) not in self._acks:
                if time.monotonic() > deadline:
                    raise TransferTimeout(f"no ack for round {task.round_index}")
                if time.monotonic() - last_sent > self.config.ack_retry_s:
                    self.link.publish(update_topic, message)
                    last_sent = time.monotonic()
                self._pump(timeout_s=0.1)
                self._check_superseded(task)
                if refused_key in self._nacks:
                    raise RoundAbandoned(self._nacks[refused_key].reason)
        finally:
            self.blobs.withdraw(manifest.digest)
            counters.bytes_sent += self.link.counters.bytes_sent - sent_before
            counters.bytes_received += self.link.counters.bytes_received - received_before
        self._unsent_records = []
        counters.extra["update_payload_bytes"] = float(manifest.size_bytes)

    def _publish_profile(self, round_index: int) -> None:
        """Send what the last update could not carry (its own upload phase); kept until the
        next acknowledged update carries it again, the coordinator drops duplicates."""
        self._unsent_records.extend(self.profiler.drain())
        if self._unsent_records:
            batch = ProfileBatch(
                device_id=self.device_id, round_index=round_index, records=self._unsent_records
            )
            self.link.publish(self.topics.device(self.device_id, "profile"), encode_message(batch))
