"""The live fleet page: devices' live telemetry, the page server's guards, and the page itself
in headless chromium during a real `jetfed demo --ui` run (2 devices, 2 tiny rounds)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import psutil
import pytest

from jetfed.coordinator.registry import DeviceRecord
from jetfed.coordinator.ui.server import UiServer
from jetfed.coordinator.ui.state import LiveState
from jetfed.edge.errors import ProtocolError
from jetfed.edge.telemetry.live import LivePublisher
from jetfed.edge.telemetry.samples import Sample
from jetfed.edge.wire import (
    LIVE_TELEMETRY_MAX_BYTES,
    Hello,
    LiveSample,
    LiveTelemetry,
    parse_message,
)
from jetfed.profiles.records import load_run
from tests.browser import CHROMIUM, Browser
from tests.fleet import ENV, read_metrics
from tests.telemetry_trees import build_ina3221_tree

ORIN_RAILS = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO", "A", "B", "C")


def _sample(t_s: float, rails: Tuple[str, ...] = ORIN_RAILS) -> Sample:
    return Sample(
        t_s=t_s,
        host_monotonic_s=t_s,
        wall_unix_s=1.7e9 + t_s,
        rails_w={name: 1.234567 + i for i, name in enumerate(rails)},
        total_w=12.345678,
        rss_bytes=300_000_000,
        system_used_bytes=3_000_000_000,
    )


def test_page_and_report_agree_on_a_lower_is_better_metric(tmp_path: Path) -> None:
    """A causal-LM run judged by perplexity: the page's to-target is the report's (reached when
    the perplexity falls to the target), and the page names the metric."""
    from jetfed.coordinator.records import RoundMetrics
    from jetfed.coordinator.rundir import RunDir
    from jetfed.coordinator.ui.state import runs_json
    from jetfed.profiles.report import build_report

    run = RunDir(tmp_path / "run")
    run.create({"name": "ppl", "evaluation": {"metric": "perplexity"}})
    for index, perplexity in enumerate((9.0, 4.5, 3.0)):
        run.append_metrics(
            RoundMetrics(
                round_index=index,
                status="aggregated",
                method="lora",
                round_s=10.0,
                wall_clock_s=10.0 * (index + 1),
                extra={"perplexity": perplexity},
            )
        )
    page = runs_json([load_run(run.path)], 5.0)
    report = build_report([run.path], tmp_path / "report", target_accuracy=5.0)
    assert page["metric"] == "perplexity"
    reached = page["runs"][0]["to_target"]
    assert reached["reached"] and reached["rounds"] == 2 and reached["time_s"] == 20.0
    assert [asdict(row) for row in report.targets] == [reached]


# --------------------------------------------------------------------------- the device side


def test_live_publisher_sends_nothing_unless_asked_then_small_valid_messages() -> None:
    sent: List[bytes] = []
    publisher = LivePublisher("dev-1", sent.append)
    publisher.backend = "ina3221"
    for tick in range(100):  # 10 s at the sampler's default 10 Hz, nobody watching
        publisher.on_sample(_sample(tick / 10))
    assert sent == []
    publisher.enabled = True
    for tick in range(100, 300):  # 20 s watched
        publisher.on_sample(_sample(tick / 10))
    assert 15 <= len(sent) <= 21  # about one a second
    messages = [parse_message(LiveTelemetry, m, LIVE_TELEMETRY_MAX_BYTES) for m in sent]
    samples = [s for m in messages for s in m.samples]
    assert 60 <= len(samples) <= 81  # decimated to at most 4 Hz
    assert samples[0].rails_w["VDD_GPU_SOC"] == 1.235 and samples[0].total_w == 12.346
    bytes_per_s = sum(len(m) for m in sent) / 20
    assert bytes_per_s < 2000, f"{bytes_per_s:.0f} B/s of live telemetry with 7 rails"
    publisher.enabled = False
    publisher.on_sample(_sample(31.0))
    assert len(sent) == len(messages)


def test_live_publisher_drops_rail_names_the_wire_refuses() -> None:
    sent: List[bytes] = []
    publisher = LivePublisher("dev-1", sent.append)
    publisher.enabled = True
    publisher.on_sample(_sample(0.0, rails=("VDD_IN", "bad/name", "has space")))
    (message,) = [parse_message(LiveTelemetry, m) for m in sent]
    assert list(message.samples[0].rails_w) == ["VDD_IN"]


def test_live_publisher_never_raises_into_the_sampler_thread() -> None:
    def broken_link(payload: bytes) -> None:
        raise ConnectionError("not connected")

    publisher = LivePublisher("dev-1", broken_link)
    publisher.enabled = True
    publisher.on_sample(_sample(0.0))
    publisher.backend = "not a valid name"  # the message would not validate either
    publisher.on_sample(_sample(2.0))
    assert publisher.messages_sent == 0


@pytest.mark.parametrize(
    "mutation",
    [
        {"samples": []},
        {"samples": [{"wall_unix_s": 1.0, "total_w": -1.0}]},
        {"samples": [{"wall_unix_s": 1.0, "rails_w": {"a/b": 1.0}}]},
        {"samples": [{"wall_unix_s": 1.0}] * 17},
        {"samples": [{"wall_unix_s": 1.0, "rails_w": {f"R{i}": 1.0 for i in range(17)}}]},
        {"device_id": "../x"},
        {"extra": 1},
    ],
)
def test_bad_live_telemetry_is_refused(mutation: Dict[str, object]) -> None:
    message = {"device_id": "dev-1", "backend": "psutil", "samples": [{"wall_unix_s": 1.0}]}
    with pytest.raises(ProtocolError):
        parse_message(LiveTelemetry, json.dumps({**message, **mutation}).encode())


def test_oversized_live_telemetry_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="bytes >"):
        parse_message(
            LiveTelemetry, b" " * (LIVE_TELEMETRY_MAX_BYTES + 1), LIVE_TELEMETRY_MAX_BYTES
        )


# --------------------------------------------------------------------------- the page server


def _non_loopback_ipv4() -> Optional[str]:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    return None


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[UiServer]:
    state = LiveState("test", [tmp_path / "no-run-yet"], rounds_total=2)
    with UiServer(state, "0.0.0.0", 0) as server:
        yield server


def _get(url: str, headers: Optional[Dict[str, str]] = None) -> Tuple[int, bytes, Dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _raw(port: int, request: bytes) -> bytes:
    """Send bytes as they are (no client fixes them up) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        chunks = []
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_beyond_loopback_a_token_is_required(page_server: UiServer) -> None:
    address = _non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to send from")
    assert page_server.token_generated and page_server.token
    assert f"?token={page_server.token}" in page_server.banner()
    outside = f"http://{address}:{page_server.port}"
    status, body, _ = _get(outside + "/api/state")
    assert status == 401 and b"token required" in body
    assert _get(outside + "/api/state?token=wrong")[0] == 401
    status, _, headers = _get(f"{outside}/?token={page_server.token}")
    assert status == 200 and "jetfed_ui_token=" in headers["Set-Cookie"]
    cookie = {"Cookie": f"jetfed_ui_token={page_server.token}"}
    assert _get(outside + "/api/state", cookie)[0] == 200
    bearer = {"Authorization": f"Bearer {page_server.token}"}
    assert _get(outside + "/static/app.js", bearer)[0] == 200
    assert _get(f"http://127.0.0.1:{page_server.port}/api/state")[0] == 200  # loopback


def test_only_packaged_files_are_served(page_server: UiServer) -> None:
    port = page_server.port
    for path in (
        "/static/../server.py",
        "/static/..%2fserver.py",
        "/static/%2e%2e/%2e%2e/state.py",
        "/static/vendor/../../server.py",
        "/static//etc/passwd",
        "/static/vendor",
        "/etc/passwd",
    ):
        answer = _raw(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status = int(answer.split()[1])
        assert status in (400, 404), (path, answer[:200])
        assert b"import" not in answer and b"root:" not in answer
    status, body, headers = _get(f"http://127.0.0.1:{port}/static/vendor/uPlot.LICENSE.txt")
    assert status == 200 and b"MIT" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]


def test_oversized_and_malformed_requests_are_answered_and_harmless(
    page_server: UiServer,
) -> None:
    port = page_server.port
    long_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n"
    huge_body = (
        b"POST /api/state HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 5000
    )
    for request in (
        long_header,
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HELLO THERE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS hello
        huge_body,
    ):
        answer = _raw(port, request)
        assert answer == b"" or int(answer.split()[1]) in (400, 405, 413, 414, 431), answer[:100]
    assert _get(f"http://127.0.0.1:{port}/api/state")[0] == 200


def _telemetry(device_id: str, t0: float, count: int) -> LiveTelemetry:
    samples = [
        LiveSample(wall_unix_s=t0 + i / 4, rails_w={r: 1.0 for r in ORIN_RAILS[:4]}, total_w=4.0)
        for i in range(count)
    ]
    return LiveTelemetry(device_id=device_id, backend="ina3221", samples=samples)


def test_stalled_pages_never_hold_up_the_protocol_thread(page_server: UiServer) -> None:
    """20 pages that never read: the observer hooks (the protocol thread's side) still return,
    the stalled pages are dropped, and a fresh page still gets every event."""
    state = page_server.state
    stalled = []
    for _ in range(20):
        conn = socket.create_connection(("127.0.0.1", page_server.port))
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.sendall(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
        stalled.append(conn)
    hello = Hello(
        device_id="dev-1",
        jetfed_version="0",
        hostname="h",
        machine="aarch64",
        accelerator="cuda",
        memory_total_bytes=1,
    )
    state.on_device(DeviceRecord("dev-1", online=True, hello=hello))
    done = threading.Event()

    def protocol_thread() -> None:
        for second in range(2000):  # ~30 min of one device's telemetry, as fast as possible
            state.on_telemetry(_telemetry("dev-1", 1.7e9 + second, 4))
        done.set()

    worker = threading.Thread(target=protocol_thread)
    worker.start()
    worker.join(timeout=120)
    assert done.is_set(), "an observer hook blocked behind stalled pages"
    snapshot = state.snapshot()
    assert len(snapshot["telemetry"]["dev-1"]) <= 1500  # bounded window
    status, body, _ = _get(f"http://127.0.0.1:{page_server.port}/api/state")
    assert status == 200 and json.loads(body)["devices"][0]["device_id"] == "dev-1"
    with socket.create_connection(("127.0.0.1", page_server.port), timeout=30) as fresh:
        fresh.sendall(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        state.on_telemetry(_telemetry("dev-1", 1.7e9 + 3000, 4))
        while b"event: telemetry" not in received:
            chunk = fresh.recv(65536)
            assert chunk, "the event stream closed"
            received += chunk
    for conn in stalled:
        conn.close()


# --------------------------------------------------------------------------- the page itself


def _start_demo(tmp_path: Path) -> Tuple[subprocess.Popen[str], str]:
    sysfs = tmp_path / "sysfs"
    build_ina3221_tree(
        sysfs, {"VDD_GPU_SOC": (5000, 900), "VDD_CPU_CV": (5000, 600), "VIN_SYS_5V0": (5000, 400)}
    )
    env = dict(ENV, JETFED_SYSFS_ROOT=str(sysfs), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "jetfed", "demo", "--clients", "2", "--rounds", "2"]
    command += ["--local-steps", "3", "--max-eval-samples", "32", "--name", "live-page"]
    command += ["--output-dir", str(tmp_path / "runs"), "--ui", "127.0.0.1:0"]
    command += ["--ui-linger-s", "120"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("live page: http"):
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep draining
            return process, line.split()[2]
    raise AssertionError(f"the demo printed no page address (exit {process.wait()})")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/setup.sh --test)")
def test_page_in_chromium_during_a_demo_run(tmp_path: Path) -> None:
    process, url = _start_demo(tmp_path)
    run_dir = tmp_path / "runs" / "live-page"
    try:
        asyncio.run(_watch_page(url, run_dir))
    finally:
        process.terminate()
        process.wait(timeout=30)
    _check_profiles_serve(run_dir)


def _check_profiles_serve(run_dir: Path) -> None:
    """`jetfed profiles serve` over the finished run: the report's numbers, one computation."""
    from jetfed.profiles.records import load_run
    from jetfed.profiles.summary import round_costs

    command = [sys.executable, "-m", "jetfed", "profiles", "serve", str(run_dir)]
    server = subprocess.Popen(
        [*command, "--ui", "127.0.0.1:0"], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split()[2]
        status, body, _ = _get(url + "api/state")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert status == 200
    (run,) = json.loads(body)["run"]["runs"]
    costs = round_costs(load_run(run_dir))
    assert [(r["round_index"], r["accuracy"], r["energy_j"]) for r in run["rounds"]] == [
        (c.round_index, c.accuracy, c.energy_j) for c in costs
    ]
    assert all(c.energy_j is not None for c in costs)  # the emulated INA3221 rails
    refused = subprocess.run(
        [*command[:-1], str(run_dir / "logs")], env=ENV, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "no metrics.jsonl" in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr


async def _watch_page(url: str, run_dir: Path) -> None:
    async with Browser(url) as page:
        rows = "document.querySelectorAll('#fleet tbody tr').length"
        await page.wait_for(f"{rows} === 2", timeout_s=300)
        counter = "document.getElementById('round-counter').dataset.round"
        await page.wait_for(f"{counter} === '0'", timeout_s=300)
        await page.wait_for(f"{counter} === '1'", timeout_s=300)  # it advances by itself
        points = (
            "Object.values(jetfedPage.charts).filter(c => c.points > 0 && c.key.includes(' W'))"
        )
        assert await page.wait_for(f"{points}.length === 2")
        await page.wait_for("jetfedPage.state.finished", timeout_s=300)
        table = await page.evaluate(
            "[...document.querySelectorAll('.run-table tbody tr')].map(r => "
            "[Number(r.dataset.round), r.dataset.accuracy, r.children[1].textContent])"
        )
    metrics = read_metrics(run_dir)
    assert table == [[m["round_index"], str(m["accuracy"]), m["status"]] for m in metrics]
    assert len(metrics) == 2
