"""Capability-aware assignment: each device's LoRA rank, batch size and local steps.

A real fleet mixes an AGX Orin 64 GB, an Orin NX 16 GB and an Orin Nano 8 GB at different power
modes; one rank, batch and step count for all either wastes the large devices or overruns the
small ones. With an `assignment:` section the coordinator decides, each round, per device:

1. memory: the largest rank of `ranks`, then the largest batch of `batch_sizes`, whose
   training-memory estimate (`jetfed.edge.memory_budget`, the same as `jetfed doctor`'s, on
   a CUDA device with the CUDA runtime) fits `memory_fraction` × the memory its hello
   reports. Nothing fits: the device is refused (one log line, recorded, left out of the
   selection), never a crashed round.
2. time: once the device has trained a round, its measured seconds per step per sample (its
   "train" phase record: duration / (steps × batch)) predicts this round's steps:
   local_steps = min(training.local_steps, ⌊round_budget_s / (s per sample·step × batch)⌋),
   at least 1, so every device finishes its local round within the budget. Power mode and
   JetPack (from the hello) are shown in the reason: their effect on speed is measured, not
   guessed.

`devices:` pins a device's values (the policy is then not asked). The decision and its reason
are logged and recorded per round in metrics.jsonl (`assignments`, `refused`). Ranks other than
`method.rank` need a strategy that federates mixed ranks (`flexlora`); `method.rank` is the
global adapter's rank, the largest allowed.

    assignment:
      ranks: [16, 8, 4]
      batch_sizes: [16, 8]
      round_budget_s: 120
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field

from jetfed.coordinator.records import DeviceAssignment
from jetfed.edge.logs import log_event
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.edge.wire import Hello, ModelRef

logger = logging.getLogger(__name__)

GIB = float(1 << 30)
MemoryEstimate = Callable[[int, int, bool], int]
"""(rank, batch size, cuda) → bytes one local round needs."""


class PinnedDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(ge=1, le=4096)
    batch_size: Optional[int] = Field(default=None, ge=1, le=4096)
    local_steps: Optional[int] = Field(default=None, ge=1)


class AssignmentSection(BaseModel):
    """The experiment's `assignment:` section (module doc)."""

    model_config = ConfigDict(extra="forbid")

    ranks: List[int] = Field(min_length=1)
    """Candidate LoRA ranks; each device gets the largest that fits."""
    batch_sizes: Optional[List[int]] = Field(default=None, min_length=1)
    """Candidate batch sizes (largest that fits at the chosen rank); None: training.batch_size."""
    memory_fraction: float = Field(default=0.8, gt=0, le=1)
    """Share of the reported memory a round may use (the OS and other processes keep the rest)."""
    round_budget_s: Optional[float] = Field(default=None, gt=0)
    """Seconds of local training a device may take; None: half of rounds.deadline_s."""
    devices: Dict[str, PinnedDevice] = Field(default_factory=dict)


class Refused(Exception):
    """No candidate fits this device; the message says why."""


def memory_estimator(method: str, settings: Mapping[str, Any], model: ModelRef) -> MemoryEstimate:
    """`jetfed doctor`'s estimate at any rank and batch (a meta model per call)."""
    from jetfed.edge.memory_budget import estimate_training_memory

    def estimate(rank: int, batch_size: int, cuda: bool) -> int:
        return estimate_training_memory(
            model.name_or_path,
            method,
            batch_size,
            model.max_length,
            num_labels=model.num_labels,
            method_config={**settings, "rank": rank},
            cuda=cuda,
            gradient_checkpointing=model.gradient_checkpointing,
        ).total_bytes

    return estimate


class AssignmentPolicy:
    """Decides each device's rank, batch and steps (module doc); remembers measured speeds."""

    def __init__(
        self,
        settings: AssignmentSection,
        estimate: MemoryEstimate,
        batch_size: int,
        local_steps: Optional[int],
        round_budget_s: float,
    ) -> None:
        self.settings = settings
        self.ranks = sorted(set(settings.ranks), reverse=True)
        self.batch_sizes = sorted(set(settings.batch_sizes or [batch_size]), reverse=True)
        self.needed_bytes = {
            (rank, batch, cuda): estimate(rank, batch, cuda)
            for rank in self.ranks
            for batch in self.batch_sizes
            for cuda in (False, True)
        }
        """Every estimate, made once at start: never mid-round (a meta model per call) and
        never while another thread of the process builds a model."""
        self.local_steps = local_steps
        self.round_budget_s = settings.round_budget_s or round_budget_s
        self.sample_step_s: Dict[str, float] = {}
        """Per device: measured seconds per step per sample of its latest round."""
        self._logged_refusals: Dict[str, str] = {}

    def decide(self, hello: Hello) -> DeviceAssignment:
        """This round's rank, batch size and steps for the device, or `Refused`."""
        pinned = self.settings.devices.get(hello.device_id)
        if pinned is not None:
            batch = pinned.batch_size or self.batch_sizes[0]
            steps = pinned.local_steps or self.local_steps
            return DeviceAssignment(
                rank=pinned.rank, batch_size=batch, local_steps=steps, reason="pinned"
            )
        cuda = hello.accelerator == "cuda"
        usable = self.settings.memory_fraction * hello.memory_total_bytes
        for rank in self.ranks:
            for batch in self.batch_sizes:
                needed = self.needed_bytes[(rank, batch, cuda)]
                if needed <= usable:
                    steps, timing = self._steps(hello.device_id, batch)
                    reason = (
                        f"rank {rank} batch {batch}: needs {needed / GIB:.2f} GiB of "
                        f"{usable / GIB:.2f} GiB usable ({hello.accelerator}, "
                        f"{describe_hello(hello)}); {timing}"
                    )
                    return DeviceAssignment(
                        rank=rank, batch_size=batch, local_steps=steps, reason=reason
                    )
        smallest = self.needed_bytes[(self.ranks[-1], self.batch_sizes[-1], cuda)]
        raise Refused(
            f"rank {self.ranks[-1]} batch {self.batch_sizes[-1]} needs {smallest / GIB:.2f} GiB; "
            f"{usable / GIB:.2f} GiB usable ({self.settings.memory_fraction:g} of "
            f"{hello.memory_total_bytes / GIB:.2f} GiB reported)"
        )

    def _steps(self, device_id: str, batch: int) -> Tuple[Optional[int], str]:
        """Steps that fit the round budget at the device's measured speed, and why."""
        per_sample = self.sample_step_s.get(device_id)
        if per_sample is None or self.local_steps is None:
            return self.local_steps, "speed not measured yet"
        step_s = per_sample * batch
        fitting = max(1, math.floor(self.round_budget_s / step_s))
        steps = min(self.local_steps, fitting)
        return steps, (
            f"{steps} steps × {step_s:.3g} s measured = {steps * step_s:.3g} s "
            f"(budget {self.round_budget_s:g} s)"
        )

    def assign(self, devices: List[str], hellos: Mapping[str, Hello]) -> Dict[str, Any]:
        """{device: DeviceAssignment or Refused} for `devices`; a refusal is logged once per
        device and reason."""
        decisions: Dict[str, Any] = {}
        for device_id in devices:
            try:
                decisions[device_id] = self.decide(hellos[device_id])
            except Refused as refused:
                decisions[device_id] = refused
                if self._logged_refusals.get(device_id) != str(refused):
                    self._logged_refusals[device_id] = str(refused)
                    log_event(
                        logger,
                        logging.WARNING,
                        "assignment.refused",
                        device_id=device_id,
                        reason=refused,
                    )
        return decisions

    def observe(self, records: List[PhaseRecord], batch_sizes: Mapping[str, int]) -> None:
        """Learn each device's speed from its round's "train" records (batch as assigned)."""
        for record in records:
            steps = record.extra.get("steps", 0.0)
            batch = batch_sizes.get(record.device_id)
            if record.phase == "train" and steps > 0 and batch:
                self.sample_step_s[record.device_id] = record.duration_s / (steps * batch)


def describe_hello(hello: Hello) -> str:
    """Power mode and JetPack as the hello reports them (`DeviceContext`)."""
    context = hello.context
    mode = context.get("nvpmodel_mode") or "power mode unknown"
    jetpack = context.get("jetpack_major")
    return f"{mode}, JetPack {jetpack}" if jetpack else str(mode)
