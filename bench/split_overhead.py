"""Split learning costs: per-batch overhead beyond moving the tensors, and bytes per round.

1. Overhead, over a Mosquitto on loopback: MiniLM cut after layer 2, real SST-2 batches (and the
   causal case: SmolLM2 with 4 of its layers cut after layer 2, SST-2 as generation, batch 8,
   labels per token, 1 torch thread). A device
   (MqttLink + Exchange + SplitBatchLoss, as the agent runs it) and a SplitServer on its own
   protocol thread fed by paho's thread through a queue (as the coordinator runs it). Per batch:
   the device's wait minus the server's compute minus the two MQTT legs (device publish → server
   paho thread, server publish → device paho thread) is the overhead beyond moving the tensors:
   encoding, decoding, validation, the reply cache and the thread hand-offs (goal: ≤ 10 ms).
   For reference, an echo moves payloads of exactly the same sizes through the same path.
2. Payload bytes per device per round at the same local budget (50 steps × batch 16, SST-2,
   max_length 64): split (fp32/fp16; labels shared or U-shaped) vs LoRA vs full fine-tuning
   (full: from the model size, fp32 down + up). MQTT packet headers (~60 B per message) excluded.

Run: python -m bench.split_overhead [--quick]
"""

from __future__ import annotations

import copy
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from jetfed.coordinator.strategies.split import SplitServer
from jetfed.edge.data import TextDataset, load_split
from jetfed.edge.exchange import Exchange
from jetfed.edge.instructions import InstructionSet, load_instructions
from jetfed.edge.methods.lora import LoraMethod
from jetfed.edge.methods.split import (
    ExchangeTransport,
    SplitBatchLoss,
    SplitHeader,
    SplitMethod,
    encode_split_message,
    torch_dtype,
)
from jetfed.edge.models import load_tokenizer
from jetfed.edge.mqtt import BrokerSpec, MqttLink
from jetfed.edge.tensor_codec import encode_tensors
from jetfed.edge.topics import Topics
from jetfed.edge.train import batch_indices, make_batch, tokenize_batch
from jetfed.edge.wire import ModelRef
from tests.brokers import MosquittoBroker, free_port

CUT_LAYER = 2
BATCH_SIZE = 16
LOCAL_STEPS = 50
MAX_LENGTH = 64
DEVICE_ID = "bench-dev"
SESSION = "0123456789abcdef"
Reply = Optional[Tuple[str, bytes]]


def _sst2() -> str:
    shared = Path(os.environ.get("JETFED_DATASETS", "/work/shared/datasets")) / "sst2"
    if (shared / "train.jsonl").exists():
        return str(shared)
    return str(Path(__file__).parent.parent / "coordinator/demo_data/sst2")


def _dataset() -> TextDataset:
    return load_split(_sst2(), "train")


def _model_ref() -> ModelRef:
    return ModelRef(name_or_path="minilm", num_labels=2, max_length=MAX_LENGTH)


@dataclass(frozen=True)
class Case:
    """What the overhead is measured on: a model, its cut, real batches of its kind of data."""

    ref: ModelRef
    batch_size: int
    causal: bool = False

    def data(self) -> Union[TextDataset, InstructionSet]:
        return load_instructions(_sst2(), "train") if self.causal else _dataset()

    def batches(self, count: int) -> Iterator[Dict[str, Any]]:
        dataset, tokenizer = self.data(), load_tokenizer(self.ref)
        for indices in batch_indices(len(dataset), self.batch_size, count, seed=0):
            yield make_batch(tokenizer, dataset, indices, self.ref.max_length, "cpu")


CLASSIFIER = Case(_model_ref(), BATCH_SIZE)
CAUSAL = Case(
    ModelRef(name_or_path="smollm2", num_labels=1, max_length=128, num_hidden_layers=4),
    batch_size=8,
    causal=True,
)


class _Clock:
    """When each message left or reached a paho thread (one process, one clock)."""

    def __init__(self) -> None:
        self.sent: List[float] = []
        self.arrived_at_server: List[float] = []
        self.replied: List[float] = []
        self.arrived_at_device: List[float] = []

    def clear(self) -> None:
        for times in (self.sent, self.arrived_at_server, self.replied, self.arrived_at_device):
            times.clear()

    def legs_s(self) -> List[float]:
        """Per request: time on the wire up + down (publish call → the peer's paho thread)."""
        return [
            (up_in - up_out) + (down_in - down_out)
            for up_out, up_in, down_out, down_in in zip(
                self.sent, self.arrived_at_server, self.replied, self.arrived_at_device
            )
        ]


class _ServerLoop:
    """The coordinator's protocol thread in miniature: paho's thread queues, this one answers."""

    def __init__(self, link: MqttLink, topics: Topics, clock: _Clock) -> None:
        self.link = link
        self.topics = topics
        self.clock = clock
        self.handler: Callable[[str, str, bytes], Reply] = lambda *_: None
        self._inbox: queue.Queue[Tuple[str, bytes]] = queue.Queue()
        link.on_topic(lambda topic: True, self._arrived)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _arrived(self, topic: str, payload: bytes) -> None:
        self.clock.arrived_at_server.append(time.perf_counter())
        self._inbox.put((topic, payload))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            device_id, _, rest = self.topics.parse_device_topic(topic)
            reply = self.handler(device_id, "/".join(rest[1:]), payload)
            if reply is not None:
                down = self.topics.device(device_id, f"exchange/down/{reply[0]}")
                self.clock.replied.append(time.perf_counter())
                self.link.publish(down, reply[1])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _links(
    url: str, topics: Topics, clock: _Clock
) -> Tuple[MqttLink, MqttLink, Exchange, List[int]]:
    server = MqttLink(
        BrokerSpec(url=url), "bench-split-server", [topics.all_devices("exchange/up/#")]
    )
    device = MqttLink(
        BrokerSpec(url=url), "bench-split-device", [topics.device(DEVICE_ID, "exchange/down/#")]
    )
    request_sizes: List[int] = []

    def publish(topic: str, payload: bytes) -> int:
        request_sizes.append(len(payload))
        clock.sent.append(time.perf_counter())
        return device.publish(topic, payload)

    exchange = Exchange(topics, DEVICE_ID, publish)
    prefix = exchange.down_prefix

    def deliver(topic: str, payload: bytes) -> None:
        clock.arrived_at_device.append(time.perf_counter())
        exchange.deliver(topic, payload)

    device.on_topic(lambda topic: topic.startswith(prefix), deliver)
    server.connect()
    device.connect()
    return server, device, exchange, request_sizes


def _split_batches(
    loop: _ServerLoop, exchange: Exchange, request_sizes: List[int], batches: int, case: Case
) -> Dict[str, Any]:
    """Real split training steps; per batch: wait, server compute, request and reply sizes."""
    method = SplitMethod({"cut_layer": CUT_LAYER}, case.ref)
    device_model = method.build(None, seed=0)
    server = SplitServer(copy.deepcopy(device_model), method.config, case.ref.max_length, "cpu")
    server.begin_round(0)
    reply_sizes: List[int] = []

    def handle(device_id: str, subtopic: str, payload: bytes) -> Reply:
        reply = server.handle(device_id, subtopic, payload)
        if reply is not None:
            reply_sizes.append(len(reply[1]))
        return reply

    loop.handler = handle
    layout = method.layout(device_model)
    layout.release_server_layers()
    transport = ExchangeTransport(exchange, timeout_s=30.0, max_retries=0)
    loss_fn = SplitBatchLoss(layout, transport, 0, "fp32")
    params = [p for p in device_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    device_model.train()
    waits, servers = [], []
    shapes = set()
    for batch in case.batches(batches):
        shapes.add(tuple(batch["input_ids"].shape))
        wait_before, server_before = loss_fn.traffic.wait_s, loss_fn.traffic.server_s
        optimizer.zero_grad(set_to_none=True)
        loss_fn(device_model, batch).backward()
        optimizer.step()
        waits.append(loss_fn.traffic.wait_s - wait_before)
        servers.append(loss_fn.traffic.server_s - server_before)
    return {
        "wait_s": waits,
        "server_s": servers,
        "request_bytes": list(request_sizes),
        "reply_bytes": reply_sizes,
        "hidden_shape": (*max(shapes), int(device_model.config.hidden_size)),
    }


def _echo_round_trips(
    loop: _ServerLoop, exchange: Exchange, requests: List[int], replies: List[int]
) -> List[float]:
    """Move payloads of the same sizes through the same broker and threads, no processing."""
    answers = [bytes(size) for size in replies]
    index = {"next": 0}

    def echo(device_id: str, subtopic: str, payload: bytes) -> Reply:
        answer = answers[index["next"]]
        index["next"] += 1
        return "grad", answer

    loop.handler = echo
    exchange.drain()
    round_trips = []
    for size in requests:
        payload = bytes(size)
        started = time.perf_counter()
        exchange.send("fwd", payload)
        exchange.receive(30.0)
        round_trips.append(time.perf_counter() - started)
    return round_trips


def _codec_ms(hidden_shape: Tuple[int, int, int], causal: bool) -> float:
    """Encode + decode of one request and its reply, in-process (part of the overhead)."""
    from jetfed.edge.methods.split import decode_split_message

    batch, length, width = hidden_shape
    header = SplitHeader(kind="fwd", session=SESSION, round_index=0, step=1)
    tensors = {
        "hidden": torch.randn(batch, length, width),
        "attention_mask": torch.ones(batch, length, dtype=torch.int64),
        "labels": torch.zeros((batch, length) if causal else (batch,), dtype=torch.int64),
    }
    repeats = 50
    started = time.perf_counter()
    for _ in range(repeats):
        decode_split_message(encode_split_message(header, tensors))
        decode_split_message(encode_split_message(header, {"grad": tensors["hidden"]}))
    return (time.perf_counter() - started) / repeats * 1e3


def overhead(quick: bool, case: Case) -> Dict[str, Any]:
    batches = 12 if quick else 40
    warmup = 2
    topics = Topics("bench-split")
    clock = _Clock()
    with tempfile.TemporaryDirectory() as tmp:
        broker = MosquittoBroker(Path(tmp), free_port())
        broker.start()
        server_link, device_link, exchange, request_sizes = _links(broker.url, topics, clock)
        loop = _ServerLoop(server_link, topics, clock)
        try:
            split = _split_batches(loop, exchange, request_sizes, batches, case)
            legs = clock.legs_s()
            clock.clear()
            echo = _echo_round_trips(loop, exchange, split["request_bytes"], split["reply_bytes"])
            echo_legs = clock.legs_s()
        finally:
            loop.stop()
            device_link.close()
            server_link.close()
            broker.stop()
    transport = [w - s for w, s in zip(split["wait_s"], split["server_s"])][warmup:]
    beyond = [t - leg for t, leg in zip(transport, legs[warmup:])]
    echo_beyond = [rtt - leg for rtt, leg in zip(echo, echo_legs)][warmup:]
    versus_echo = [t - rtt for t, rtt in zip(transport, echo[warmup:])]

    def ms(values: List[float]) -> Dict[str, float]:
        return {"median": 1e3 * statistics.median(values), "mean": 1e3 * statistics.mean(values)}

    return {
        "model": case.ref.name_or_path,
        "layers": case.ref.num_hidden_layers,
        "hidden_shape_max": list(split["hidden_shape"]),
        "batches_measured": len(beyond),
        "mean_request_bytes": statistics.mean(split["request_bytes"]),
        "mean_reply_bytes": statistics.mean(split["reply_bytes"]),
        "server_compute_ms": ms(split["server_s"][warmup:]),
        "wait_minus_server_compute_ms": ms(transport),
        "mqtt_legs_ms": ms(legs[warmup:]),
        "overhead_beyond_tensors_ms": ms(beyond),
        "echo_round_trip_ms": ms(echo[warmup:]),
        "echo_round_trip_beyond_legs_ms": ms(echo_beyond),
        "wait_minus_server_compute_minus_echo_ms": ms(versus_echo),
        "codec_encode_decode_ms": _codec_ms(split["hidden_shape"], case.causal),
        "goal_ms": 10.0,
        "cpu_load_1min": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
    }


# --------------------------------------------------------------------------- bytes per round


def _message_bytes(kind: str, tensors: Dict[str, torch.Tensor]) -> int:
    header = SplitHeader(
        kind=kind,
        session=SESSION,
        round_index=12,
        step=49,
        loss=0.6931471805599453 if kind == "grad" else None,
        server_s=0.012345678901234 if kind in ("grad", "top") else None,
    )
    return len(encode_split_message(header, tensors))


def _split_batch_bytes(batch: int, length: int, dtype: str, u_shaped: bool) -> Tuple[int, int]:
    """(up, down) payload bytes of one batch, encoded exactly as on the wire."""
    act = torch.zeros(batch, length, 384, dtype=torch_dtype(dtype))
    up = {"hidden": act, "attention_mask": torch.zeros(batch, length, dtype=torch.int64)}
    if u_shaped:
        fwd, top = _message_bytes("fwd", up), _message_bytes("top", {"top": act})
        bwd, grad = _message_bytes("bwd", {"grad": act}), _message_bytes("grad", {"grad": act})
        return fwd + bwd, top + grad
    up["labels"] = torch.zeros(batch, dtype=torch.int64)
    return _message_bytes("fwd", up), _message_bytes("grad", {"grad": act})


def _batch_lengths(quick: bool) -> List[int]:
    """Padded lengths of the SST-2 batches one device sees in one round (dynamic padding)."""
    dataset, tokenizer = _dataset(), load_tokenizer(_model_ref())
    lengths = []
    for indices in batch_indices(len(dataset), BATCH_SIZE, LOCAL_STEPS, seed=0):
        batch = tokenize_batch(tokenizer, dataset, indices, MAX_LENGTH, "cpu")
        lengths.append(int(batch["input_ids"].shape[1]))
    return lengths


def bytes_per_round(quick: bool) -> Dict[str, Any]:
    ref = _model_ref()
    lora = LoraMethod({}, ref)
    lora_model = lora.build(None, seed=0)
    lora_state = len(encode_tensors(lora.get_state(lora_model)))
    full_params = sum(p.numel() for p in lora_model.get_base_model().parameters())
    lengths = _batch_lengths(quick)
    rows: Dict[str, Dict[str, float]] = {
        "lora_r8": {"down": lora_state, "up": lora_state, "per_batch": 0},
        "full_fp32": {"down": 4 * full_params, "up": 4 * full_params, "per_batch": 0},
    }
    for u_shaped in (False, True):
        method = SplitMethod({"cut_layer": CUT_LAYER, "u_shaped": u_shaped}, ref)
        state = len(encode_tensors(method.get_state(lora_model)))
        for dtype in ("fp32", "fp16"):
            per_batch = [_split_batch_bytes(BATCH_SIZE, n, dtype, u_shaped) for n in lengths]
            up = state + sum(b[0] for b in per_batch)
            down = state + sum(b[1] for b in per_batch)
            name = f"split_{'u_shaped' if u_shaped else 'labels'}_{dtype}"
            rows[name] = {
                "down": down,
                "up": up,
                "per_batch": sum(b[0] + b[1] for b in per_batch) / len(per_batch),
            }
    for row in rows.values():
        row["total_mb"] = (row["down"] + row["up"]) / 1e6
    return {
        "budget": f"{LOCAL_STEPS} steps x batch {BATCH_SIZE}, SST-2, max_length {MAX_LENGTH}",
        "cut_layer": CUT_LAYER,
        "mean_padded_length": statistics.mean(lengths),
        "model_params": full_params,
        "per_device_per_round_bytes": rows,
    }


def causal_overhead(quick: bool) -> Dict[str, Any]:
    """The decoder case on one torch thread (2 threads stall on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return overhead(quick, CAUSAL)
    finally:
        torch.set_num_threads(threads)


def run(quick: bool) -> Dict[str, Any]:
    torch.manual_seed(0)
    return {
        "quick": quick,
        "overhead": overhead(quick, CLASSIFIER),
        "overhead_causal": causal_overhead(quick),
        "bytes": bytes_per_round(quick),
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
