"""The checks that refuse what a device sends before it touches the run: who sent it, whether
that device joined, whether its profile records are about itself and a started round, and
whether an upload's tensors are what the round expects. Each raises ProtocolError (its code is
the nack's); `coordinator/inbound.py` answers with the nack.
"""

from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Set, Tuple

from jetfed.edge.errors import ProtocolError
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.edge.tensorfile import INDEX_DTYPES, UPDATE_DTYPES, Payload, TensorFile


def check_sender(device_id: str, claimed: str) -> None:
    """The device a message names must be the one whose topic (hence account) carried it."""
    if claimed != device_id:
        raise ProtocolError(
            f"device_id {claimed!r} inside the message does not match the topic",
            "sender_mismatch",
        )


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


def profile_key(record: PhaseRecord) -> Tuple[str, int, str, float]:
    return (record.device_id, record.round_index, record.phase, record.start_unix_s)


def checked_update_tensors(
    payload: Payload,
    spec: Mapping[str, Tuple[int, ...]],
    check_update: Callable[[TensorFile], None],
    max_update_norm: Optional[float],
) -> TensorFile:
    """An upload's tensors (in memory, or its spool file), refused unless they have exactly
    `spec`'s names and shapes, pass the strategy's `check_update` and stay within
    `aggregation.max_update_norm`."""
    try:
        tensors = TensorFile(payload, spec, (*UPDATE_DTYPES, *INDEX_DTYPES))
        check_update(tensors)
    except ProtocolError as exc:
        raise ProtocolError(str(exc), exc.code or "invalid_tensors") from None
    if max_update_norm is not None and tensors.l2_norm > max_update_norm:
        raise ProtocolError(
            f"update L2 norm {tensors.l2_norm:.4g} exceeds aggregation.max_update_norm="
            f"{max_update_norm:g}",
            code="update_norm_too_large",
        )
    return tensors
