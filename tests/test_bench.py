"""Benchmarks: the runner's JSON/Markdown output, the CLI, and tiny real runs of the benches.

Numbers are not asserted here (timing goals belong in bench/, and this machine is shared);
byte counts are deterministic, so the wire-efficiency goal is checked in the slow case.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from bench.runner import REPO_ROOT, run_bench
from bench.tcp_counter import CountingProxy
from tests.brokers import MosquittoBroker, binary

MACHINE_KEYS = {"cpu_model", "logical_cores", "ram_bytes", "python", "torch", "mosquitto"}


def _check_report(out: Path, name: str) -> dict:
    report = json.loads((out / f"{name}.json").read_text())
    assert report["bench"] == name
    assert set(report["machine"]) >= MACHINE_KEYS
    assert report["started_utc"].endswith("Z") and report["finished_utc"].endswith("Z")
    assert report["duration_s"] >= 0
    markdown = (out / f"{name}.md").read_text()
    assert markdown.startswith(f"# bench: {name}")
    assert "| " in markdown and "Machine:" in markdown
    return report


def test_aggregation_bench_writes_json_and_markdown(tmp_path: Path, minilm_path: str) -> None:
    run_bench(
        "aggregation_throughput",
        quick=True,
        out_dir=tmp_path,
        options={"kinds": ("lora",), "counts": (2,)},
    )
    report = _check_report(tmp_path, "aggregation_throughput")
    lora = report["results"]["aggregate"]["lora"]
    assert set(lora) == {"fedavg-2", "median-2"}
    assert all(item["mb_per_s"] > 0 and item["update_bytes"] > 290_000 for item in lora.values())
    assert report["results"]["decode_validate"]["lora"]["median_s"] > 0


def test_lora_aggregation_bench_writes_every_strategy(tmp_path: Path, minilm_path: str) -> None:
    run_bench(
        "lora_aggregation",
        quick=True,
        out_dir=tmp_path,
        options={"models": ("minilm",), "counts": (3,)},
    )
    rows = _check_report(tmp_path, "lora_aggregation")["results"]["models"]["minilm"]
    by_strategy = {row["strategy"]: row for row in rows}
    assert set(by_strategy) == {
        "fedavg",
        "ffa",
        "exact-fold",
        "exact-svd",
        "exact-svd-dense",
        "flexlora-svd",
        "flexlora-svd-dense",
        "flexlora-zero_pad",
    }
    assert by_strategy["ffa"]["upload_bytes"] * 2 <= by_strategy["fedavg"]["upload_bytes"] + 1024
    assert by_strategy["exact-fold"]["fold_bytes"] > 0 and by_strategy["ffa"]["error_worst"] < 1e-6
    for svd in ("exact-svd", "flexlora-svd"):  # the subspace solver truncates like the dense one
        dense = by_strategy[svd + "-dense"]["error_worst"]
        assert by_strategy[svd]["error_worst"] == pytest.approx(dense, rel=1e-5)


def test_cli_lists_benches_and_refuses_unknown_names() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "bench", "list"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0
    for name in ("wire_efficiency", "round_overhead", "edge_step_overhead", "reproduction"):
        assert name in listed.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "bench", "nosuch"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2
    assert "unknown bench 'nosuch'" in unknown.stderr


def test_counting_proxy_counts_real_mqtt_bytes(mosquitto: MosquittoBroker) -> None:
    """A CONNECT through the proxy is counted in both directions (CONNACK is 4 bytes)."""
    proxy = CountingProxy(mosquitto.host, mosquitto.port)
    try:
        connect = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0])
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(connect)
            assert sock.recv(4) == bytes([0x20, 2, 0, 0])
        assert proxy.reset() == (len(connect), 4)
    finally:
        proxy.close()


@pytest.mark.slow
def test_wire_efficiency_meets_goal(tmp_path: Path, minilm_path: str, sst2_dir: Path) -> None:
    run_bench(
        "wire_efficiency",
        quick=True,
        out_dir=tmp_path,
        options={"datasets": sst2_dir.parent, "dtypes": ("fp32",), "rounds": 1},
    )
    update = _check_report(tmp_path, "wire_efficiency")["results"]["updates"]["fp32"]
    assert update["raw_tensor_bytes"] == 74_498 * 4
    assert update["upload_ratio"] <= 1.05


@pytest.mark.slow
def test_round_overhead_runs_with_a_few_devices(
    tmp_path: Path, minilm_path: str, sst2_dir: Path
) -> None:
    run_bench(
        "round_overhead",
        quick=True,
        out_dir=tmp_path,
        options={"datasets": sst2_dir.parent, "device_counts": (3,), "rounds": 2},
    )
    run = _check_report(tmp_path, "round_overhead")["results"]["runs"]["3"]
    assert run["rounds"] == 2 and len(run["per_round"]) == 1
    assert run["overhead_excl_eval_median_s"] > 0


@pytest.mark.slow
def test_fleet_soak_runs_with_a_few_devices_on_mosquitto_and_the_cluster(
    tmp_path: Path, minilm_path: str, sst2_dir: Path
) -> None:
    if binary("nats-server") is None:
        pytest.skip("nats-server is not installed: apt-get install nats-server")
    run_bench(
        "fleet_soak",
        quick=True,
        out_dir=tmp_path,
        options={"datasets": sst2_dir.parent, "devices": 3, "cluster_devices": 3, "rounds": 2},
    )
    runs = _check_report(tmp_path, "fleet_soak")["results"]["runs"]
    for run in runs.values():
        assert run["devices"] == 3 and run["rounds"] == 2, run
        assert run["overhead_excl_eval_median_s"] > 0
        assert run["all_have_task_median_s"] is not None
        assert run["coordinator_peak_rss_bytes"] > 100e6
        assert run["broker_cpu_s_per_round"] is not None


EPOCH_S = 1.7e9


def test_reproduction_costs_to_target_from_a_run_dir(tmp_path: Path) -> None:
    """Rounds, time (device start-up excluded), bytes and energy summed up to the target."""
    from bench.reproduction import summarize_run, to_target

    def metric(index: int, accuracy: float) -> str:
        return json.dumps(
            {
                "round_index": index,
                "accuracy": accuracy,
                "eval_loss": 0.5,
                "train_loss": 0.5,
                "round_s": 100.0,
                "eval_s": 2.0,
                "aggregate_s": 1.0,
                "bytes_up": 1000,
                "bytes_down": 3000,
                "num_aggregated": 2,
                "extra": {},
            }
        )

    def record(index: int, phase: str, start: float, end: float, energy_j: float) -> str:
        start, end = EPOCH_S + start, EPOCH_S + end  # wall-clock times are never negative
        return json.dumps(
            {
                "experiment": "e",
                "device_id": "d0",
                "round_index": index,
                "phase": phase,
                "start_unix_s": start,
                "end_unix_s": end,
                "duration_s": end - start,
                "energy_j": energy_j,
            }
        )

    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(metric(i, a) for i, a in enumerate([0.5, 0.6, 0.8])) + "\n"
    )
    profiles = [
        record(0, "idle", -5.0, 0.0, 100.0),  # the baseline is no part of a round
        record(0, "download", 0.0, 1.0, 1.0),
        record(0, "setup", 1.0, 41.0, 2.0),
        record(0, "upload", 50.0, 60.0, 3.0),  # arrives after round 0's metrics: still counted
        record(1, "download", 100.0, 101.0, 4.0),
        record(1, "upload", 110.0, 120.0, 5.0),
    ]
    (tmp_path / "profiles.jsonl").write_text("\n".join(profiles) + "\n")
    rounds = summarize_run(tmp_path, local_steps=10, step_s=0.5)["rounds"]
    assert [r["active_s"] for r in rounds] == [60 - 40 + 3, 20 + 3, 100 + 3]
    hit = to_target(rounds, 0.6)
    assert hit is not None
    assert (hit["rounds"], hit["wall_s"], hit["bytes"]) == (2, 46.0, 8000)
    assert hit["energy_j"] == 1 + 2 + 3 + 4 + 5
    assert hit["modelled_device_s"] == 2 * (10 * 0.5 + 2000 / (100e6 / 8))
    assert hit["modelled_device_s_slow_link"] == 2 * (10 * 0.5 + 2000 / (10e6 / 8))
    reached = to_target(rounds, 0.8)
    assert reached is not None and reached["energy_j"] is None  # round 2 measured none: never 0
    assert to_target(rounds, 0.9) is None


def test_reproduction_accuracy_from_one_run_costs_from_another(tmp_path: Path) -> None:
    """The simulation's accuracy per round, the deployed run's mean cost per round."""
    from bench.reproduction import summarize_run

    def write(folder: Path, accuracies: List[float], bytes_up: int) -> Path:
        folder.mkdir()
        rows = [
            {
                "round_index": i,
                "accuracy": a,
                "eval_loss": 0.5,
                "train_loss": 0.5,
                "round_s": 10.0 * (i + 1),
                "eval_s": 1.0,
                "aggregate_s": 1.0,
                "bytes_up": bytes_up * (i + 1),
                "bytes_down": 0,
                "num_aggregated": 1,
                "extra": {},
            }
            for i, a in enumerate(accuracies)
        ]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder

    simulated = write(tmp_path / "sim", [0.5, 0.6, 0.7], bytes_up=1)
    deployed = write(tmp_path / "cost", [0.1, 0.2], bytes_up=1000)
    summary = summarize_run(simulated, local_steps=1, step_s=1.0, cost_dir=deployed)
    assert [r["accuracy"] for r in summary["rounds"]] == [0.5, 0.6, 0.7]
    assert {r["bytes_up"] for r in summary["rounds"]} == {1500.0}
    assert {r["active_s"] for r in summary["rounds"]} == {(10 + 20) / 2 + 2}
    assert summary["cost_rounds_measured"] == 2


def test_reproduction_plan_narrows_to_methods_datasets_and_seed() -> None:
    from bench.reproduction import experiment, plan

    setup = plan(False, None, None, None, seed=3, methods=["federa", "lora"], datasets=["sst2"])
    assert (setup.methods, setup.datasets, setup.seed) == (["federa", "lora"], ["sst2"], 3)
    raw = experiment("sst2", Path("data"), "lora", setup, Path("out"))
    assert raw["seed"] == 3 and raw["data"]["partition"]["seed"] == 3
    assert raw["name"].endswith("seed3")
    with pytest.raises(ValueError, match="unknown method or dataset 'fedprox'"):
        plan(False, None, None, None, methods=["fedprox"])


def test_reproduction_resume_skips_runs_that_already_finished(
    tmp_path: Path, sst2_dir: Path
) -> None:
    from bench.reproduction import completed_rounds, experiment, plan, run_one

    setup = plan(False, 3, None, None, methods=["lora"], datasets=["sst2"])
    raw = experiment("sst2", sst2_dir, "lora", setup, tmp_path)
    run_dir = tmp_path / raw["name"]
    assert completed_rounds(run_dir) == 0
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "state.json").write_text(json.dumps({"completed_round": 2}))
    assert completed_rounds(run_dir) == 3
    assert run_one(raw, clients=2, link=None, budget_s=1.0, resume=True) == (
        "completed earlier (3 rounds)"
    )
    assert run_dir.exists(), "a finished run is kept, not started again"
