"""Property-based fuzzing of every inbound message path of the coordinator and the edge.

The coordinator runs for real (its own thread, a real Mosquitto, real MiniLM) in the middle of a
round with three scripted devices; fuzzed messages go into its inbox, exactly where paho puts
what the broker delivers (the `want` path, served on paho's thread, is called as paho would).
Properties: nothing escapes (`message.crashed` / `internal_error` never appear, the thread
lives), a message that fails its schema or sender checks yields a rejection log line (each comes
with a nack), and afterwards legit updates from every device are still accepted and aggregated.
A smoke test sends fuzz through the broker itself and checks the nacks arrive.

Cases: 300 per target by default; `HYPOTHESIS_PROFILE=long` runs 10,000 per target.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Type

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from jetfed.coordinator.config import load_config
from jetfed.coordinator.server import Coordinator
from jetfed.edge.agent import EdgeAgent, EdgeConfig
from jetfed.edge.errors import ProtocolError
from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.edge.topics import Topics
from jetfed.edge.transfer import Download
from jetfed.edge.wire import (
    Ack,
    ChunkRequest,
    Hello,
    Nack,
    ProfileBatch,
    Progress,
    Task,
    Update,
    make_manifest,
    parse_message,
    to_json_dict,
)
from tests.brokers import MosquittoBroker, free_port
from tests.fleet import read_metrics, write_config
from tests.scripted_device import ScriptedDevice

NAME = "fuzz"
LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
EXAMPLES = 10_000 if LONG else 300
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
SELECTED = ("dev-0", "dev-1", "fz-2")
"""fz-2 is selected for the round and takes the fuzz on its own topics (as its ACL allows)."""
REJECTIONS = ("message.rejected", "chunk.rejected", "pull.rejected")
CRASHES = ("message.crashed", "internal_error", "handler_failed")


class Captured(logging.Handler):
    """Collects log lines of the code under test (from any thread)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(
            ("jetfed.coordinator", "jetfed.edge.agent", "jetfed.edge.session")
        ):
            self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def captured() -> Iterator[Captured]:
    handler = Captured()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


# --------------------------------------------------------------------------- payload strategies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def mutated(draw: Any, template: Dict[str, Any]) -> bytes:
    """A valid message, or one with a field replaced, removed or added."""
    message = dict(template)
    action = draw(st.sampled_from(["keep", "replace", "drop", "add", "nested"]))
    key = draw(st.sampled_from(sorted(message)))
    if action == "replace":
        message[key] = draw(json_values)
    elif action == "drop":
        del message[key]
    elif action == "add":
        message[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    elif action == "nested" and isinstance(message[key], dict) and message[key]:
        inner = dict(message[key])
        inner[draw(st.sampled_from(sorted(inner)))] = draw(json_values)
        message[key] = inner
    return json.dumps(message).encode()


def payloads(template: Optional[Dict[str, Any]]) -> st.SearchStrategy[bytes]:
    options = [st.binary(max_size=256), json_values.map(lambda v: json.dumps(v).encode())]
    if template is not None:
        options += [mutated(template)] * 3
    return st.one_of(options)


def fails_schema(model: Type[BaseModel], payload: bytes, sender: Optional[str] = None) -> bool:
    """Would the wire schema (or, given `sender`, the sender check) refuse it? Then a rejection
    is required."""
    try:
        message = parse_message(model, payload)
    except ProtocolError:
        return True
    return sender is not None and getattr(message, "device_id", sender) != sender


# --------------------------------------------------------------------------- the coordinator


@dataclass
class Round:
    coordinator: Coordinator
    thread: threading.Thread
    task: Task
    devices: Dict[str, ScriptedDevice]
    run_dir: Path
    marker: List[bool]

    def settle(self) -> None:
        """Returns once the coordinator thread handled everything injected before this call."""
        self.marker[0] = not self.marker[0]
        status = b"online" if self.marker[0] else b"offline"
        inbox = self.coordinator.link.inbox
        inbox.put((self.coordinator.topics.device("zz-marker", "status"), status))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            record = self.coordinator.registry.devices.get("zz-marker")
            if record is not None and record.online == self.marker[0]:
                return
            assert self.thread.is_alive(), "the coordinator thread died"
            time.sleep(0.001)
        raise TimeoutError("the coordinator stopped draining its inbox")


@pytest.fixture(scope="module")
def live_round(
    tmp_path_factory: pytest.TempPathFactory, minilm_path: str, sst2_dir: Path, captured: Captured
) -> Iterator[Round]:
    tmp = tmp_path_factory.mktemp("fuzz")
    broker = MosquittoBroker(tmp / "broker", free_port())
    broker.start()
    path = write_config(
        tmp, NAME, "lora", sst2_dir, rounds=1, clients=3, transfer={"retry_after_s": 2.0}
    )
    config = load_config(str(path))
    coordinator = Coordinator(config, BrokerSpec(url=broker.url))
    thread = threading.Thread(target=coordinator.run, daemon=True)
    devices = {d: ScriptedDevice(broker.url, NAME, d) for d in SELECTED}
    try:
        thread.start()
        for device in devices.values():
            device.join()
        task = devices["dev-0"].wait_task()
        assert sorted(task.selected_devices) == list(SELECTED)
        yield Round(coordinator, thread, task, devices, config.run_dir, [False])
    finally:
        coordinator.stop()
        thread.join(timeout=60)
        for device in devices.values():
            device.close()
        broker.stop()


def _templates(task: Task) -> Dict[str, Dict[str, Any]]:
    record = PhaseRecord(
        experiment=NAME,
        device_id="fz-2",
        round_index=task.round_index,
        phase="train",
        start_unix_s=1.0,
        end_unix_s=2.0,
        duration_s=1.0,
    )
    hello = Hello(
        device_id="fz-2",
        jetfed_version="x",
        hostname="h",
        machine="m",
        accelerator="cpu",
        memory_total_bytes=1,
    )
    update = Update(
        experiment=NAME,
        device_id="fz-2",
        round_index=task.round_index,
        base_digest=task.global_state.digest,
        num_samples=3,
        local_steps=1,
        train_loss=0.1,
        blob=make_manifest(b"fuzz", 1 << 20),
        profile=[record],
    )
    return {
        "hello": to_json_dict(hello),
        "update": to_json_dict(update),
        "profile": to_json_dict(
            ProfileBatch(device_id="fz-2", round_index=task.round_index, records=[record])
        ),
        "want": to_json_dict(
            ChunkRequest(device_id="fz-2", digest=task.global_state.digest, indices=[7])
        ),
        "progress": to_json_dict(
            Progress(
                device_id="fz-2",
                round_index=task.round_index,
                phase="train",
                step=3,
                total_steps=50,
                bytes_received=1000,
                bytes_sent=10,
            )
        ),
    }


MODELS: Dict[str, Type[BaseModel]] = {
    "hello": Hello,
    "update": Update,
    "profile": ProfileBatch,
    "want": ChunkRequest,
    "progress": Progress,
}
device_ids = st.one_of(
    st.sampled_from(["fz-2", "fz-2", "fz-2", "stranger"]),
    st.text(min_size=1, max_size=12).filter(lambda s: not set(s) & set("/+#\x00")),
)


@st.composite
def coordinator_messages(draw: Any, task: Task) -> Tuple[str, bytes, bool]:
    """(topic, payload, whether a rejection log line is required)."""
    topics = Topics(NAME)
    device_id = draw(device_ids)
    leaf = draw(
        st.sampled_from(
            ["status", "hello", "update", "profile", "progress", "want", "up", "exchange"]
        )
    )
    templates = _templates(task)
    bad_id = not _valid_id(device_id)
    if leaf == "status":
        payload = draw(st.sampled_from([b"online", b"offline", b""]) | st.binary(max_size=16))
        return (
            topics.device(device_id, "status"),
            payload,
            bad_id
            or payload
            not in (
                b"online",
                b"offline",
                b"",
            ),
        )
    if leaf == "up":
        known = ["a" * 64, task.global_state.digest, make_manifest(b"fuzz", 1 << 20).digest]
        digest = draw(st.sampled_from(known) | st.text(max_size=70))
        index = draw(st.integers(-2, 5).map(str) | st.text(max_size=4))
        topic = topics.device(device_id, f"up/{digest}/{index}")
        return topic, draw(st.binary(max_size=64)), bad_id
    if leaf == "exchange":
        sub = draw(st.text(min_size=1, max_size=10).filter(lambda s: not set(s) & set("+#\x00")))
        return topics.device(device_id, f"exchange/up/{sub}"), draw(st.binary(max_size=64)), True
    template = dict(templates[leaf])
    if device_id != "fz-2" and "device_id" in template and draw(st.booleans()):
        template["device_id"] = device_id
    payload = draw(payloads(template))
    return (
        topics.device(device_id, leaf),
        payload,
        bad_id or fails_schema(MODELS[leaf], payload, device_id),
    )


def _valid_id(device_id: str) -> bool:
    try:
        Topics(NAME).parse_device_topic(Topics(NAME).device(device_id, "status"))
    except ProtocolError:
        return False
    return True


def test_a_device_id_with_a_trailing_newline_is_no_device_id() -> None:
    """Found by the long fuzz: `re.match(...$)` let `abc\\n` through, the nack went to a topic
    with a control character, Mosquitto dropped the coordinator for a malformed packet and paho
    re-sent that publish after every reconnect, forever."""
    with pytest.raises(ProtocolError):
        Topics(NAME).parse_device_topic(Topics(NAME).device("abc\n", "update"))


def _lines_since(captured: Captured, start: int) -> List[str]:
    return captured.lines[start:]


@FUZZ
@given(data=st.data())
def test_fuzzed_inbound_messages_never_escape_and_bad_ones_are_rejected(
    live_round: Round, captured: Captured, data: Any
) -> None:
    topic, payload, must_reject = data.draw(coordinator_messages(live_round.task))
    start = len(captured.lines)
    coordinator = live_round.coordinator
    if topic.endswith("/want") and "/exchange/" not in topic:
        coordinator.intake.serve_want(topic, payload)  # paho's thread calls this for want topics
    else:
        coordinator.link.inbox.put((topic, payload))
    live_round.settle()
    lines = _lines_since(captured, start)
    assert not [line for line in lines if any(c in line for c in CRASHES)], lines
    if must_reject:
        assert any(r in line for line in lines for r in REJECTIONS), (topic, payload[:200])


def _drain(device: ScriptedDevice) -> None:
    """Forget the nacks the fuzz earned: wait until nothing arrived for a second."""
    while True:
        size = device.link.inbox.qsize()
        time.sleep(1.0)
        while not device.link.inbox.empty():
            device.pump(0)
        if size == 0 and device.link.inbox.empty():
            break
    while not device.replies.empty():
        device.replies.get()


def test_fuzz_through_the_broker_gets_nacks(live_round: Round, captured: Captured) -> None:
    """The real path: publishes on fz-2's topics, nacks back on fz-2's nack topic."""
    device = live_round.devices["fz-2"]
    _drain(device)
    garbage = [
        ("update", b"\xff\xfe"),
        ("hello", b"{}"),
        ("profile", b"[1, 2]"),
        ("status", b"maybe"),
        ("exchange/up/a/b", b"x"),
        ("want", b'{"device_id": "dev-0", "digest": "' + b"a" * 64 + b'", "indices": [0]}'),
    ]
    for leaf, payload in garbage:
        device.publish(leaf, payload)
    codes = []
    for _ in garbage:
        reply = device.wait_reply(timeout_s=30)
        assert isinstance(reply, Nack)
        codes.append(reply.code)
    assert sorted(codes) == sorted(
        [
            "invalid_update",
            "invalid_hello",
            "invalid_profile",
            "invalid_status",
            "invalid_exchange",
            "sender_mismatch",
        ]
    )


def test_progress_of_a_selected_device_reaches_the_table_and_a_strangers_does_not(
    live_round: Round,
) -> None:
    seen: List[Progress] = []
    coordinator = live_round.coordinator
    coordinator.on_progress = seen.append
    for device_id in ("stranger", "fz-2"):
        report = Progress(
            device_id=device_id,
            round_index=live_round.task.round_index,
            phase="train",
            step=1,
            total_steps=3,
            bytes_received=10,
            bytes_sent=0,
        )
        topic = Topics(NAME).device(device_id, "progress")
        coordinator.link.inbox.put((topic, report.model_dump_json().encode()))
    live_round.settle()
    coordinator.on_progress = None
    assert [p.device_id for p in seen] == ["fz-2"]


def test_after_the_fuzz_legit_updates_are_accepted_and_aggregated(
    live_round: Round, captured: Captured
) -> None:
    shapes = live_round.devices["dev-0"].fetch(live_round.task.global_state)
    for device in live_round.devices.values():
        _drain(device)
        tensors = {n: torch.full_like(t, 1e-3) for n, t in shapes.items()}
        device.send(device.update(live_round.task, device.offer_tensors(tensors)))
        reply = device.wait_reply(timeout_s=60)
        while isinstance(reply, Nack) and reply.code in ("transfer_timeout",):
            reply = device.wait_reply(timeout_s=60)
        assert isinstance(reply, Ack), reply
    live_round.thread.join(timeout=120)
    assert not live_round.thread.is_alive()
    (metrics,) = read_metrics(live_round.run_dir)
    assert metrics["num_aggregated"] == 3 and metrics["devices"] == list(SELECTED)
    assert not [line for line in captured.lines if any(c in line for c in CRASHES)]


# --------------------------------------------------------------------------- the edge


BLOB = bytes(range(256)) * 8


@pytest.fixture(scope="module")
def edge() -> Iterator[Tuple[EdgeAgent, Download]]:
    """An agent mid-download (one blob expected), as `_download_all` leaves it; not connected:
    what it publishes (chunk requests, served chunks) waits in paho's queue."""
    agent = EdgeAgent(
        EdgeConfig(broker=BrokerSpec(url="mqtt://127.0.0.1:1"), device_id="dev-0", experiment=NAME)
    )
    download = Download(make_manifest(BLOB, 512), lambda indices: None, max_size_bytes=1 << 20)
    agent._downloads = {download.manifest.digest: download}
    agent.blobs.offer(BLOB, 512)
    yield agent, download
    download.close()


def _edge_templates(digest: str) -> Dict[str, Dict[str, Any]]:
    task = Task(
        experiment=NAME,
        round_index=1,
        method="lora",
        model={"name_or_path": "minilm", "num_labels": 2},  # type: ignore[arg-type]
        training={},  # type: ignore[arg-type]
        selected_devices=["dev-0"],
        global_state=make_manifest(b"g", 1024),
        issued_unix_s=0.0,
        deadline_unix_s=1.0,
    )
    return {
        "task": to_json_dict(task),
        "ack": to_json_dict(Ack(device_id="dev-0", round_index=1, digest=digest)),
        "nack": to_json_dict(Nack(device_id="dev-0", round_index=1, code="c", reason="r")),
        "pull": to_json_dict(ChunkRequest(device_id="dev-0", digest=digest, indices=[0, 3])),
    }


EDGE_MODELS: Dict[str, Type[BaseModel]] = {
    "task": Task,
    "ack": Ack,
    "nack": Nack,
    "pull": ChunkRequest,
}


@FUZZ
@given(data=st.data())
def test_fuzzed_messages_to_the_edge_never_escape_and_bad_ones_are_logged(
    edge: Tuple[EdgeAgent, Download], captured: Captured, data: Any
) -> None:
    agent, download = edge
    topics = agent.topics
    digest = download.manifest.digest
    leaf = data.draw(st.sampled_from(["task", "down", "ack", "nack", "pull", "exchange"]))
    start = len(captured.lines)
    must_log = False
    if leaf == "down":
        where = data.draw(st.sampled_from([digest, "b" * 64]) | st.text(max_size=66))
        index = data.draw(st.integers(-3, 10).map(str) | st.text(max_size=4))
        topic = topics.device("dev-0", f"down/{where}/{index}")
        payload = data.draw(
            st.binary(max_size=600) | st.sampled_from([BLOB[:512], BLOB[512:1024], b""])
        )
        missing = set(download.missing())
        agent._dispatch(topic, payload)
        must_log = (
            where == digest and "/" not in index and _bad_chunk(download, index, payload, missing)
        )
    elif leaf == "exchange":
        agent.exchange.deliver(agent.exchange.down_prefix + "x", data.draw(st.binary(max_size=64)))
    else:
        payload = data.draw(payloads(_edge_templates(digest)[leaf]))
        topic = topics.task if leaf == "task" else topics.device("dev-0", leaf)
        if leaf == "pull":
            agent.session.serve_pull(topic, payload)
        else:
            agent._dispatch(topic, payload)
        must_log = fails_schema(EDGE_MODELS[leaf], payload)
        if leaf == "task":
            must_log = bool(payload) and (must_log or _other_experiment(payload))
    lines = _lines_since(captured, start)
    if must_log:
        assert any("rejected" in line for line in lines), (leaf, lines)
    while not agent.exchange.inbox.empty():
        agent.exchange.inbox.get_nowait()


def _bad_chunk(download: Download, index: str, payload: bytes, missing: Set[int]) -> bool:
    """The oracle for a chunk of the blob being downloaded: refused unless a duplicate or right."""
    try:
        position = int(index)
    except ValueError:
        return True
    if not 0 <= position < download.manifest.chunk_count:
        return True
    if position not in missing:
        return False
    start, end = download.manifest.chunk_range(position)
    return payload != BLOB[start:end]


def _other_experiment(payload: bytes) -> bool:
    return parse_message(Task, payload).experiment != NAME


def test_edge_after_fuzz_still_takes_a_task(edge: Tuple[EdgeAgent, Download]) -> None:
    agent, _ = edge
    template = _edge_templates("c" * 64)["task"]
    agent._pending_task = None
    agent._dispatch(agent.topics.task, json.dumps({**template, "round_index": 99}).encode())
    assert agent._pending_task is not None and agent._pending_task.round_index == 99


def test_edge_survives_a_task_for_a_method_it_lacks(
    edge: Tuple[EdgeAgent, Download], captured: Captured
) -> None:
    """A newer coordinator's method fails that round on this device, not the device."""
    agent, _ = edge
    template = _edge_templates("c" * 64)["task"]
    future = time.time() + 60
    task = Task.model_validate(
        {**template, "round_index": 7, "method": "from-the-future", "deadline_unix_s": future}
    )
    agent._run_round(task)
    assert agent._finished_rounds[7] == "failed"
    assert any("round.failed" in line and "from-the-future" in line for line in captured.lines)
