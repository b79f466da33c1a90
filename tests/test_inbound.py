"""jetfed.coordinator.inbound.Intake on its own: what devices send goes in through `dispatch`, what
it answers (acks, nacks, chunk requests) comes out of the publish callables. No broker needed:
the chunks an update is pulled with come from a device-side BlobServer, as on the wire."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

from jetfed.coordinator.config import parse_config
from jetfed.coordinator.inbound import Intake
from jetfed.coordinator.inbound_checks import check_sender
from jetfed.coordinator.registry import DeviceRegistry
from jetfed.coordinator.rundir import RunDir
from jetfed.edge.errors import ProtocolError
from jetfed.edge.tensorfile import TensorFile, refuse_index_tensors
from jetfed.edge.topics import Topics
from jetfed.edge.transfer import BlobServer
from jetfed.edge.wire import (
    Hello,
    ModelRef,
    Task,
    TrainingConfig,
    Update,
    encode_message,
    message_digest,
)

SPEC = {"w": (2, 3)}


class Wire:
    """What the intake published, by leaf of the device topic."""

    def __init__(self) -> None:
        self.sent: List[Tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes) -> int:
        self.sent.append((topic, payload))
        return len(payload)

    def leaf(self, leaf: str) -> List[Dict[str, object]]:
        return [json.loads(p) for t, p in self.sent if t.endswith("/" + leaf)]


def joined_intake(
    tmp_path: Path,
    experiment: str,
    spec: Dict[str, Tuple[int, ...]],
    check_update: Callable[[TensorFile], None] = refuse_index_tensors,
) -> Tuple[Intake, Wire, Topics, BlobServer]:
    """An Intake of `experiment` checking updates against `spec` (and with the strategy's
    `check_update`), with dev-0 and dev-1 joined; its wire, topics and the coordinator's blob
    server."""
    config = parse_config({"name": experiment, "data": {"path": str(tmp_path)}})
    topics = Topics(experiment)
    wire = Wire()
    run_dir = RunDir(tmp_path / "run")
    run_dir.create({})
    server_blobs = BlobServer(wire.publish, 1024)
    intake = Intake(
        config,
        topics,
        DeviceRegistry(),
        run_dir,
        server_blobs,
        spec,
        publish=wire.publish,
        publish_raw=wire.publish,
        on_exchange=lambda *_: None,
        tell_progress=lambda _: None,
        start_round=0,
        check_update=check_update,
    )
    for device_id in ("dev-0", "dev-1"):
        hello = Hello(
            device_id=device_id,
            jetfed_version="0",
            hostname="h",
            machine="x86_64",
            accelerator="cpu",
            memory_total_bytes=1 << 30,
        )
        intake.dispatch(topics.device(device_id, "hello"), encode_message(hello))
    return intake, wire, topics, server_blobs


@pytest.fixture
def intake(tmp_path: Path) -> Tuple[Intake, Wire, Task, Topics]:
    return opened_intake(tmp_path)


def opened_intake(
    tmp_path: Path, check_update: Callable[[TensorFile], None] = refuse_index_tensors
) -> Tuple[Intake, Wire, Task, Topics]:
    """`joined_intake` with round 0 open, dev-0 selected."""
    intake, wire, topics, server_blobs = joined_intake(tmp_path, "ib", SPEC, check_update)
    now = time.time()
    task = Task(
        experiment="ib",
        round_index=0,
        method="lora",
        model=ModelRef(name_or_path="minilm", num_labels=2),
        training=TrainingConfig(),
        selected_devices=["dev-0"],
        global_state=server_blobs.offer_tensors({"w": torch.zeros(2, 3)}),
        issued_unix_s=now,
        deadline_unix_s=now + 60,
    )
    intake.open_round(task)
    return intake, wire, task, topics


def announce(
    device_id: str,
    task: Task,
    blobs: BlobServer,
    round_index: int = 0,
    tensors: Optional[Dict[str, torch.Tensor]] = None,
) -> Update:
    return Update(
        experiment="ib",
        device_id=device_id,
        round_index=round_index,
        base_digest=task.global_state.digest,
        num_samples=4,
        local_steps=1,
        train_loss=0.5,
        blob=blobs.offer_tensors({"w": torch.ones(2, 3)} if tensors is None else tensors),
    )


def deliver(intake: Intake, wire: Wire, topics: Topics, device_id: str, blobs: BlobServer) -> None:
    """Serve the chunks the intake asked `device_id` for, into the intake."""
    for request in wire.leaf("pull"):
        blobs.serve(
            str(request["digest"]),
            list(request["indices"]),  # type: ignore[call-overload]
            lambda digest, index: topics.chunk(device_id, "up", digest, index),
        )


def test_an_update_is_pulled_validated_acked_and_a_resend_reacked(
    intake: Tuple[Intake, Wire, Task, Topics],
) -> None:
    inbox, wire, task, topics = intake
    device = Wire()
    blobs = BlobServer(device.publish, 1024)
    update = announce("dev-0", task, blobs)
    inbox.dispatch(topics.device("dev-0", "update"), encode_message(update))
    deliver(inbox, wire, topics, "dev-0", blobs)
    for topic, payload in device.sent:
        inbox.dispatch(topic, payload)
    assert [a["digest"] for a in wire.leaf("ack")] == [update.blob.digest]
    inbox.dispatch(topics.device("dev-0", "update"), encode_message(update))
    assert len(wire.leaf("ack")) == 2, "an identical re-send is re-acked"
    accepted = inbox.close_round()
    assert [a.update.device_id for a in accepted] == ["dev-0"]
    assert accepted[0].tensors["w"].equal(torch.ones(2, 3))
    assert wire.leaf("nack") == []
    inbox.release_round()


def _refuse_tails(tensors: TensorFile) -> None:
    if not tensors.is_index("w"):
        raise ProtocolError("a tail mass is outside [0, 1]", "tail_out_of_range")


@pytest.mark.parametrize(
    ("check", "tensors", "code"),
    [
        (refuse_index_tensors, {"w": torch.ones(2, 3, dtype=torch.int32)}, "invalid_tensors"),
        (_refuse_tails, {"w": torch.ones(2, 3)}, "tail_out_of_range"),
    ],
)
def test_the_strategy_checks_what_arrived_and_its_code_is_the_nack(
    tmp_path: Path,
    check: Callable[[TensorFile], None],
    tensors: Dict[str, torch.Tensor],
    code: str,
) -> None:
    """Integer tensors are refused unless the strategy reads indices (kd's top-k), and the
    strategy's own check (kd: log-probs, tails, index range) names the nack's code."""
    inbox, wire, task, topics = opened_intake(tmp_path, check)
    device = Wire()
    blobs = BlobServer(device.publish, 1024)
    inbox.dispatch(
        topics.device("dev-0", "update"),
        encode_message(announce("dev-0", task, blobs, tensors=tensors)),
    )
    deliver(inbox, wire, topics, "dev-0", blobs)
    for topic, payload in device.sent:
        inbox.dispatch(topic, payload)
    (nack,) = wire.leaf("nack")
    assert nack["code"] == code and wire.leaf("ack") == [] and inbox.close_round() == []
    inbox.release_round()


@pytest.mark.parametrize(
    ("device_id", "change", "code"),
    [
        ("dev-1", {}, "not_selected"),
        ("dev-0", {"device_id": "dev-1"}, "sender_mismatch"),
        ("dev-0", {"experiment": "other"}, "wrong_experiment"),
        ("dev-0", {"round_index": 3}, "stale_round"),
        ("dev-0", {"base_digest": "0" * 64}, "wrong_base"),
    ],
)
def test_a_refused_update_is_nacked_by_round_and_digest(
    intake: Tuple[Intake, Wire, Task, Topics], device_id: str, change: Dict[str, object], code: str
) -> None:
    inbox, wire, task, topics = intake
    update = announce(device_id, task, BlobServer(Wire().publish, 1024)).model_copy(update=change)
    payload = encode_message(update)
    inbox.dispatch(topics.device(device_id, "update"), payload)
    (nack,) = wire.leaf("nack")
    assert nack["code"] == code and nack["round_index"] == update.round_index
    assert nack["digest"] == message_digest(payload)  # names the very message refused
    assert wire.leaf("pull") == [] and inbox.close_round() == []


def test_records_of_a_device_that_never_said_hello_are_refused(
    intake: Tuple[Intake, Wire, Task, Topics],
) -> None:
    inbox, wire, _, topics = intake
    batch = {"device_id": "ghost", "round_index": 0, "records": []}
    inbox.dispatch(topics.device("ghost", "profile"), json.dumps(batch).encode())
    (nack,) = wire.leaf("nack")
    assert nack["code"] == "unknown_device"


def test_a_chunk_request_for_nothing_offered_is_nacked(
    intake: Tuple[Intake, Wire, Task, Topics],
) -> None:
    inbox, wire, _, topics = intake
    want = {"device_id": "dev-0", "digest": "a" * 64, "indices": [0]}
    inbox.serve_want(topics.device("dev-0", "want"), json.dumps(want).encode())
    (nack,) = wire.leaf("nack")
    assert nack["code"] == "bad_request"


def test_check_sender() -> None:
    check_sender("dev-0", "dev-0")
    with pytest.raises(ProtocolError, match="does not match"):
        check_sender("dev-0", "dev-1")


def test_a_selected_device_reporting_failure_is_no_longer_waited_for(
    intake: Tuple[Intake, Wire, Task, Topics],
) -> None:
    """Its reason is recorded for the round loop; a forged, unselected or stale report is not."""
    from jetfed.edge.wire import RoundFailure

    box, wire, _task, topics = intake
    inbound = box.round
    assert inbound is not None

    def report(sender: str, device_id: str, round_index: int = 0) -> None:
        failure = RoundFailure(device_id=device_id, round_index=round_index, reason="max_length")
        box.dispatch(topics.device(sender, "failed"), encode_message(failure))

    report("dev-1", "dev-0")  # forged: dev-1 on its own topic in dev-0's name
    report("dev-1", "dev-1")  # not selected
    report("dev-0", "dev-0", round_index=3)  # not the round in progress
    assert inbound.failed == {}
    assert [n["code"] for n in wire.leaf("nack")] == ["sender_mismatch"]
    report("dev-0", "dev-0")
    assert inbound.failed == {"dev-0": "max_length"}
