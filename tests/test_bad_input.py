"""Bad input through a real Mosquitto to a real coordinator process, from scripted devices.

Every bad message gets a nack with a stable code on the sender's nack topic and exactly one log
line; the update already accepted stays counted once; the coordinator finishes the round.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pytest
import torch
from safetensors.torch import save

from jetfed.coordinator.inbound import MAX_REJECTED_CHUNKS
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.edge.tensor_codec import encode_tensors
from jetfed.edge.wire import (
    Ack,
    ChunkRequest,
    Hello,
    Nack,
    ProfileBatch,
    Task,
    encode_message,
    make_manifest,
)
from tests.brokers import MosquittoBroker
from tests.fleet import jetfed, log_tail, read_metrics, stop, write_config
from tests.scripted_device import ScriptedDevice

NAME = "it-bad-input"
Tensors = Dict[str, torch.Tensor]


@pytest.fixture
def devices(mosquitto: MosquittoBroker) -> Iterator[Dict[str, ScriptedDevice]]:
    made = {d: ScriptedDevice(mosquitto.url, NAME, d) for d in ("good-0", "bad-1", "ghost-9")}
    yield made
    for device in made.values():
        device.close()


def _with(tensors: Tensors, name: str, value: torch.Tensor) -> Tensors:
    return {**tensors, name: value}


def _cases(
    task: Task, shapes: Tensors, bad: ScriptedDevice, bounded_norm: bool
) -> List[Tuple[str, Callable[[], None], str]]:
    """(what, how to send it, expected nack code) for device bad-1 unless said otherwise."""
    small = {n: torch.full_like(t, 1e-4) for n, t in shapes.items()}
    first = sorted(small)[0]

    def update_with(tensors_bytes: bytes, **fields: object) -> Callable[[], None]:
        return lambda: bad.send(bad.update(task, bad.offer(tensors_bytes), **fields))

    good_bytes = encode_tensors(small)
    record = PhaseRecord(
        experiment=NAME,
        device_id="good-0",
        round_index=task.round_index,
        phase="train",
        start_unix_s=1.0,
        end_unix_s=2.0,
        duration_s=1.0,
    )
    true = make_manifest(good_bytes, 1 << 20)
    lying_digest = json.loads(encode_message(bad.update(task, true)))
    lying_digest["blob"]["digest"] = hashlib.sha256(good_bytes).hexdigest()  # version 1's rule
    older_jetfed = json.loads(encode_message(bad.update(task, true)))
    del older_jetfed["blob"]["version"]
    other_bytes = encode_tensors({n: t * 2 for n, t in small.items()})
    always_corrupt = bytes([other_bytes[0] ^ 0xFF]) + other_bytes[1:]
    unserved = make_manifest(encode_tensors({n: t * 3 for n, t in small.items()}), 1 << 10)

    def chunk_on_an_active_upload(index: str) -> Callable[[], None]:
        """Announce an update bad-1 never serves (its transfer stays active), then a chunk."""

        def send() -> None:
            bad.send(bad.update(task, unserved))
            bad.publish(f"up/{unserved.digest}/{index}", b"x")

        return send

    huge_rss = record.model_copy(update={"device_id": "bad-1"}).model_dump(mode="json")
    huge_rss["peak_rss_bytes"] = 2**70
    norm_case = (
        "absurd norm",
        update_with(encode_tensors({n: torch.full_like(t, 100.0) for n, t in small.items()})),
        "update_norm_too_large",
    )
    return [
        ("not json", lambda: bad.publish("update", b"{not json"), "invalid_update"),
        (
            "message over 4 MiB",
            lambda: bad.publish("update", json.dumps({"x": "a" * (5 << 20)}).encode()),
            "invalid_update",
        ),
        ("other experiment", update_with(good_bytes, experiment="other"), "wrong_experiment"),
        ("stale round", update_with(good_bytes, round_index=task.round_index + 7), "stale_round"),
        ("id inside != topic", update_with(good_bytes, device_id="good-0"), "sender_mismatch"),
        ("other global state", update_with(good_bytes, base_digest="0" * 64), "wrong_base"),
        (
            "blob over max_update_bytes",
            lambda: bad.send(bad.update(task, make_manifest(bytes(3 << 20), 1 << 20))),
            "blob_too_large",
        ),
        (
            "blob digest not over its chunk digests",
            lambda: bad.publish("update", json.dumps(lying_digest).encode()),
            "invalid_update",
        ),
        (
            "manifest of an older jetfed (no version)",
            lambda: bad.publish("update", json.dumps(older_jetfed).encode()),
            "invalid_update",
        ),
        ("not safetensors", update_with(b"\x00" * 64), "invalid_tensors"),
        (
            "unknown tensor name",
            update_with(encode_tensors({**small, "extra.weight": torch.zeros(2)})),
            "invalid_tensors",
        ),
        (
            "missing tensor",
            update_with(encode_tensors({n: t for n, t in small.items() if n != first})),
            "invalid_tensors",
        ),
        (
            "wrong shape",
            update_with(encode_tensors(_with(small, first, torch.zeros(3, 3)))),
            "invalid_tensors",
        ),
        (
            "fp64 dtype",
            update_with(save({n: t.double() for n, t in small.items()})),
            "invalid_tensors",
        ),
        (
            "int32 dtype",
            update_with(save({n: t.to(torch.int32) for n, t in small.items()})),
            "invalid_tensors",
        ),
        (
            "NaN",
            update_with(encode_tensors(_with(small, first, small[first] * float("nan")))),
            "invalid_tensors",
        ),
        (
            "Inf in fp16",
            update_with(encode_tensors(_with(small, first, small[first] + float("inf")), "fp16")),
            "invalid_tensors",
        ),
        *([norm_case] if bounded_norm else []),
        (
            "a chunk corrupt on every pull",
            lambda: bad.send(
                bad.update(
                    task, bad.offer(always_corrupt, manifest=make_manifest(other_bytes, 1 << 20))
                )
            ),
            "bad_chunks",
        ),
        ("chunk index ²", chunk_on_an_active_upload("²"), "invalid_up"),
        ("chunk index of 4,400 digits", chunk_on_an_active_upload("9" * 4400), "invalid_up"),
        (
            "peak_rss_bytes = 2**70",
            lambda: bad.publish(
                "profile",
                json.dumps(
                    {"device_id": "bad-1", "round_index": task.round_index, "records": [huge_rss]}
                ).encode(),
            ),
            "invalid_profile",
        ),
        ("status garbage", lambda: bad.publish("status", b"maybe"), "invalid_status"),
        (
            "hello naming another device",
            lambda: bad.publish(
                "hello",
                encode_message(
                    Hello(
                        device_id="good-0",
                        jetfed_version="x",
                        hostname="h",
                        machine="m",
                        accelerator="cpu",
                        memory_total_bytes=1,
                    )
                ),
            ),
            "sender_mismatch",
        ),
        (
            "profile of another device",
            lambda: bad.publish(
                "profile",
                encode_message(
                    ProfileBatch(device_id="bad-1", round_index=task.round_index, records=[record])
                ),
            ),
            "invalid_profile",
        ),
        (
            "want of an unknown blob",
            lambda: bad.publish(
                "want",
                encode_message(ChunkRequest(device_id="bad-1", digest="f" * 64, indices=[0])),
            ),
            "bad_request",
        ),
        (
            "exchange lora does not use",
            lambda: bad.publish("exchange/up/x", b"hi"),
            "invalid_exchange",
        ),
        (
            "live telemetry with negative watts",
            lambda: bad.publish(
                "telemetry",
                b'{"device_id":"bad-1","backend":"ina3221","samples":'
                b'[{"wall_unix_s":1.0,"rails_w":{"VDD_IN":-5.0}}]}',
            ),
            "invalid_telemetry",
        ),
        (
            "live telemetry naming another device",
            lambda: bad.publish(
                "telemetry",
                b'{"device_id":"good-0","backend":"psutil","samples":[{"wall_unix_s":1.0}]}',
            ),
            "sender_mismatch",
        ),
        (
            "live telemetry over 16 KB",
            lambda: bad.publish("telemetry", b" " * (17 << 10)),
            "invalid_telemetry",
        ),
    ]


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param({"max_update_norm": 1000.0}, id="fedavg-bounded-norm"),
        pytest.param(
            {"strategy": "clipped_fedavg", "clip_norm": 1.0, "max_update_norm": 1000.0},
            id="clipped-fedavg-bounded-norm",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_input_gets_a_nack_and_one_log_line_and_loses_nothing(
    strategy: Dict[str, object],
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    devices: Dict[str, ScriptedDevice],
    minilm_path: str,
    sst2_dir: Path,
) -> None:
    config = write_config(
        tmp_path,
        NAME,
        "lora",
        sst2_dir,
        rounds=1,
        transfer={"max_update_bytes": 2 << 20, "retry_after_s": 1.0},
        aggregation=strategy,
    )
    log = tmp_path / "coord.log"
    # With the live page on (any free port): the coordinator then validates live telemetry too.
    coordinator = jetfed(
        "-v",
        "coordinator",
        "run",
        str(config),
        "--broker",
        mosquitto.url,
        "--ui",
        "127.0.0.1:0",
        log=log,
    )
    good, bad, ghost = devices["good-0"], devices["bad-1"], devices["ghost-9"]
    try:
        good.join()
        bad.join()
        ghost.link.connect()
        task = good.wait_task()
        assert sorted(task.selected_devices) == ["bad-1", "good-0"]
        assert task.live_telemetry
        shapes = bad.fetch(task.global_state)
        small = {n: torch.full_like(t, 1e-4) for n, t in shapes.items()}
        good.send(good.update(task, good.offer_tensors(small)))
        assert isinstance(good.wait_reply(), Ack), log_tail(log)

        cases = _cases(task, shapes, bad, bounded_norm="max_update_norm" in strategy)
        outcomes: List[Tuple[str, str]] = []
        for what, send, code in cases:
            send()
            reply = bad.wait_reply()
            outcomes.append((what, reply.code if isinstance(reply, Nack) else "ack"))
            assert outcomes[-1] == (what, code), log_tail(log)

        ghost.send(ghost.update(task, ghost.offer_tensors(small)))
        reply = ghost.wait_reply()
        assert isinstance(reply, Nack) and reply.code == "not_selected"
        ghost_record = PhaseRecord(
            experiment=NAME,
            device_id="ghost-9",
            round_index=task.round_index,
            phase="train",
            start_unix_s=1.0,
            end_unix_s=2.0,
            duration_s=1.0,
        )
        ghost.publish(
            "profile",
            encode_message(
                ProfileBatch(
                    device_id="ghost-9", round_index=task.round_index, records=[ghost_record]
                )
            ),
        )
        reply = ghost.wait_reply()
        assert isinstance(reply, Nack) and reply.code == "unknown_device", "never said hello"

        # A refused update is named by its round and the digest of its exact bytes.
        stale = encode_message(bad.update(task, bad.offer_tensors(small), round_index=5))
        bad.publish("update", stale)
        reply = bad.wait_reply()
        assert isinstance(reply, Nack) and reply.code == "stale_round"
        assert (reply.round_index, reply.digest) == (5, hashlib.sha256(stale).hexdigest())
        other = encode_tensors({n: t * 2 for n, t in small.items()})
        bad.send(bad.update(task, bad.offer(other), device_id="good-0"), device_id="good-0")
        reply = good.wait_reply()
        assert isinstance(reply, Nack) and reply.code == "conflicting_update"

        # The legit update, whose first chunk arrives corrupt once: re-asked, then accepted.
        legit = encode_tensors(small)
        corrupt = bytes([legit[0] ^ 0xFF]) + legit[1:]
        legit_update = bad.update(task, bad.offer(legit, served=corrupt))
        bad.send(legit_update)
        assert isinstance(bad.wait_reply(), Ack), log_tail(log)
        bad.send(legit_update)
        assert isinstance(bad.wait_reply(), Ack), "a re-sent accepted update is re-acked"
        assert coordinator.wait(timeout=120) == 0, log_tail(log)
    finally:
        stop([coordinator])
    text = log.read_text()
    assert "Traceback" not in text and "internal_error" not in text
    rejected = [line for line in text.splitlines() if "message.rejected" in line]
    expected_codes = [code for _, _, code in cases]
    expected_codes += ["not_selected", "unknown_device", "stale_round", "conflicting_update"]
    for code in set(expected_codes):
        lines = [line for line in rejected if f"code={code} " in line]
        assert len(lines) == expected_codes.count(code), (code, lines)
    assert len(rejected) == len(expected_codes), rejected
    assert text.count("chunk.rejected") == MAX_REJECTED_CHUNKS + 2  # the flood, the legit one
    accepted = [line for line in text.splitlines() if "update.accepted" in line]
    assert sorted(a.split("device_id=")[1].split()[0] for a in accepted) == ["bad-1", "good-0"]
    (metrics,) = read_metrics(tmp_path / "runs" / NAME)
    assert metrics["status"] == "aggregated" and metrics["num_aggregated"] == 2
    assert metrics["devices"] == ["bad-1", "good-0"]
