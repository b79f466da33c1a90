"""LoRA uploads that do not fit what their device was asked for are refused by the Intake with
a nack naming the update and its code, and nothing is counted twice: factors at another rank
than the device's assignment, B without A under fedavg, an A tensor under ffa."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from jetfed.coordinator.strategies.lowrank import spec_at_rank
from jetfed.edge.tensor_codec import tensor_spec
from jetfed.edge.transfer import BlobServer
from jetfed.edge.wire import (
    DeviceAssignment,
    ModelRef,
    Task,
    TrainingConfig,
    Update,
    encode_message,
)
from tests.test_inbound import Wire, deliver, joined_intake

A, B = "l.lora_A.default.weight", "l.lora_B.default.weight"
RUN_STATE = {A: torch.zeros(8, 6), B: torch.zeros(5, 8)}
"""rank 8 on a non-square 5 × 6 layer."""


def factors(rank: int, names: Tuple[str, ...] = (A, B)) -> Dict[str, torch.Tensor]:
    shapes = {A: (rank, 6), B: (5, rank)}
    return {name: torch.ones(shapes[name]) for name in names}


class Round:
    """An Intake collecting one round from dev-0 (assigned rank 4) and dev-1 (the run's rank)."""

    def __init__(self, tmp_path: Path, spec: Dict[str, Tuple[int, ...]]) -> None:
        self.intake, self.wire, self.topics, blobs = joined_intake(tmp_path, "lb", spec)
        run_state = {name: t for name, t in RUN_STATE.items() if name in spec}
        small = {name: t[:4] if name == A else t[:, :4] for name, t in run_state.items()}
        now = time.time()
        self.task = Task(
            experiment="lb",
            round_index=0,
            method="lora",
            model=ModelRef(name_or_path="minilm", num_labels=2),
            training=TrainingConfig(),
            selected_devices=["dev-0", "dev-1"],
            global_state=blobs.offer_tensors(run_state),
            assignments={
                "dev-0": DeviceAssignment(
                    method_config={"rank": 4}, global_state=blobs.offer_tensors(small)
                )
            },
            issued_unix_s=now,
            deadline_unix_s=now + 60,
        )
        self.intake.open_round(self.task, {"dev-0": spec_at_rank(spec, 4)})

    def send(self, device_id: str, tensors: Dict[str, torch.Tensor]) -> Optional[str]:
        """Announce and deliver an update; the nack code, or None when it was acked."""
        sent_before = len(self.wire.sent)
        device = Wire()
        blobs = BlobServer(device.publish, 1024)
        update = Update(
            experiment="lb",
            device_id=device_id,
            round_index=0,
            base_digest=self.task.for_device(device_id).global_state.digest,
            num_samples=4,
            local_steps=1,
            train_loss=0.5,
            blob=blobs.offer_tensors(tensors),
        )
        self.intake.dispatch(self.topics.device(device_id, "update"), encode_message(update))
        fresh = Wire()
        fresh.sent = self.wire.sent[sent_before:]
        deliver(self.intake, fresh, self.topics, device_id, blobs)
        for topic, payload in device.sent:
            self.intake.dispatch(topic, payload)
        fresh.sent = self.wire.sent[sent_before:]
        nacks: List[Dict[str, object]] = fresh.leaf("nack")
        if nacks:
            assert nacks[-1]["digest"] is not None and nacks[-1]["round_index"] == 0
            return str(nacks[-1]["code"])
        assert fresh.leaf("ack"), "neither acked nor nacked"
        return None


def test_an_update_at_the_wrong_rank_for_its_device_is_refused(tmp_path: Path) -> None:
    collecting = Round(tmp_path, tensor_spec(RUN_STATE))
    assert collecting.send("dev-0", factors(8)) == "invalid_tensors"  # the run's, not its own
    assert collecting.send("dev-1", factors(4)) == "invalid_tensors"
    assert collecting.send("dev-0", factors(4)) is None
    assert collecting.send("dev-0", factors(8)) == "conflicting_update"
    assert collecting.send("dev-1", factors(8)) is None
    accepted = collecting.intake.close_round()
    assert [a.update.device_id for a in accepted] == ["dev-0", "dev-1"]
    assert [tuple(a.tensors[A].shape) for a in accepted] == [(4, 6), (8, 6)]
    collecting.intake.release_round()


@pytest.mark.parametrize(
    ("spec_names", "sent_names"),
    [((A, B), (B,)), ((B,), (A, B))],
    ids=["b_only_under_fedavg", "a_tensor_under_ffa"],
)
def test_factors_the_strategy_does_not_take_are_refused(
    tmp_path: Path, spec_names: Tuple[str, ...], sent_names: Tuple[str, ...]
) -> None:
    spec = {name: shape for name, shape in tensor_spec(RUN_STATE).items() if name in spec_names}
    collecting = Round(tmp_path, spec)
    assert collecting.send("dev-1", factors(8, sent_names)) == "invalid_tensors"
    assert collecting.send("dev-1", factors(8, spec_names)) is None
    (accepted,) = collecting.intake.close_round()
    assert set(accepted.tensors) == set(spec_names)
    collecting.intake.release_round()
