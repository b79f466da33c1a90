"""Moving one full-model update (MiniLM fp32, 91 MB; SmolLM2-135M fp32, 538 MB) through a
loopback Mosquitto.

- throughput: a device process serves the update (BlobServer from its spool file), this process
  pulls it like the coordinator (Download: shared request window, per-chunk sha256, which
  verifies the whole with manifest v2, spool to disk), goal ≥ 100 MB/s and ≥ 0.5 × the rate of
  plain paho QoS 1 publishes of the same chunks through the same broker (the client library's
  own ceiling); measured in the same run as that and as a raw TCP loopback copy (sender
  process → this process, written to a file), the three interleaved; medians of the repeats,
  the ratios taken within each repeat.
- wire bytes: the same transfer with both clients behind byte-counting TCP proxies: every MQTT
  byte on the device's and the receiver's connections (chunks, requests, PUBACKs, headers),
  goal ≤ 1.02 × payload bytes.
- memory: a receiver subprocess holding the global state pulls 5 concurrent updates (the largest
  payload: SmolLM2's where installed) from 5 device processes, validates each, keeps it on disk
  and sums them with FedAvg; goal: peak RSS (VmHWM) ≤ 2 × model size + 300 MB.

Run: python -m bench.transfer_throughput [--quick]   (or python -m bench transfer_throughput)
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from bench.runner import table
from bench.stats import median
from jetfed.edge.errors import ProtocolError
from jetfed.edge.heap import release_freed_memory
from jetfed.edge.mqtt import BrokerSpec, MqttLink
from jetfed.edge.telemetry.memory import peak_rss_bytes
from jetfed.edge.topics import Topics
from jetfed.edge.transfer import (
    DEFAULT_WINDOW_BYTES,
    BlobServer,
    Download,
    SharedWindow,
)
from jetfed.edge.wire import BlobManifest, ChunkRequest, encode_message, parse_message

TOPICS = Topics("bench")
CHUNK_BYTES = int(os.environ.get("JETFED_BENCH_CHUNK_BYTES", 1 << 20))
GOAL_MB_S = 100.0
GOAL_PAHO_RATIO = 0.5
GOAL_WIRE_RATIO = 1.02
RSS_ALLOWANCE_BYTES = 300 << 20


# --------------------------------------------------------------------------- device process


def serve_main(url: str, device_id: str, path: str) -> None:
    """A device: offer the file, print its manifest, serve pulls until stdin closes."""
    link = MqttLink(
        BrokerSpec(url=url),
        client_id=f"bench-{device_id}",
        subscriptions=[TOPICS.device(device_id, "pull")],
    )

    def publish(topic: str, payload: bytes) -> None:
        link.publish(topic, payload)

    blobs = BlobServer(publish, CHUNK_BYTES, background=True)
    pull = TOPICS.device(device_id, "pull")

    def serve(topic: str, payload: bytes) -> None:
        request = parse_message(ChunkRequest, payload)
        blobs.serve(
            request.digest,
            request.indices,
            lambda digest, index: TOPICS.chunk(device_id, "up", digest, index),
        )

    link.on_topic(lambda topic: topic == pull, serve)
    link.connect()
    manifest = blobs.offer_file(path, CHUNK_BYTES)
    print(manifest.model_dump_json(), flush=True)
    sys.stdin.read()
    link.close()


class Devices:
    """Device processes serving `path`; their manifests are read from their first stdout line."""

    def __init__(self, url: str, path: str, count: int) -> None:
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.transfer_throughput", "serve", url, f"dev-{i}", path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            for i in range(count)
        ]
        self.manifests: Dict[str, BlobManifest] = {}
        for i, process in enumerate(self.processes):
            assert process.stdout is not None
            self.manifests[f"dev-{i}"] = BlobManifest.model_validate_json(process.stdout.readline())

    def close(self) -> None:
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --------------------------------------------------------------------------- receiving side


def _requester(link: MqttLink, device_id: str, digest: str) -> Callable[[List[int]], None]:
    pull = TOPICS.device(device_id, "pull")

    def request(indices: List[int]) -> None:
        message = ChunkRequest(device_id=device_id, digest=digest, indices=indices)
        link.publish(pull, encode_message(message))

    return request


def pull_all(
    link: MqttLink,
    manifests: Dict[str, BlobManifest],
    on_complete: Optional[Any] = None,
    limit_s: float = 600.0,
) -> Dict[str, Download]:
    """Pull every device's blob at once, as the coordinator does (one shared window);
    `on_complete(device, download)` runs as each finishes (the server keeps it for aggregation)."""
    window = SharedWindow(int(os.environ.get("JETFED_BENCH_WINDOW_BYTES", DEFAULT_WINDOW_BYTES)))
    downloads = {
        device_id: Download(
            manifest,
            _requester(link, device_id, manifest.digest),
            max_size_bytes=1 << 34,
            retry_after_s=5.0,
            timeout_s=120.0,
            window_bytes=window,
        )
        for device_id, manifest in manifests.items()
    }
    for download in downloads.values():
        download.start()
    pending = set(downloads)
    deadline = time.monotonic() + limit_s
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} transfers unfinished after {limit_s:.0f} s")
        try:
            topic, payload = link.inbox.get(timeout=0.2)
        except queue.Empty:
            for device_id in pending:
                downloads[device_id].poll()
            continue
        device_id, _, rest = TOPICS.parse_device_topic(topic)
        download = downloads[device_id]
        try:
            download.add_chunk(int(rest[1]), payload)
        except ProtocolError:
            continue
        if download.complete and device_id in pending:
            pending.discard(device_id)
            download.payload()
            if on_complete is not None:
                on_complete(device_id, download)
    return downloads


def receiver_link(url: str) -> MqttLink:
    link = MqttLink(
        BrokerSpec(url=url), client_id="bench-receiver", subscriptions=[TOPICS.all_devices("up/#")]
    )
    link.connect()
    return link


def mqtt_transfer_s(url: str, path: str) -> float:
    """Seconds to pull one update from a device process (verified, on disk)."""
    devices = Devices(url, path, 1)
    link = receiver_link(url)
    try:
        start = time.perf_counter()
        downloads = pull_all(link, devices.manifests)
        seconds = time.perf_counter() - start
        for download in downloads.values():
            download.close()
        return seconds
    finally:
        link.close()
        devices.close()


def wire_bytes(url: str, path: str) -> Dict[str, int]:
    """Every byte on the device's and the receiver's MQTT connections during one transfer."""
    from bench.tcp_counter import CountingProxy

    host, port, _ = BrokerSpec(url=url).endpoint()
    device_proxy, receiver_proxy = CountingProxy(host, port), CountingProxy(host, port)
    devices = Devices(device_proxy.url, path, 1)
    link = receiver_link(receiver_proxy.url)
    try:
        device_proxy.reset()
        receiver_proxy.reset()
        for download in pull_all(link, devices.manifests).values():
            download.close()
        time.sleep(0.5)  # the last PUBACKs
        device_up, device_down = device_proxy.reset()
        receiver_up, receiver_down = receiver_proxy.reset()
    finally:
        link.close()
        devices.close()
        device_proxy.close()
        receiver_proxy.close()
    return {
        "device_sent_bytes": device_up,
        "device_received_bytes": device_down,
        "receiver_sent_bytes": receiver_up,
        "receiver_received_bytes": receiver_down,
    }


# --------------------------------------------------------------------------- paho alone


def paho_publish_main(url: str, path: str) -> None:
    """Publish the file as chunk-sized QoS 1 messages as fast as paho goes (no protocol)."""
    link = MqttLink(BrokerSpec(url=url), client_id="bench-paho-pub", subscriptions=[])
    link.connect()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            link.publish(TOPICS.device("paho", "up/x/0"), chunk)
    link.wait_published(120)
    link.close()


def paho_alone_s(url: str, path: str) -> float:
    """Seconds for the same bytes as plain paho QoS 1 publishes through the same broker: the
    client library's own ceiling, which the chunk protocol runs on."""
    count = -(-os.path.getsize(path) // CHUNK_BYTES)
    link = MqttLink(
        BrokerSpec(url=url), client_id="bench-paho-sub", subscriptions=[TOPICS.all_devices("up/#")]
    )
    link.connect()
    time.sleep(0.3)
    try:
        sender = subprocess.Popen(
            [sys.executable, "-m", "bench.transfer_throughput", "paho-pub", url, path]
        )
        link.inbox.get(timeout=60)
        start = time.perf_counter()  # from the first message: not the sender's interpreter start
        for _ in range(count - 1):
            link.inbox.get(timeout=60)
        seconds = (time.perf_counter() - start) * count / (count - 1)
        sender.wait()
        return seconds
    finally:
        link.close()


# --------------------------------------------------------------------------- raw TCP baseline


def tcp_send_main(port: str, path: str) -> None:
    with socket.create_connection(("127.0.0.1", int(port))) as sock, open(path, "rb") as handle:
        sock.sendfile(handle)


def raw_tcp_copy_s(path: str) -> float:
    """Seconds to copy the file from another process over loopback TCP into a file here."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    size = os.path.getsize(path)
    buffer = bytearray(CHUNK_BYTES)
    with tempfile.TemporaryFile() as sink:
        sender = subprocess.Popen(
            [sys.executable, "-m", "bench.transfer_throughput", "tcp-send", str(port), path]
        )
        connection, _ = listener.accept()
        start = time.perf_counter()  # from the connection: not the sender's interpreter start
        received = 0
        with connection:
            while received < size:
                count = connection.recv_into(buffer)
                if not count:
                    break
                sink.write(memoryview(buffer)[:count])
                received += count
        seconds = time.perf_counter() - start
    sender.wait()
    listener.close()
    if received != size:
        raise RuntimeError(f"raw TCP copy got {received} of {size} bytes")
    return seconds


# --------------------------------------------------------------------------- memory


def receive_main(url: str, manifests_path: str, global_path: str) -> None:
    """The coordinator's receiving path in its own process: global state in memory, 5 pulls,
    each validated (TensorFile) and kept on disk, then FedAvg's row-block sum; prints RSS."""
    import psutil

    from jetfed.coordinator.strategies.base import AcceptedUpdate, ServerContext
    from jetfed.coordinator.strategies.fedavg import FedAvg
    from jetfed.edge.tensorfile import TensorFile
    from jetfed.edge.wire import Update

    process = psutil.Process()
    global_state = dict(TensorFile(global_path))
    spec = {name: tuple(t.shape) for name, t in global_state.items()}
    baseline = process.memory_info().rss
    marks = {"peak_rss_before_bytes": (peak_rss_bytes() or 0)}
    manifests = {
        device_id: BlobManifest.model_validate(raw)
        for device_id, raw in json.loads(Path(manifests_path).read_text()).items()
    }
    strategy = FedAvg(ServerContext.aggregation_only())
    sampled_peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            sampled_peak[0] = max(sampled_peak[0], process.memory_info().rss)

    threading.Thread(target=sample, daemon=True).start()

    def keep(device_id: str, download: Download) -> None:
        update = Update(
            experiment="bench",
            device_id=device_id,
            round_index=0,
            base_digest="0" * 64,
            num_samples=100,
            local_steps=1,
            train_loss=0.5,
            blob=download.manifest,
        )
        accepted.append(AcceptedUpdate(update, TensorFile(download.payload(), spec)))
        spooled.append(download)  # read at aggregate, as the server keeps it

    spooled: List[Download] = []
    accepted: List[AcceptedUpdate] = []
    link = receiver_link(url)
    start = time.perf_counter()
    pull_all(link, manifests, on_complete=keep)
    seconds = time.perf_counter() - start
    marks["peak_rss_received_bytes"] = peak_rss_bytes() or 0
    release_freed_memory()  # as the coordinator's Intake.close_round does
    marks["rss_received_bytes"] = process.memory_info().rss
    global_state = strategy.aggregate(0, global_state, accepted)
    done.set()
    for download in spooled:
        download.close()
    link.close()
    peak = max(sampled_peak[0], (peak_rss_bytes() or 0))
    result = {"baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "seconds": seconds}
    print(json.dumps({**result, **marks}))


def concurrent_rss(url: str, path: str, devices_count: int, workdir: str) -> Dict[str, Any]:
    devices = Devices(url, path, devices_count)
    manifests_path = os.path.join(workdir, "manifests.json")
    Path(manifests_path).write_text(
        json.dumps({d: m.model_dump() for d, m in devices.manifests.items()})
    )
    try:
        output = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.transfer_throughput",
                "receive",
                url,
                manifests_path,
                path,
            ],
            check=True,
            stdout=subprocess.PIPE,
            timeout=900,
        ).stdout
    finally:
        devices.close()
    return dict(json.loads(output.decode().strip().splitlines()[-1]))


# --------------------------------------------------------------------------- the bench


def _payloads(workdir: str) -> Dict[str, Tuple[str, int]]:
    """Full-model updates as random fp32 deltas, written as the agent writes them: MiniLM's
    (91 MB) and, where the packaged SmolLM2 is installed, SmolLM2-135M's (538 MB)."""
    from bench.tensors import full_spec, random_tensors, smollm2_full_spec
    from jetfed.edge.errors import UserError
    from jetfed.edge.tensorfile import write_tensor_file

    specs = {"minilm": full_spec}
    found: Dict[str, Tuple[str, int]] = {}
    try:
        smollm2_full_spec()
        specs["smollm2"] = smollm2_full_spec
    except UserError as exc:
        print(f"transfer_throughput: no 538 MB case ({exc})", file=sys.stderr)
    for name, spec in specs.items():
        path = os.path.join(workdir, f"{name}.safetensors")
        found[name] = (path, write_tensor_file(path, random_tensors(spec(), seed=0)))
    return found


def throughput(url: str, path: str, size: int, repeats: int) -> Dict[str, Any]:
    """Raw TCP, plain paho and the chunk protocol, interleaved so that each repeat's three see
    the same machine load; the ratio to paho is taken within each repeat, then the median."""
    mqtt_s: List[float] = []
    tcp_s: List[float] = []
    paho_s: List[float] = []
    for _ in range(repeats):
        tcp_s.append(raw_tcp_copy_s(path))
        paho_s.append(paho_alone_s(url, path))
        mqtt_s.append(mqtt_transfer_s(url, path))
    mb = size / 1e6
    ratios = [paho / mqtt for paho, mqtt in zip(paho_s, mqtt_s)]
    return {
        "payload_bytes": size,
        "mqtt_seconds": mqtt_s,
        "paho_alone_seconds": paho_s,
        "raw_tcp_seconds": tcp_s,
        "mqtt_mb_per_s": mb / median(mqtt_s),
        "paho_alone_mb_per_s": mb / median(paho_s),
        "raw_tcp_mb_per_s": mb / median(tcp_s),
        "mqtt_over_paho_alone_each": ratios,
        "mqtt_over_paho_alone": median(ratios),
        "mqtt_over_raw_tcp": median([tcp / mqtt for tcp, mqtt in zip(tcp_s, mqtt_s)]),
        "ratio_ok": median(ratios) >= GOAL_PAHO_RATIO,
        "throughput_ok": mb / median(mqtt_s) >= GOAL_MB_S,
        "load_average_1m_after": os.getloadavg()[0],
    }


def run(quick: bool = False) -> Dict[str, Any]:
    from bench.broker import private_mosquitto

    repeats = 3 if quick else 5
    with ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="jetfed-xfer-"))
        broker = stack.enter_context(private_mosquitto())
        payloads = _payloads(workdir)
        rates = {
            name: throughput(broker.url, path, size, repeats)
            for name, (path, size) in payloads.items()
        }
        small_path, small_size = payloads["minilm"]
        wire = wire_bytes(broker.url, small_path)
        largest = max(payloads, key=lambda name: payloads[name][1])
        big_path, big_size = payloads[largest]
        memory = concurrent_rss(broker.url, big_path, 5, workdir)
    device_wire = wire["device_sent_bytes"] + wire["device_received_bytes"]
    receiver_wire = wire["receiver_sent_bytes"] + wire["receiver_received_bytes"]
    limit = 2 * big_size + RSS_ALLOWANCE_BYTES
    return {
        "chunk_size_bytes": CHUNK_BYTES,
        "window_bytes": int(os.environ.get("JETFED_BENCH_WINDOW_BYTES", DEFAULT_WINDOW_BYTES)),
        "repeats": repeats,
        "goal_mb_per_s": GOAL_MB_S,
        "goal_paho_ratio": GOAL_PAHO_RATIO,
        "throughput": rates,
        **wire,
        "device_wire_ratio": device_wire / small_size,
        "receiver_wire_ratio": receiver_wire / small_size,
        "goal_wire_ratio": GOAL_WIRE_RATIO,
        "wire_ok": max(device_wire, receiver_wire) / small_size <= GOAL_WIRE_RATIO,
        "receive5_payload": largest,
        "receive5_payload_bytes": big_size,
        "receive5_seconds": memory["seconds"],
        "receive5_baseline_rss_bytes": memory["baseline_rss_bytes"],
        "receive5_peak_rss_bytes": memory["peak_rss_bytes"],
        "receive5_rss_after_transfers_bytes": memory["rss_received_bytes"],
        "receive5_rss_limit_bytes": limit,
        "rss_ok": memory["peak_rss_bytes"] <= limit,
    }


def markdown(results: Dict[str, Any]) -> str:
    rows = [
        [
            name,
            r["payload_bytes"] / 1e6,
            r["mqtt_mb_per_s"],
            r["paho_alone_mb_per_s"],
            r["raw_tcp_mb_per_s"],
            r["mqtt_over_paho_alone"],
            ", ".join(f"{ratio:.2f}" for ratio in r["mqtt_over_paho_alone_each"]),
            r["load_average_1m_after"],
        ]
        for name, r in results["throughput"].items()
    ]
    header = [
        "update",
        "MB",
        "chunk protocol MB/s",
        "plain paho MB/s",
        "raw TCP MB/s",
        "ratio to paho (median)",
        "each repeat",
        "load average after",
    ]
    limit = results["receive5_rss_limit_bytes"]
    return "\n".join(
        [
            f"Medians of {results['repeats']} interleaved repeats; chunks of "
            f"{results['chunk_size_bytes']} B, window {results['window_bytes']} B (shared).",
            "",
            table(header, rows),
            "",
            f"Goal: ratio to plain paho ≥ {results['goal_paho_ratio']}, ≥ "
            f"{results['goal_mb_per_s']:.0f} MB/s. Wire bytes (91 MB): device "
            f"{results['device_wire_ratio']:.5f} ×, receiver "
            f"{results['receiver_wire_ratio']:.5f} × the payload "
            f"(goal ≤ {results['goal_wire_ratio']}).",
            "",
            f"5 concurrent {results['receive5_payload']} updates "
            f"({results['receive5_payload_bytes'] / 1e6:.0f} MB each) received and aggregated in "
            f"{results['receive5_seconds']:.1f} s: peak RSS (VmHWM) "
            f"{results['receive5_peak_rss_bytes'] / 1e6:.0f} MB, limit 2 × model + 300 MB = "
            f"{limit / 1e6:.0f} MB ({'met' if results['rss_ok'] else 'NOT met'}).",
        ]
    )


def main(argv: List[str]) -> None:
    if argv[:1] == ["serve"]:
        serve_main(*argv[1:4])
    elif argv[:1] == ["paho-pub"]:
        paho_publish_main(*argv[1:3])
    elif argv[:1] == ["tcp-send"]:
        tcp_send_main(*argv[1:3])
    elif argv[:1] == ["receive"]:
        receive_main(*argv[1:4])
    else:
        print(json.dumps(run(quick="--quick" in argv), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
