"""Checks on what devices send that go beyond each message's schema (edge/wire.py): who may
write profile records, and which records are plausible for this run."""

from __future__ import annotations

from typing import List, Set

from edge.errors import ProtocolError
from edge.telemetry.records import PhaseRecord


def check_joined(device_id: str, joined: Set[str], experiment: str, what: str) -> None:
    """Telemetry of any kind is taken only from a device that said hello in this experiment."""
    if device_id not in joined:
        raise ProtocolError(
            f"device {device_id} never said hello in {experiment}: its {what} is refused",
            "unknown_device",
        )


def check_profile_records(
    device_id: str,
    records: List[PhaseRecord],
    experiment: str,
    joined: Set[str],
    latest_round: int,
) -> None:
    """Records are stored only from a device that said hello in this experiment, about itself,
    this experiment and a round that has started: anything else is refused as a whole (a
    device never mixes), so profiles.jsonl holds only records of devices that joined."""
    check_joined(device_id, joined, experiment, "profile records")
    if any(r.device_id != device_id or r.experiment != experiment for r in records):
        raise ProtocolError("profile records name another device or experiment")
    future = [r.round_index for r in records if r.round_index > latest_round]
    if future:
        raise ProtocolError(
            f"profile records for round {max(future)}, which has not started (latest "
            f"{latest_round})"
        )
