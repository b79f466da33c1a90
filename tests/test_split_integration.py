"""Split learning end to end: a coordinator and 2 edge processes over a real Mosquitto."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from tests.brokers import MosquittoBroker
from tests.fleet import jetfed, log_tail, read_metrics, start_edges, stop, write_config


def _train_records(run_dir: Path) -> List[Dict[str, Any]]:
    lines = (run_dir / "profiles.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if r["phase"] == "train"]


@pytest.mark.parametrize(
    "method",
    [
        {"cut_layer": 2},
        pytest.param(
            {
                "cut_layer": 3,
                "u_shaped": True,
                "server_copies": "per_device",
                "activation_dtype": "fp16",
            },
            marks=pytest.mark.slow,
        ),
    ],
    ids=["labels-shared", "u-shaped"],
)
def test_two_devices_one_split_round(
    method: Dict[str, Any],
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    minilm_path: str,
    sst2_dir: Path,
) -> None:
    name = "it-split-u" if method.get("u_shaped") else "it-split"
    config = write_config(tmp_path, name, "split", sst2_dir, rounds=1)
    raw = yaml.safe_load(config.read_text())
    raw["method"].update(method)
    config.write_text(yaml.safe_dump(raw))
    log = tmp_path / "coord.log"
    coordinator = jetfed(
        "-v", "coordinator", "run", str(config), "--broker", mosquitto.url, log=log
    )
    edges = start_edges(mosquitto.url, name, sst2_dir, 2, tmp_path / "logs")
    try:
        assert coordinator.wait(timeout=600) == 0, log_tail(log, *(tmp_path / "logs").iterdir())
    finally:
        stop([coordinator, *edges])
    run_dir = tmp_path / "runs" / name
    (metrics,) = read_metrics(run_dir)
    assert metrics["status"] == "aggregated" and metrics["num_aggregated"] == 2
    assert 0.0 <= metrics["accuracy"] <= 1.0
    extra = metrics["extra"]
    assert extra["split_server_batches"] == 6  # 2 devices × 3 local steps
    assert extra["split_server_s"] > 0 and extra["split_bytes_per_batch"] > 0
    records = _train_records(run_dir)
    assert sorted(r["device_id"] for r in records) == ["dev-0", "dev-1"]
    for record in records:
        counters = record["extra"]
        assert counters["split_batches"] == 3 and counters["split_retries"] == 0
        assert counters["split_device_s"] > 0 and counters["split_wait_s"] > 0
        assert record["bytes_sent"] > 3 * 8 * 384 * 2  # at least the activations went up
    assert (run_dir / "global" / "round-0000" / "adapter_model.safetensors").exists()
