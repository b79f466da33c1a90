"""The coordinator's round state machine, with checkpoint and resume.

Each round: wait for `min_clients` ready devices → select → publish the task (retained) and offer
the global state → collect updates until every selected device answered or the deadline passed →
aggregate if at least `min_clients` arrived → evaluate → export → checkpoint → metrics.

All protocol state is owned by the thread calling `run()`; paho's thread only queues inbound
messages and serves chunk requests. Every inbound message goes through
`jetfed.coordinator.inbound.Intake` (validation, acks, nacks); a bad one never changes accepted
state. Which devices take part, and how long they are waited for: coordinator/selection.py.
"""

from __future__ import annotations

import logging
import threading
import time
from operator import methodcaller
from typing import TYPE_CHECKING, Callable, List, Mapping, Optional, Tuple

from jetfed.coordinator.assignment import Refused
from jetfed.coordinator.config import (
    ExperimentConfig,
    causal_lm_config,
    config_digest,
    model_ref_of,
)
from jetfed.coordinator.inbound import Intake
from jetfed.coordinator.observer import RunObserver, notify
from jetfed.coordinator.records import (
    AggregationError,
    CheckpointState,
    RoundMetrics,
    device_totals,
)
from jetfed.coordinator.registry import DeviceRegistry
from jetfed.coordinator.run_start import load_validation, num_labels, start_run
from jetfed.coordinator.rundir import RunDir
from jetfed.coordinator.selection import Selection, assignment_policy
from jetfed.coordinator.strategies.base import (
    AcceptedUpdate,
    ServerContext,
    Strategy,
    make_strategy,
)
from jetfed.coordinator.update_norm import update_norms
from jetfed.edge.errors import UserError
from jetfed.edge.heap import release_freed_memory
from jetfed.edge.logs import log_event
from jetfed.edge.memlink import open_link
from jetfed.edge.methods.base import FederatedMethod, Tensors, get_method
from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.tensorfile import TensorFile
from jetfed.edge.topics import Topics
from jetfed.edge.transfer import BlobServer
from jetfed.edge.wire import Announcement, BlobManifest, Progress, Task, encode_message

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEVICE_TO_COORDINATOR = (
    "status",
    "hello",
    "update",
    "profile",
    "progress",
    "failed",
    "telemetry",
    "want",
    "up/#",
    "exchange/up/#",
)
LAST_UPLOAD_RECORDS_WAIT_S = 5.0


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
        self.observers: List[RunObserver] = []
        """Told what happens in the run (the live page); display only (coordinator/observer.py)."""
        self._stop = False
        if self.run_dir.exists() and not resume:
            raise UserError(
                f"run directory {self.run_dir.path} already exists: pass --resume to continue it "
                "or choose another experiment name"
            )
        self.causal = causal_lm_config(config)
        self.validation = load_validation(config, self.causal)
        self.model_ref = model_ref_of(
            config, config.model.num_labels or num_labels(config, self.validation)
        )
        self.method: FederatedMethod = get_method(config.method.name)(
            config.method.settings(), self.model_ref
        )
        self.registry = DeviceRegistry(config.data.client_indices)
        start = start_run(config, self.method, self.run_dir, self.registry, resume)
        self.start_round = start.start_round
        self.wall_clock_offset_s = start.wall_clock_offset_s
        self.init = start.init
        from jetfed.edge.models import load_tokenizer, pick_device

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
                generation=config.evaluation,
            ),
        )
        if start.strategy_state:
            self.strategy.load_state(start.strategy_state)
        self.global_state = self._held(start.global_state)
        self.expected = self.strategy.update_spec()
        release_freed_memory()  # what building the models and the initial state left
        self.assignment = assignment_policy(
            config, self.method, self.strategy, self.global_state, self.model_ref
        )
        self._bytes_down = 0
        self._bytes_down_lock = threading.Lock()
        self.link = open_link(
            broker,
            client_id=f"jetfed-coordinator-{config.name}",
            subscriptions=[self.topics.all_devices(leaf) for leaf in DEVICE_TO_COORDINATOR],
            will=(self.topics.coordinator, b""),
            on_connected=self._announce,
        )
        self.blobs = BlobServer(
            self._publish_raw,
            config.transfer.chunk_size_bytes,
            background=self.link.serve_in_background,
        )
        self._started_unix_s = time.time()
        self.intake = Intake(
            config,
            self.topics,
            self.registry,
            self.run_dir,
            self.blobs,
            self.expected,
            publish=self.link.publish,
            publish_raw=self._publish_raw,
            on_exchange=self.strategy.on_exchange,
            check_update=self.strategy.check_update,
            tell_progress=self._tell_progress,
            observers=self.observers,
            start_round=self.start_round,
        )
        self.link.on_topic(self.intake.is_want, self.intake.serve_want)
        self.selection = Selection(
            config,
            self.registry,
            self.intake,
            self.assignment,
            pump=self._pump,
            stopped=lambda: self._stop,
        )

    # ------------------------------------------------------------------ paho thread

    def _announce(self) -> None:
        """On every (re)connect: the retained announcement devices that are not pinned to an
        experiment join by (cleared at the end of the run, or by the last will)."""
        announcement = Announcement(
            experiment=self.config.name, started_unix_s=self._started_unix_s
        )
        self.link.publish(self.topics.coordinator, encode_message(announcement), retain=True)

    def _publish_raw(self, topic: str, payload: bytes) -> None:
        """Counted as the round's traffic; called by the round loop and by blob serving (on
        paho's thread, the blob server's, or a virtual device's), hence the lock."""
        wire_bytes = self.link.publish(topic, payload)
        with self._bytes_down_lock:
            self._bytes_down += wire_bytes

    def _tell_progress(self, progress: Progress) -> None:
        if self.on_progress is not None:
            self.on_progress(progress)

    def _send_exchange(self, device_id: str, subtopic: str, payload: bytes) -> None:
        self._publish_raw(self.topics.device(device_id, f"exchange/down/{subtopic}"), payload)

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
        init_manifest: Optional[BlobManifest] = None
        if self.init is not None:
            init_manifest = self.blobs.offer_tensors(self.init)
        results: List[RoundMetrics] = []
        previous_done_s: Optional[float] = None
        try:
            for round_index in range(self.start_round, self.config.rounds.count):
                if self._stop:
                    break
                metrics = self._run_round(round_index, init_manifest, started_s, previous_done_s)
                previous_done_s = self.intake.round.last_accept_s if self.intake.round else None
                results.append(metrics)
                if self.on_round is not None:
                    self.on_round(metrics)
                self._notify(methodcaller("on_round", metrics))
            self._await_upload_records(LAST_UPLOAD_RECORDS_WAIT_S)
        finally:
            self.link.publish(self.topics.task, b"", retain=True)
            self.link.publish(self.topics.coordinator, b"", retain=True)
            self.link.wait_published(5)
            self.link.close()
            self._write_profile_tables()
            self._notify(lambda observer: observer.on_finished())
        return results

    def _notify(self, tell: Callable[[RunObserver], None]) -> None:
        notify(self.observers, tell)

    def _write_profile_tables(self) -> None:
        """The tables are a convenience derived from profiles.jsonl (kept whatever happens): a
        failure is one log line, never a failed run."""
        try:
            self.run_dir.write_profile_tables()
        except Exception as exc:  # pandas/pyarrow raise many types; the run itself is done
            error = f"{type(exc).__name__}: {exc}"
            log_event(logger, logging.ERROR, "profiles.tables_failed", error=error)

    def _await_upload_records(self, timeout_s: float) -> None:
        """A device reports a round's upload phase only once that upload was acknowledged (on
        its next update, or a profile message): wait briefly for the last round's ones."""
        inbound = self.intake.round
        if inbound is None or self._stop:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            records = self.intake.round_records.get(inbound.round_index, [])
            reported = {r.device_id for r in records if r.phase == "upload"}
            if set(inbound.accepted) <= reported:
                return
            self._pump(0.1)

    def _run_round(
        self,
        round_index: int,
        init_manifest: Optional[BlobManifest],
        started_s: float,
        previous_done_s: Optional[float],
    ) -> RoundMetrics:
        """select → task → collect → aggregate → evaluate/export → record."""
        round_start_s = time.monotonic()
        self._bytes_down = 0
        self.intake.bytes_up = 0
        selected = self.selection.select(round_index)
        task, offered = self._publish_task(round_index, selected, init_manifest)
        overhead_s = None if previous_done_s is None else time.monotonic() - previous_done_s
        self._collect(task)
        accepted = self.intake.close_round()
        decisions = self.selection.decisions
        metrics = RoundMetrics(
            round_index=round_index,
            status="skipped",
            method=self.method.name,
            devices=[a.update.device_id for a in accepted],
            client_indices=task.client_indices,
            num_selected=len(selected),
            num_aggregated=len(accepted),
            overhead_s=overhead_s,
            assignments={d: decisions[d] for d in selected if d in decisions},
            refused={d: str(v) for d, v in decisions.items() if isinstance(v, Refused)},
        )
        if self.assignment is not None:
            records = self.intake.round_records.get(round_index, [])
            self.assignment.observe(
                records, {d: a.batch_size for d, a in metrics.assignments.items()}
            )
        self._aggregate(metrics, accepted, task.global_state.digest)
        release_freed_memory()  # the aggregation's blocks and copies
        for digest in offered:
            self.blobs.withdraw(digest)
        self.intake.release_round()
        self._evaluate_and_export(metrics)
        self._record(metrics, round_start_s, started_s)
        return metrics

    def _publish_task(
        self, round_index: int, selected: List[str], init_manifest: Optional[BlobManifest]
    ) -> Tuple[Task, List[str]]:
        """Offer the global state (and the strategy's extra blobs), publish the retained task
        and open the intake; returns the task and the digests to withdraw when the round ends."""
        extra = self.strategy.configure_round(round_index, self.global_state)
        global_manifest = self.blobs.offer_tensors(self.global_state)
        extra_manifests = {name: self.blobs.offer(data) for name, data in extra.items()}
        assignments, specs, rank_states = self.selection.device_assignments(
            round_index,
            selected,
            self.method,
            self.expected,
            lambda rank: self.blobs.offer_tensors(
                self.strategy.device_state(self.global_state, rank)
            ),
        )
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
            init_state=init_manifest,
            extra_blobs=extra_manifests,
            update_dtype=self.config.transfer.update_dtype,
            chunk_size_bytes=self.config.transfer.chunk_size_bytes,
            issued_unix_s=now,
            deadline_unix_s=now + self.config.rounds.deadline_s,
            min_clients=self.config.rounds.min_clients,
            live_telemetry=any(observer.wants_telemetry for observer in self.observers),
            assignments=assignments,
        )
        self.intake.open_round(task, specs)
        self.link.publish(self.topics.task, encode_message(task), retain=True)
        self._notify(lambda observer: observer.on_task(task))
        log_event(
            logger,
            logging.INFO,
            "round.task_published",
            round_index=round_index,
            devices=len(selected),
        )
        offered = [global_manifest, *extra_manifests.values(), *rank_states]
        return task, [manifest.digest for manifest in offered]

    def _aggregate(
        self, metrics: RoundMetrics, accepted: List[AcceptedUpdate], offered_digest: str
    ) -> None:
        """The strategy's next global state, if at least `min_clients` updates arrived.

        A state held in the evaluation model is overwritten in place; the step's norms then
        read the previous one from its offered blob (`offered_digest`, fp32: the same bits)."""
        if len(accepted) < self.config.rounds.min_clients:
            log_event(
                logger,
                logging.WARNING,
                "round.skipped",
                round_index=metrics.round_index,
                accepted=len(accepted),
                min_clients=self.config.rounds.min_clients,
            )
            return
        t0 = time.monotonic()
        self.strategy.layer_errors = {}
        previous: Mapping[str, torch.Tensor] = self.global_state
        if self.strategy.state_in_eval_model:
            previous = TensorFile(self.blobs.payload(offered_digest))
            self.strategy.aggregate_into(metrics.round_index, self.global_state, accepted)
        else:
            self.global_state = self.strategy.aggregate(
                metrics.round_index, self.global_state, accepted
            )
        metrics.aggregate_s = time.monotonic() - t0
        facts = self.method.run_facts()
        metrics.extra.update(facts)
        metrics.extra.update(
            update_norms(previous, self.global_state, facts.get("lora_scaling", 1.0))
        )
        metrics.aggregation_error = AggregationError.of(self.strategy.layer_errors)
        if metrics.aggregation_error is not None:
            log_event(
                logger,
                logging.INFO,
                "round.aggregation_error",
                round_index=metrics.round_index,
                mean=f"{metrics.aggregation_error.mean:.3g}",
                worst_layer=metrics.aggregation_error.worst_layer,
                worst=f"{metrics.aggregation_error.worst:.3g}",
            )
        metrics.status = "aggregated"
        total = sum(a.update.num_samples for a in accepted)
        metrics.train_loss = (
            sum(a.update.train_loss * a.update.num_samples for a in accepted) / total
        )

    def _held(self, state: Tensors) -> Tensors:
        """The global state as the coordinator keeps it: as the evaluation model's parameters
        where the strategy allows, so that a full model is held once, not twice."""
        if not self.strategy.state_in_eval_model:
            return state
        return self.method.state_in_model(self.strategy.ctx.eval_model, state)

    def _evaluate_and_export(self, metrics: RoundMetrics) -> None:
        t0 = time.monotonic()
        evaluation = dict(self.strategy.evaluate(self.global_state))
        metrics.eval_s = time.monotonic() - t0
        self.strategy.export(self.global_state, str(self.run_dir.adapter_dir(metrics.round_index)))
        metrics.accuracy = evaluation.pop("accuracy", None)
        metrics.eval_loss = evaluation.pop("eval_loss", None)
        metrics.extra.update(evaluation)

    def _record(self, metrics: RoundMetrics, round_start_s: float, started_s: float) -> None:
        """Round totals, the checkpoint, then the metrics line (a resumed run never repeats a
        round that has its line)."""
        records = self.intake.round_records.get(metrics.round_index, [])
        metrics.extra.update(device_totals(records))
        metrics.bytes_up = self.intake.bytes_up
        metrics.bytes_down = self._bytes_down
        metrics.round_s = time.monotonic() - round_start_s
        metrics.wall_clock_s = time.monotonic() - started_s
        self.save_checkpoint(metrics.round_index, metrics.wall_clock_s)
        # profiles.parquet/.csv are rewritten from every record at the end of run(), not here:
        # per round that cost ~100 ms with 10 devices, growing with devices × rounds.
        self.run_dir.append_metrics(metrics)

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

    def _collect(self, task: Task) -> None:
        """Until every selected device's update is accepted, or the deadline passes."""
        inbound = self.intake.round
        assert inbound is not None
        deadline_s = time.monotonic() + (task.deadline_unix_s - time.time())
        selected = set(task.selected_devices)
        while (
            set(inbound.accepted) | set(inbound.failed) != selected
            and time.monotonic() < deadline_s
            and not self._stop
        ):
            self._pump(0.1)
            missing = selected - set(inbound.accepted) - set(inbound.failed)
            if self.selection.only_offline_devices_missing(missing):
                break
            if self.selection.quorum_unreachable(selected):
                break
            self.intake.poll_transfers()

    def _pump(self, timeout_s: float) -> None:
        self.link.drain(self.intake.dispatch, timeout_s)
