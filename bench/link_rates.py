"""How closely emulated links (`--link`, coordinator/links) keep their rate and delay: TCP up and
down and MQTT through a real Mosquitto, timed and compared with what the spec implies; round
trips as TCP connect times. Needs root (network namespaces); tests/test_links.py checks the same
paths by bytes, without timing. Measured numbers: docs/LINKS.md ("Measured")."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Dict, List, Tuple

from jetfed.coordinator.links import LinkedFleet, LinkSpec
from jetfed.coordinator.links.netns import ROOT_ERROR, require_root
from jetfed.coordinator.local_mosquitto import LocalMosquitto
from jetfed.edge.errors import UserError

MIB = 1 << 20
PREFIX = "jfb"


def python_in(fleet: LinkedFleet, index: int, code: str, *args: object) -> subprocess.Popen[str]:
    """A Python snippet run in device `index`'s namespace; it reports on stdout."""
    argv = [sys.executable, "-c", textwrap.dedent(code)] + [str(arg) for arg in args]
    return subprocess.Popen(
        fleet.device_command(index, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen[str], timeout_s: float = 120) -> str:
    stdout, stderr = process.communicate(timeout=timeout_s)
    if process.returncode != 0:
        raise RuntimeError(f"snippet failed: {stderr.strip()}")
    return stdout


def listener(host: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen()
    return sock


def _receive_all(server: socket.socket, result: Dict[str, float]) -> None:
    """Accept one connection and time its bytes from the first to the last."""
    connection, _ = server.accept()
    received, first_s = 0, 0.0
    with connection:
        while data := connection.recv(MIB):
            first_s = first_s or time.monotonic()
            received += len(data)
    result["seconds"] = time.monotonic() - first_s
    result["bytes"] = received


def upload(fleet: LinkedFleet, index: int, n_bytes: int) -> Tuple[int, float]:
    """(bytes received, seconds from first to last) of a TCP upload from device `index`."""
    server = listener(fleet.broker_host)
    result: Dict[str, float] = {}
    receiver = threading.Thread(target=_receive_all, args=(server, result))
    receiver.start()
    sender = f"""
        import socket
        with socket.create_connection(({fleet.broker_host!r}, {server.getsockname()[1]})) as sock:
            sock.sendall(bytes({n_bytes}))
    """
    finish(python_in(fleet, index, sender))
    receiver.join(timeout=120)
    server.close()
    return int(result["bytes"]), result["seconds"]


RECEIVER = """
    import socket, sys, time
    with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as sock:
        received, first_s = 0, 0.0
        while data := sock.recv(1 << 20):
            first_s = first_s or time.monotonic()
            received += len(data)
    print(received, time.monotonic() - first_s)
"""


def download(fleet: LinkedFleet, index: int, n_bytes: int) -> Tuple[int, float]:
    """(bytes received, seconds from first to last) of a TCP download to device `index`."""
    server = listener(fleet.broker_host)
    receiver = python_in(fleet, index, RECEIVER, fleet.broker_host, server.getsockname()[1])
    connection, _ = server.accept()
    with connection:
        connection.sendall(bytes(n_bytes))
    server.close()
    received, seconds = finish(receiver).split()
    return int(received), float(seconds)


SUBSCRIBER = """
    import sys, time
    import paho.mqtt.client as mqtt
    host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    received = []
    def on_message(client, userdata, message):
        received.append(len(message.payload))
        if sum(received) >= total:
            print("done", len(received), time.time(), flush=True)
            client.disconnect()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="links-sub")
    client.on_message = on_message
    client.on_subscribe = lambda *args: print("subscribed", flush=True)
    client.connect(host, port)
    client.subscribe("jetfed/links-test/#", qos=1)
    client.loop_forever()
"""

PUBLISHER = """
    import sys, time
    import paho.mqtt.client as mqtt
    host, port, chunks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="links-pub")
    client.connect(host, port)
    client.loop_start()
    payload = bytes(1 << 20)
    start = time.time()
    infos = [client.publish(f"jetfed/links-test/{i}", payload, qos=1) for i in range(chunks)]
    for info in infos:
        info.wait_for_publish(timeout=120)
    print(start, time.time() - start, flush=True)
    client.loop_stop()
    client.disconnect()
"""


def mqtt_relay(fleet: LinkedFleet, host: str, port: int, chunks: int) -> Dict[str, float]:
    """Device 0 publishes `chunks` × 1 MiB at QoS 1 to the broker at host:port; device 1,
    subscribed, receives them: chunks delivered, publish seconds (first publish to last PUBACK),
    end-to-end seconds (first publish to last delivery)."""
    subscriber = python_in(fleet, 1, SUBSCRIBER, host, port, chunks * MIB)
    assert subscriber.stdout is not None
    if subscriber.stdout.readline().strip() != "subscribed":
        raise RuntimeError(f"subscriber failed: {finish(subscriber)}")
    start, publish_s = map(
        float, finish(python_in(fleet, 0, PUBLISHER, host, port, chunks)).split()
    )
    _, delivered, done = finish(subscriber).split()
    return {"chunks": int(delivered), "publish_s": publish_s, "end_to_end_s": float(done) - start}


CONNECT_RTT = """
    import socket, sys, time
    rtts = []
    for _ in range(int(sys.argv[3])):
        start = time.monotonic()
        socket.create_connection((sys.argv[1], int(sys.argv[2]))).close()
        rtts.append(time.monotonic() - start)
    print(" ".join(map(str, rtts)))
"""


def connect_rtts_s(fleet: LinkedFleet, count: int) -> List[float]:
    """Round trips measured as TCP connect times (SYN → SYN-ACK) from device 0; the kernel
    completes handshakes into the listen backlog, so nothing needs to accept them."""
    with listener(fleet.broker_host) as server:
        port = server.getsockname()[1]
        output = finish(python_in(fleet, 0, CONNECT_RTT, fleet.broker_host, port, count))
    return [float(word) for word in output.split()]


def _ratio(seconds: float, n_bytes: int, rate_bit_s: float) -> Dict[str, float]:
    implied_s = n_bytes * 8 / rate_bit_s
    return {"seconds": seconds, "implied_s": implied_s, "ratio": seconds / implied_s}


def run(quick: bool = False) -> Dict[str, Any]:
    try:
        require_root()
    except UserError:
        return {"skipped": ROOT_ERROR}
    n_bytes = (5 if quick else 20) * MIB
    chunks = 5 if quick else 20
    results: Dict[str, Any] = {}
    for text in ("100mbit", "100mbit,20ms", "up=20mbit,down=100mbit"):
        spec = LinkSpec.parse(text)
        up_rate, down_rate = spec.up_rate_bit_s or 0.0, spec.down_rate_bit_s or 0.0
        with LinkedFleet(2, spec, prefix=PREFIX) as fleet:
            up_bytes = n_bytes if up_rate >= 1e8 else n_bytes // 4
            _, up_s = upload(fleet, 0, up_bytes)
            _, down_s = download(fleet, 0, n_bytes)
            entry: Dict[str, Any] = {
                "tcp_up": _ratio(up_s, up_bytes, up_rate),
                "tcp_down": _ratio(down_s, n_bytes, down_rate),
            }
            if up_rate == down_rate:
                with LocalMosquitto(host=fleet.broker_host) as broker:
                    mqtt = mqtt_relay(fleet, broker.host, broker.port, chunks)
                entry["mqtt_publish"] = _ratio(mqtt["publish_s"], chunks * MIB, up_rate)
                # the links pipeline the chunks: the last one still has to cross the down link
                entry["mqtt_end_to_end"] = _ratio(mqtt["end_to_end_s"], (chunks + 1) * MIB, up_rate)
        results[text] = entry
    for text in ("100mbit,20ms", "40ms±20ms"):
        with LinkedFleet(1, LinkSpec.parse(text), prefix=PREFIX) as fleet:
            rtts = connect_rtts_s(fleet, 20)
        results[f"rtt {text}"] = {"min_s": min(rtts), "max_s": max(rtts), "count": len(rtts)}
    return results
