"""Will training fit a device you are not on? The memory of Jetson Orin modules, and one
fits / does-not-fit row per device with the largest batch that fits.

A Jetson's CPU and GPU share its DRAM, so the budget is the module's memory less what is never
the training process's: the firmware carve-outs (GPU, video, camera, secure world) and an idle
headless JetPack 6 (Ubuntu, the jtop service, jetfed's agent before it imports torch).
The `*_RESERVED_BYTES` below are assumptions of that order, not measurements; `free -b`'s
`available` on the idle device, given as `--device-memory-gb`, replaces it with yours.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

from pydantic import BaseModel, ConfigDict

from jetfed.edge.memory_budget import MemoryEstimate, TrainingBudget

GB = 10**9
GIB = 1 << 30
MAX_BATCH = 1024
"""The largest batch searched; a device that fits it is reported as `≥ MAX_BATCH`."""
PeakAt = Callable[[int], int]
"""Estimated peak bytes at a batch size."""
NANO_NX_RESERVED_BYTES = int(1.6 * GB)
AGX_RESERVED_BYTES = int(2.7 * GB)
"""The AGX modules are given more: larger carve-outs for the GPU and engines (also assumed)."""


class TargetDevice(BaseModel):
    """A device by its memory: what the module has and what training may never use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    total_bytes: int
    reserved_bytes: int = 0

    @property
    def usable_bytes(self) -> int:
        return self.total_bytes - self.reserved_bytes

    def label(self) -> str:
        if not self.reserved_bytes:
            return self.name
        return (
            f"{self.name} ({self.total_bytes / GB:.1f} GB − "
            f"{self.reserved_bytes / GB:.1f} GB OS/carve-outs)"
        )


def _orin(name: str, gib: int, reserved_bytes: int) -> TargetDevice:
    return TargetDevice(name=name, total_bytes=gib * GIB, reserved_bytes=reserved_bytes)


ORIN_MODULES: Dict[int, TargetDevice] = {
    8: _orin("Orin Nano 8GB", 8, NANO_NX_RESERVED_BYTES),
    16: _orin("Orin NX 16GB", 16, NANO_NX_RESERVED_BYTES),
    32: _orin("AGX Orin 32GB", 32, AGX_RESERVED_BYTES),
    64: _orin("AGX Orin 64GB", 64, AGX_RESERVED_BYTES),
}


def memory_device(gb: float) -> TargetDevice:
    """`--device-memory-gb`: memory the training process may use, taken as given."""
    return TargetDevice(name=f"{gb:g} GB for training", total_bytes=int(gb * GB))


class TargetRow(BaseModel):
    """One device's answer at the asked batch; `largest_batch` 0 means not even batch 1."""

    model_config = ConfigDict(extra="forbid")

    device: TargetDevice
    peak_bytes: int
    fits: bool
    largest_batch: int

    @property
    def headroom_bytes(self) -> int:
        return self.device.usable_bytes - self.peak_bytes


class TargetPlan(BaseModel):
    """The estimate at the asked batch and one row per device."""

    model_config = ConfigDict(extra="forbid")

    estimate: MemoryEstimate
    rows: List[TargetRow]


def plan_targets(
    budget: TrainingBudget,
    devices: List[TargetDevice],
    batch_size: int,
    response_tokens: Optional[int] = None,
    gradient_checkpointing: bool = False,
) -> TargetPlan:
    """Jetsons train on CUDA: the CUDA runtime is counted in every peak."""

    def peak(batch: int) -> int:
        return budget.estimate(batch, True, response_tokens, gradient_checkpointing).total_bytes

    estimate = budget.estimate(batch_size, True, response_tokens, gradient_checkpointing)
    rows = [
        TargetRow(
            device=device,
            peak_bytes=estimate.total_bytes,
            fits=estimate.total_bytes < device.usable_bytes,
            largest_batch=largest_batch(peak, device.usable_bytes),
        )
        for device in devices
    ]
    return TargetPlan(estimate=estimate, rows=rows)


def largest_batch(peak: PeakAt, usable_bytes: int) -> int:
    """The largest batch ≤ MAX_BATCH whose peak is below `usable_bytes`, 0 if none (the peak
    grows with the batch): doubling, then bisection."""
    fits, fails = 0, 1
    while fails <= MAX_BATCH and peak(fails) < usable_bytes:
        fits, fails = fails, fails * 2
    fails = min(fails, MAX_BATCH + 1)
    while fails - fits > 1:
        middle = (fits + fails) // 2
        if peak(middle) < usable_bytes:
            fits = middle
        else:
            fails = middle
    return fits
