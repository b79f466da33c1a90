"""`assignment:`: each device's rank, batch size and local steps from its hello (memory,
accelerator, power mode, JetPack) and its measured speed; a device with too little memory for
any rank is refused with one log line."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from jetfed.coordinator.assignment import (
    AssignmentPolicy,
    AssignmentSection,
    Refused,
    memory_estimator,
)
from jetfed.coordinator.config import parse_config
from jetfed.coordinator.records import DeviceAssignment
from jetfed.edge.errors import UserError
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.edge.wire import Hello, ModelRef

ESTIMATE = memory_estimator(
    "lora", {"rank": 16}, ModelRef(name_or_path="minilm", num_labels=2, max_length=32)
)
FRACTION = 0.8


def hello(device_id: str, memory_bytes: float, mode: str = "MAXN", jetpack: int = 6) -> Hello:
    return Hello(
        device_id=device_id,
        jetfed_version="0",
        hostname=device_id,
        machine="aarch64",
        accelerator="cuda",
        memory_total_bytes=int(memory_bytes),
        context={"nvpmodel_mode": mode, "jetpack_major": jetpack},
    )


def just_fits(rank: int, batch: int) -> float:
    """Memory whose usable share just holds (rank, batch) on CUDA."""
    return ESTIMATE(rank, batch, True) / FRACTION + 1


def train_record(device_id: str, duration_s: float, steps: int) -> PhaseRecord:
    return PhaseRecord(
        experiment="a",
        device_id=device_id,
        round_index=0,
        phase="train",
        start_unix_s=1e9,
        end_unix_s=1e9 + duration_s,
        duration_s=duration_s,
        extra={"steps": float(steps)},
    )


def test_a_fleet_gets_the_largest_rank_its_memory_and_speed_allow(
    minilm_path: str, caplog: Any
) -> None:
    settings = AssignmentSection(
        ranks=[4, 16, 8], batch_sizes=[8, 16], memory_fraction=FRACTION, round_budget_s=1.0
    )
    policy = AssignmentPolicy(settings, ESTIMATE, 16, local_steps=50, round_budget_s=600)
    assert ESTIMATE(4, 8, True) < ESTIMATE(8, 8, True) < ESTIMATE(16, 8, True)
    fleet = {
        "agx": hello("agx", 64 << 30),
        "nx": hello("nx", just_fits(16, 8), mode="15W"),  # not 16 × batch 16
        "nano": hello("nano", just_fits(8, 8), mode="7W", jetpack=5),  # not rank 16
        "tiny": hello("tiny", 64 << 20),
    }
    caplog.set_level(logging.INFO)
    for _ in range(2):  # a refusal is logged once, not every round
        decisions = policy.assign(sorted(fleet), fleet)
    assert [line for line in caplog.messages if "assignment.refused" in line] == [
        next(line for line in caplog.messages if "assignment.refused" in line)
    ]
    assert isinstance(decisions["tiny"], Refused) and "GiB usable" in str(decisions["tiny"])
    chosen = {
        d: (a.rank, a.batch_size, a.local_steps)
        for d, a in decisions.items()
        if isinstance(a, DeviceAssignment)
    }
    assert chosen == {"agx": (16, 16, 50), "nano": (8, 8, 50), "nx": (16, 8, 50)}
    assert "7W, JetPack 5" in decisions["nano"].reason
    assert "speed not measured" in decisions["nano"].reason

    # measured: the AGX at 0.0125 s per sample-step, the NX at 0.125
    policy.observe(
        [train_record("agx", 2.0, 10), train_record("nx", 10.0, 10)], {"agx": 16, "nx": 8}
    )
    decisions = policy.assign(sorted(fleet), fleet)
    assert decisions["agx"].local_steps == 5  # 1 s / (0.0125 s × 16)
    assert decisions["nx"].local_steps == 1  # one step still runs
    assert decisions["nano"].local_steps == 50  # unmeasured: the configured budget
    assert "5 steps × 0.2 s measured = 1 s (budget 1 s)" in decisions["agx"].reason


def test_pinned_devices_and_config_errors(tmp_path: Any) -> None:
    settings = AssignmentSection(ranks=[8], devices={"dev-0": {"rank": 4, "local_steps": 3}})
    policy = AssignmentPolicy(settings, ESTIMATE, 16, local_steps=50, round_budget_s=600)
    pinned = policy.decide(hello("dev-0", 1))
    assert (pinned.rank, pinned.batch_size, pinned.local_steps) == (4, 16, 3)
    raw = {"name": "a", "data": {"path": str(tmp_path)}, "assignment": {"rank": [4]}}
    with pytest.raises(UserError, match="assignment"):
        parse_config(raw)
