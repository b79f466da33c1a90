"""Faults against real processes and a real Mosquitto: an edge SIGKILLed mid-round, the broker
restarted mid-round, the coordinator SIGKILLed after a round and resumed (its final adapter
equal to an uninterrupted run's)."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Callable, List, Tuple

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.brokers import MosquittoBroker
from tests.fleet import ENV, jetfed, log_tail, read_metrics, stop, wait_for, write_config

EDGE_ENV = {**ENV, "JETFED_IDLE_BASELINE_S": "0"}


def start_edge(
    url: str, experiment: str, device_id: str, data: Path, log: Path
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    return jetfed(
        "-v",
        "edge",
        "run",
        "--broker",
        url,
        "--device-id",
        device_id,
        "--experiment",
        experiment,
        "--data",
        str(data),
        "--threads",
        "1",
        log=log,
        env=EDGE_ENV,
    )


def start_coordinator(config: Path, url: str, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    return jetfed("-v", "coordinator", "run", str(config), "--broker", url, *flags, log=log)


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def accepted_updates(coordinator_log: str) -> Counter[Tuple[str, str]]:
    """(device, round) → how many times the coordinator accepted an update for it."""
    counts: Counter[Tuple[str, str]] = Counter()
    for line in coordinator_log.splitlines():
        if "update.accepted" in line:
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            counts[(fields["device_id"], fields["round_index"])] += 1
    return counts


def finish(coordinator: subprocess.Popen[bytes], timeout_s: float, *logs: Path) -> None:
    try:
        code = coordinator.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError("coordinator did not finish\n" + log_tail(*logs)) from None
    assert code == 0, log_tail(*logs)


def _set_rounds(config: Path, **rounds: object) -> None:
    raw = yaml.safe_load(config.read_text())
    raw["rounds"].update(rounds)
    config.write_text(yaml.safe_dump(raw))


@pytest.mark.slow
def test_edge_killed_mid_round_quorum_once_offline_then_rejoins(
    tmp_path: Path, mosquitto: MosquittoBroker, minilm_path: str, sst2_dir: Path
) -> None:
    name = "it-edge-killed"
    config = write_config(tmp_path, name, "lora", sst2_dir, rounds=3, clients=3)
    _set_rounds(config, min_clients=2, deadline_s=3600, offline_grace_s=2.0)
    logs = tmp_path / "logs"
    coord_log = logs / "coord.log"
    logs.mkdir()
    devices = ("dev-0", "dev-1", "dev-2")
    edges = {d: start_edge(mosquitto.url, name, d, sst2_dir, logs / f"{d}.log") for d in devices}
    coordinator = None
    try:
        # All three online before the coordinator subscribes: their retained hellos arrive
        # together, so round 0 selects all three.
        wait_for(
            lambda: all("mqtt.connected" in text(logs / f"{d}.log") for d in devices),
            120,
            "devices online",
        )
        coordinator = start_coordinator(config, mosquitto.url, coord_log)
        wait_for(
            lambda: (
                "round.start round_index=0" in text(logs / "dev-2.log")
                or "round.not_selected" in text(logs / "dev-2.log")
            ),
            240,
            "dev-2 to take round 0",
        )
        assert "round.not_selected" not in text(logs / "dev-2.log"), log_tail(coord_log)
        assert "round.uploaded" not in text(logs / "dev-2.log")
        edges["dev-2"].send_signal(signal.SIGKILL)
        edges["dev-2"].wait()
        wait_for(lambda: len(read_metrics(tmp_path / "runs" / name)) >= 1, 240, "round 0")
        edges["dev-2"] = start_edge(
            mosquitto.url, name, "dev-2", sst2_dir, logs / "dev-2.again.log"
        )
        finish(coordinator, 300, *sorted(logs.iterdir()))
    finally:
        stop([*([coordinator] if coordinator else []), *edges.values()])
    metrics = read_metrics(tmp_path / "runs" / name)
    first = metrics[0]
    assert first["status"] == "aggregated" and first["num_selected"] == 3
    assert first["devices"] == ["dev-0", "dev-1"], "quorum without the killed device"
    assert "round.closed_early round_index=0 offline=dev-2" in text(coord_log)
    assert [m["status"] for m in metrics] == ["aggregated"] * 3
    rejoined = [m["round_index"] for m in metrics[1:] if "dev-2" in m["devices"]]
    assert rejoined, (metrics, log_tail(logs / "dev-2.again.log"))
    assert max(accepted_updates(text(coord_log)).values()) == 1


def test_broker_restarted_mid_round_everyone_reconnects_nothing_counted_twice(
    tmp_path: Path, mosquitto: MosquittoBroker, minilm_path: str, sst2_dir: Path
) -> None:
    name = "it-broker-restart"
    config = write_config(
        tmp_path,
        name,
        "lora",
        sst2_dir,
        transfer={"retry_after_s": 2.0},
        aggregation={"strategy": "trimmed_mean", "trim_fraction": 0.0, "max_update_norm": 1e4},
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    coord_log = logs / "coord.log"
    coordinator = start_coordinator(config, mosquitto.url, coord_log)
    edges = [
        start_edge(mosquitto.url, name, d, sst2_dir, logs / f"{d}.log") for d in ("dev-0", "dev-1")
    ]
    restarts: List[str] = []
    try:
        wait_for(
            lambda: all("round.start round_index=0" in text(logs / f"dev-{i}.log") for i in (0, 1)),
            240,
            "both devices in round 0",
            poll_s=0.05,
        )
        mosquitto.restart()
        restarts.append("while both devices fetched/trained round 0")
        wait_for(lambda: "update.accepted" in text(coord_log), 240, "a first update", poll_s=0.02)
        mosquitto.restart()
        restarts.append("right after the first update was accepted")
        finish(coordinator, 300, coord_log, *(logs / f"dev-{i}.log" for i in (0, 1)))
    finally:
        stop([coordinator, *edges])
    metrics = read_metrics(tmp_path / "runs" / name)
    assert [(m["status"], m["num_aggregated"]) for m in metrics] == [("aggregated", 2)] * 2
    counts = accepted_updates(text(coord_log))
    assert counts == Counter({(d, r): 1 for d in ("dev-0", "dev-1") for r in ("0", "1")}), counts
    for i in (0, 1):
        assert text(logs / f"dev-{i}.log").count("mqtt.disconnected") >= 1, "restart unseen"
    assert text(coord_log).count("mqtt.disconnected") == len(restarts)


def _run_in(tmp: Path, broker: MosquittoBroker, data: Path, kill_after_round: int) -> Path:
    """A 2-round run; with kill_after_round >= 0 the coordinator is SIGKILLed once that round's
    metrics are written, then restarted with --resume. Returns the run directory."""
    name = "it-determinism"
    config = write_config(tmp, name, "lora", data)
    logs = tmp / "logs"
    logs.mkdir()
    run_dir = tmp / "runs" / name
    coordinator = start_coordinator(config, broker.url, logs / "coord.log")
    edges = [start_edge(broker.url, name, d, data, logs / f"{d}.log") for d in ("dev-0", "dev-1")]
    try:
        if kill_after_round >= 0:
            wait_for(
                lambda: (
                    len(read_metrics(run_dir)) > kill_after_round or coordinator.poll() is not None
                ),
                300,
                f"round {kill_after_round}",
                poll_s=0.05,
            )
            coordinator.send_signal(signal.SIGKILL)
            coordinator.wait()
            coordinator = start_coordinator(
                config, broker.url, logs / "coord-resumed.log", "--resume"
            )
        finish(coordinator, 400, *sorted(logs.iterdir()))
    finally:
        stop([coordinator, *edges])
    return run_dir


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_adapter_as_an_uninterrupted_one(
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoBroker],
    minilm_path: str,
    sst2_dir: Path,
) -> None:
    """Both runs at once on their own brokers (load changes timing, never results)."""
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "straight").mkdir()
    (tmp_path / "resumed").mkdir()
    with ThreadPoolExecutor(2) as pool:
        straight = pool.submit(_run_in, tmp_path / "straight", mosquitto_factory(), sst2_dir, -1)
        resumed = pool.submit(_run_in, tmp_path / "resumed", mosquitto_factory(), sst2_dir, 0)
        straight_dir, resumed_dir = straight.result(), resumed.result()
    assert "run.resumed next_round=1" in text(tmp_path / "resumed" / "logs" / "coord-resumed.log")
    for run_dir in (straight_dir, resumed_dir):
        assert [m["num_aggregated"] for m in read_metrics(run_dir)] == [2, 2]
    adapter = "global/round-0001/adapter_model.safetensors"
    expected = load_file(str(straight_dir / adapter))
    actual = load_file(str(resumed_dir / adapter))
    assert set(expected) == set(actual)
    worst = max(float((expected[n] - actual[n]).abs().max()) for n in expected)
    assert worst <= 1e-6, f"resumed adapter differs by up to {worst}"
    assert all(torch.equal(expected[n], actual[n]) for n in expected), f"max diff {worst}"
