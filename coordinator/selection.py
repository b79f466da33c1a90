"""Which devices take part in a round, on what terms, and for how long they are waited for.

Before a round: wait for a quorum of ready devices with a data shard, let `assignment:` refuse
those no rank fits, pick the round's devices (seeded by the run's seed and the round), and turn
each one's assignment into what its task says. During the round: tell the round loop when the
devices still missing are no longer worth waiting for (failed, or offline past the grace).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from jetfed.coordinator.assignment import AssignmentPolicy, memory_estimator
from jetfed.coordinator.config import ExperimentConfig
from jetfed.coordinator.inbound import Intake
from jetfed.coordinator.records import DeviceAssignment
from jetfed.coordinator.registry import DeviceRegistry
from jetfed.coordinator.strategies.base import Strategy
from jetfed.coordinator.strategies.lowrank import TensorSpec, spec_at_rank
from jetfed.edge.errors import UserError
from jetfed.edge.logs import log_event
from jetfed.edge.methods.base import FederatedMethod, Tensors
from jetfed.edge.wire import BlobManifest, ModelRef
from jetfed.edge.wire import DeviceAssignment as WireAssignment

logger = logging.getLogger(__name__)


def assignment_policy(
    config: ExperimentConfig,
    method: FederatedMethod,
    strategy: Strategy,
    global_state: Tensors,
    model_ref: ModelRef,
) -> Optional[AssignmentPolicy]:
    """The `assignment:` policy, after checking that the strategy federates its ranks."""
    section = config.assignment
    if section is None:
        return None
    run_rank = getattr(method.config, "rank", None)
    if run_rank is None:
        raise UserError(
            f"assignment: method {method.name} has no LoRA rank to assign (lora and federa have)"
        )
    ranks = {*section.ranks, *(pinned.rank for pinned in section.devices.values())}
    for rank in sorted(ranks - {run_rank}):
        strategy.device_state(global_state, rank)  # refuses what it cannot federate
    training = config.training
    return AssignmentPolicy(
        section,
        memory_estimator(method.name, config.method.settings(), model_ref),
        batch_size=training.batch_size,
        local_steps=training.local_steps,
        round_budget_s=config.rounds.deadline_s / 2,
    )


class Selection:
    """The round loop's view of the fleet: see the module docstring."""

    def __init__(
        self,
        config: ExperimentConfig,
        registry: DeviceRegistry,
        intake: Intake,
        assignment: Optional[AssignmentPolicy],
        pump: Callable[[float], None],
        stopped: Callable[[], bool],
    ) -> None:
        """`pump` handles inbound messages for up to the given seconds; `stopped` says the run
        was asked to stop (selection then returns what it has)."""
        self.config = config
        self.registry = registry
        self.intake = intake
        self.assignment = assignment
        self._pump = pump
        self._stopped = stopped
        self.decisions: Dict[str, Any] = {}
        """This round's `assignment:` decision per eligible device (DeviceAssignment/Refused)."""
        self._announcements_settled = False

    def select(self, round_index: int) -> List[str]:
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
            if len(eligible) >= rounds.min_clients or self._stopped():
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
        self.decisions = self.assignment.assign(sorted(hellos), hellos)
        return [d for d in devices if isinstance(self.decisions.get(d), DeviceAssignment)]

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

    def device_assignments(
        self,
        round_index: int,
        selected: List[str],
        method: FederatedMethod,
        expected: TensorSpec,
        offer_state_at: Callable[[int], BlobManifest],
    ) -> Tuple[Dict[str, WireAssignment], Dict[str, TensorSpec], List[BlobManifest]]:
        """Each selected device's assignment for the task, the update spec of devices at
        another rank than the run's, and the global state offered at each such rank
        (`offer_state_at`, once per rank)."""
        if self.assignment is None:
            return {}, {}, []
        run_rank = method.config.rank  # type: ignore[attr-defined]
        states: Dict[int, BlobManifest] = {}
        assignments: Dict[str, WireAssignment] = {}
        specs: Dict[str, TensorSpec] = {}
        for device_id in selected:
            decision: DeviceAssignment = self.decisions[device_id]
            rank = decision.rank or run_rank
            if rank != run_rank and rank not in states:
                states[rank] = offer_state_at(rank)
            if rank != run_rank:
                specs[device_id] = spec_at_rank(expected, rank)
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

    def quorum_unreachable(self, selected: Set[str]) -> bool:
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

    def only_offline_devices_missing(self, missing: Set[str]) -> bool:
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
