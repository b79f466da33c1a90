"""The coordinator's round state machine, with checkpoint and resume.

Each round: wait for `min_clients` ready devices → select → publish the task (retained) and offer
the global state → collect updates until every selected device answered or the deadline passed →
aggregate if at least `min_clients` arrived → evaluate → export → checkpoint → metrics.

All protocol state is owned by the thread calling `run()`; paho's thread only queues inbound
messages and serves chunk requests. Every inbound message goes through
`jetfed.coordinator.inbound.Intake` (validation, acks, nacks); a bad one never changes accepted
state.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from operator import methodcaller
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

from jetfed.coordinator.assignment import AssignmentPolicy, Refused, memory_estimator
from jetfed.coordinator.config import (
    ExperimentConfig,
    causal_lm_config,
    config_digest,
    model_ref_of,
    resume_conflicts,
)
from jetfed.coordinator.inbound import Intake
from jetfed.coordinator.observer import RunObserver, notify
from jetfed.coordinator.records import (
    AggregationError,
    CheckpointState,
    DeviceAssignment,
    RoundMetrics,
)
from jetfed.coordinator.registry import DeviceRegistry
from jetfed.coordinator.rundir import RunDir
from jetfed.coordinator.strategies.base import (
    AcceptedUpdate,
    ServerContext,
    Strategy,
    make_strategy,
)
from jetfed.coordinator.strategies.lowrank import TensorSpec, spec_at_rank
from jetfed.coordinator.update_norm import update_norms
from jetfed.edge.data import load_task_split
from jetfed.edge.errors import UserError
from jetfed.edge.heap import release_freed_memory
from jetfed.edge.logs import log_event
from jetfed.edge.memlink import open_link
from jetfed.edge.methods.base import FederatedMethod, Tensors, get_method
from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.edge.tensorfile import TensorFile
from jetfed.edge.transfer import BlobServer
from jetfed.edge.wire import (
    Announcement,
    BlobManifest,
    Progress,
    Task,
    Topics,
    encode_message,
)
from jetfed.edge.wire import DeviceAssignment as WireAssignment

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
        self.observers: List[RunObserver] = []
        """Told what happens in the run (the live page); display only (coordinator/observer.py)."""
        self._stop = False
        if self.run_dir.exists() and not resume:
            raise UserError(
                f"run directory {self.run_dir.path} already exists: pass --resume to continue it "
                "or choose another experiment name"
            )
        self.causal = causal_lm_config(config)
        self.validation = self._load_validation()
        self.model_ref = model_ref_of(config, config.model.num_labels or self._num_labels())
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
        if self._saved_strategy_state:
            self.strategy.load_state(self._saved_strategy_state)
        self.global_state = self._held(self.global_state)
        self.expected = self.strategy.update_spec()
        release_freed_memory()  # what building the models and the initial state left
        self.assignment = self._assignment_policy()
        self._decisions: Dict[str, Any] = {}
        """This round's `assignment:` decision per eligible device (DeviceAssignment/Refused)."""
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
        self._announcements_settled = False

    # ------------------------------------------------------------------ setup

    def _load_validation(self) -> Any:
        data = self.config.data
        dataset = load_task_split(data.path, data.validation_split, self.causal)
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

    def _assignment_policy(self) -> Optional[AssignmentPolicy]:
        """The `assignment:` policy, after checking that the strategy federates its ranks."""
        section = self.config.assignment
        if section is None:
            return None
        run_rank = getattr(self.method.config, "rank", None)
        if run_rank is None:
            raise UserError(
                f"assignment: method {self.method.name} has no LoRA rank to assign (lora and "
                "federa have)"
            )
        ranks = {*section.ranks, *(pinned.rank for pinned in section.devices.values())}
        for rank in sorted(ranks - {run_rank}):
            self.strategy.device_state(self.global_state, rank)  # refuses what it cannot federate
        training = self.config.training
        return AssignmentPolicy(
            section,
            memory_estimator(self.method.name, self.config.method.settings(), self.model_ref),
            batch_size=training.batch_size,
            local_steps=training.local_steps,
            round_budget_s=self.config.rounds.deadline_s / 2,
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
        selected = self._select(round_index)
        task, offered = self._publish_task(round_index, selected, init_manifest)
        overhead_s = None if previous_done_s is None else time.monotonic() - previous_done_s
        self._collect(task)
        accepted = self.intake.close_round()
        metrics = RoundMetrics(
            round_index=round_index,
            status="skipped",
            method=self.method.name,
            devices=[a.update.device_id for a in accepted],
            client_indices=task.client_indices,
            num_selected=len(selected),
            num_aggregated=len(accepted),
            overhead_s=overhead_s,
            assignments={d: self._decisions[d] for d in selected if d in self._decisions},
            refused={d: str(v) for d, v in self._decisions.items() if isinstance(v, Refused)},
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
        assignments, specs, rank_states = self._device_assignments(round_index, selected)
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

    def _device_assignments(
        self, round_index: int, selected: List[str]
    ) -> Tuple[Dict[str, WireAssignment], Dict[str, TensorSpec], List[BlobManifest]]:
        """Each selected device's assignment for the task, the update spec of devices at
        another rank than the run's, and the global state offered at each such rank."""
        if self.assignment is None:
            return {}, {}, []
        run_rank = self.method.config.rank  # type: ignore[attr-defined]
        states: Dict[int, BlobManifest] = {}
        assignments: Dict[str, WireAssignment] = {}
        specs: Dict[str, TensorSpec] = {}
        for device_id in selected:
            decision: DeviceAssignment = self._decisions[device_id]
            rank = decision.rank or run_rank
            if rank != run_rank and rank not in states:
                state = self.strategy.device_state(self.global_state, rank)
                states[rank] = self.blobs.offer_tensors(state)
            if rank != run_rank:
                specs[device_id] = spec_at_rank(self.expected, rank)
            assignments[device_id] = WireAssignment(
                method_config={"rank": rank},
                batch_size=decision.batch_size,
                local_steps=decision.local_steps,
                global_state=states.get(rank),
            )
            log_event(
                logger,
                logging.INFO,
                "assignment.device",
                round_index=round_index,
                device_id=device_id,
                rank=rank,
                batch_size=decision.batch_size,
                local_steps=decision.local_steps,
                reason=decision.reason,
            )
        return assignments, specs, list(states.values())

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

    # ------------------------------------------------------------------ devices

    def _select(self, round_index: int) -> List[str]:
        """Wait for enough ready devices with a data shard, then pick this round's devices."""
        rounds = self.config.rounds
        partition = self.config.data.partition
        deadline = time.monotonic() + rounds.wait_for_devices_s
        eligible: List[str] = []
        wait_s = 0.0  # first what is already queued: between rounds the fleet is usually ready
        while True:
            self._pump(wait_s)
            wait_s = 0.2
            ready = self.registry.ready()
            if len(ready) >= rounds.min_clients and not self._announcements_settled:
                self._settle_announcements()
                continue
            # Indices (hence shards and seeds) go to every device ready once the announcements
            # settled, at once and in sorted id order, never in the order devices happened to
            # arrive: the mapping is a function of the fleet (or data.client_indices).
            if len(ready) >= rounds.min_clients:
                if partition.kind != "none":
                    self.registry.assign_indices(ready, partition.num_clients)
                else:
                    self.registry.assign_indices(ready, len(self.registry.devices) + 1)
            eligible = self._assignable([d for d in ready if d in self.registry.client_indices])
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

    def _assignable(self, devices: List[str]) -> List[str]:
        """`devices` less those `assignment:` refuses (each refusal logged once)."""
        if self.assignment is None:
            return devices
        records = [self.registry.devices[d] for d in devices]
        hellos = {r.device_id: r.hello for r in records if r.hello is not None}
        self._decisions = self.assignment.assign(sorted(hellos), hellos)
        return [d for d in devices if isinstance(self._decisions.get(d), DeviceAssignment)]

    def _settle_announcements(self, quiet_s: float = 0.3, cap_s: float = 3.0) -> None:
        """Once per process, at the first quorum: devices already waiting announce themselves as
        retained messages that arrive in bursts, so read until the broker has been quiet for
        `quiet_s`; the first selection (and the client indices) then sees all of them, not
        whichever came first."""
        self._announcements_settled = True
        give_up = time.monotonic() + cap_s
        while time.monotonic() < give_up:
            before = self.intake.messages_handled
            self._pump(quiet_s)
            if self.intake.messages_handled == before:
                return

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
            if self._only_offline_devices_missing(missing) or self._quorum_unreachable(selected):
                break
            self.intake.poll_transfers()

    def _quorum_unreachable(self, selected: Set[str]) -> bool:
        """So many selected devices reported failing that min_clients updates cannot arrive."""
        inbound = self.intake.round
        assert inbound is not None
        if len(selected) - len(inbound.failed) >= self.config.rounds.min_clients:
            return False
        log_event(
            logger,
            logging.WARNING,
            "round.closed_early",
            round_index=inbound.round_index,
            failed=",".join(sorted(inbound.failed)),
            reason=f"fewer than rounds.min_clients={self.config.rounds.min_clients} can answer",
        )
        return True

    def _only_offline_devices_missing(self, missing: Set[str]) -> bool:
        """Quorum is in and every missing device has been offline for the grace period: waiting
        for the deadline would only delay the round (dropped devices rejoin a later one)."""
        inbound = self.intake.round
        assert inbound is not None
        rounds = self.config.rounds
        if not missing or len(inbound.accepted) < rounds.min_clients:
            return False
        if inbound.transfers.keys() & missing:
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
        self.link.drain(self.intake.dispatch, timeout_s)
