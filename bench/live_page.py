"""The live page's cost on the coordinator: CPU of the page server's thread while pages watch a
10-device run (simulated at the real message rates: 1 `LiveTelemetry` of 4 samples × 7 rails
and 1 `Progress` a second per device), and the protocol thread's time per observer call with
and without 20 idle pages open. Without --quick also a real local fleet (2 devices, 5 rounds of
10 steps, rounds 1-4 timed, after a warm-up fleet) without the page and with it and 20 idle
pages open (connected, never reading), in 3 interleaved pairs (A B, B A, A B) so the machine's
drift falls on both sides: the rounds' seconds and each pair's change.
Run: python -m bench.live_page [--quick]
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import psutil

from jetfed.coordinator.ui.server import UiServer
from jetfed.coordinator.ui.state import LiveState
from jetfed.edge.wire import LiveSample, LiveTelemetry, Progress

RAILS = ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO", "A", "B", "C")


def _telemetry(device_id: str, t0: float) -> LiveTelemetry:
    samples = [
        LiveSample(
            wall_unix_s=t0 + i / 4,
            rails_w={r: 1.0 + i for r in RAILS},
            total_w=9.0,
            rss_bytes=10**9,
            system_used_bytes=3 * 10**9,
        )
        for i in range(4)
    ]
    return LiveTelemetry(device_id=device_id, backend="ina3221", samples=samples)


def _drain(conn: socket.socket) -> None:
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass


def _open_pages(server: UiServer, count: int, read: bool) -> List[socket.socket]:
    """`count` event streams, connected before this returns; reading ones are drained by a
    thread, idle ones never read."""
    before = server.pages_open
    pages = []
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", server.port))
        conn.sendall(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
        pages.append(conn)
        if read:
            threading.Thread(target=_drain, args=(conn,), daemon=True).start()
    while server.pages_open < before + count:
        time.sleep(0.05)
    return pages


def _close_pages(server: UiServer, pages: List[socket.socket]) -> None:
    """Close them and wait until the server has seen it (else the next `_open_pages` counts
    pages that are about to go, and waits for ever)."""
    for page in pages:
        page.close()
    while server.pages_open:
        time.sleep(0.05)


def _server_thread_cpu_s() -> float:
    process = psutil.Process()
    ui_ids = {t.native_id for t in threading.enumerate() if t.name == "ui-server"}
    return sum(t.user_time + t.system_time for t in process.threads() if t.id in ui_ids)


def _feed(state: LiveState, devices: int, seconds: int, real_time: bool) -> float:
    """The protocol thread's side: returns seconds spent inside observer calls."""
    spent_s = 0.0
    t0 = time.time()
    for second in range(seconds):
        for index in range(devices):
            device_id = f"dev-{index:02d}"
            telemetry = _telemetry(device_id, t0 + second)
            progress = Progress(
                device_id=device_id,
                round_index=0,
                phase="train",
                step=second % 50 + 1,
                total_steps=50,
                bytes_received=1000,
                bytes_sent=1000,
            )
            started = time.perf_counter()
            state.on_telemetry(telemetry)
            state.on_progress(progress)
            spent_s += time.perf_counter() - started
        if real_time:
            time.sleep(max(0.0, t0 + second + 1 - time.time()))
    return spent_s


def _fleet_round_s(out_dir: Path, pages: int) -> List[float]:
    """Round seconds of rounds 1.. (round 0 also loads the model) of a tiny local fleet."""
    from contextlib import ExitStack

    from jetfed.coordinator.demo import DEMO_DATA, demo_config
    from jetfed.coordinator.fleet import run_local_fleet

    config = demo_config(
        f"bench-live-page-{pages}", "lora", 2, 5, 10, str(DEMO_DATA), str(out_dir), "iid", 1.0,
        32, None,
    )  # fmt: skip
    with ExitStack() as stack:
        observers = []
        if pages:
            state = LiveState("bench", [config.run_dir], rounds_total=3)
            server = stack.enter_context(UiServer(state, "127.0.0.1", 0))
            for page in _open_pages(server, pages, read=False):
                stack.callback(page.close)
            observers.append(state)
        metrics = run_local_fleet(config, 2, observers=observers)
    return [m.round_s for m in metrics[1:]]


def run(quick: bool) -> Dict[str, Any]:
    watch_s = 20 if quick else 60
    results: Dict[str, Any] = {"devices": 10, "watch_s": watch_s}
    with tempfile.TemporaryDirectory() as tmp:
        state = LiveState("bench", [Path(tmp)], rounds_total=10)
        with UiServer(state, "127.0.0.1", 0) as server:
            pages = _open_pages(server, 5, read=True)
            cpu_before = _server_thread_cpu_s()
            _feed(state, 10, watch_s, real_time=True)
            cpu_s = _server_thread_cpu_s() - cpu_before
            results["page_server_cpu_percent_of_core_5_pages"] = round(100 * cpu_s / watch_s, 2)
            _close_pages(server, pages)
            calls = 200 if quick else 1000
            per_call = {}
            for idle_pages in (0, 20):
                opened = _open_pages(server, idle_pages, read=False)
                spent = _feed(state, 10, calls, real_time=False)
                per_call[idle_pages] = spent / (calls * 10 * 2)
                _close_pages(server, opened)
            results["observer_call_us_0_idle_pages"] = round(per_call[0] * 1e6, 1)
            results["observer_call_us_20_idle_pages"] = round(per_call[20] * 1e6, 1)
            results["dropped_pages"] = server.dropped_clients
        if not quick:
            results.update(_paired_fleet_rounds(Path(tmp), pairs=3))
    return results


def _paired_fleet_rounds(out_dir: Path, pairs: int) -> Dict[str, Any]:
    """Fleet rounds without and with the page (20 idle pages), in alternating order."""
    without: List[float] = []
    watched: List[float] = []
    changes = []
    _fleet_round_s(out_dir / "warm-up", 0)  # the first fleet of a process also fills caches
    for pair in range(pairs):
        order = (0, 20) if pair % 2 == 0 else (20, 0)
        seconds = {
            pages: sum(_fleet_round_s(out_dir / f"{pair}-{pages}", pages)) for pages in order
        }
        without.append(seconds[0])
        watched.append(seconds[20])
        changes.append(100 * (seconds[20] / seconds[0] - 1))
    return {
        "fleet_pairs": pairs,
        "fleet_rounds_s_without_page": [round(s, 2) for s in without],
        "fleet_rounds_s_20_idle_pages": [round(s, 2) for s in watched],
        "fleet_change_percent_per_pair": [round(c, 1) for c in changes],
        "fleet_change_percent_median": round(statistics.median(changes), 1),
        "fleet_change_percent_of_sums": round(100 * (sum(watched) / sum(without) - 1), 1),
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
