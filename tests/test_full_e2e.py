"""`full` end to end: a coordinator and 2 edge processes over a real Mosquitto, real MiniLM and
SST-2; the whole model travels both ways as chunked blobs and the export loads with transformers."""

from __future__ import annotations

import json
from pathlib import Path

from tests.brokers import MosquittoBroker
from tests.fleet import jetfed, log_tail, read_metrics, start_edges, stop, write_config

MINILM_FP32_BYTES = 90_000_000


def test_full_two_devices_one_round(
    tmp_path: Path, mosquitto: MosquittoBroker, minilm_path: str, sst2_dir: Path
) -> None:
    name = "it-full"
    config = write_config(
        tmp_path,
        name,
        "full",
        sst2_dir,
        rounds=1,
        training={"local_steps": 3, "batch_size": 8, "learning_rate": 2e-5},
    )
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
    # the whole model went down to and came back from each device, with < 2 % overhead
    assert 2 * MINILM_FP32_BYTES < metrics["bytes_up"] < 2 * 1.02 * 91_500_000
    assert 2 * MINILM_FP32_BYTES < metrics["bytes_down"] < 2 * 1.02 * 91_500_000

    records = [json.loads(line) for line in (run_dir / "profiles.jsonl").read_text().splitlines()]
    for device in ("dev-0", "dev-1"):
        phases = {r["phase"]: r for r in records if r["device_id"] == device}
        download, upload = phases["download"], phases["upload"]
        assert download["bytes_received"] >= download["extra"]["download_payload_bytes"]
        assert download["extra"]["download_payload_bytes"] > MINILM_FP32_BYTES
        assert download["bytes_sent"] > 0  # the chunk requests
        assert upload["bytes_sent"] >= upload["extra"]["update_payload_bytes"] > MINILM_FP32_BYTES
        assert upload["bytes_sent"] < 1.02 * upload["extra"]["update_payload_bytes"]

    from transformers import AutoModelForSequenceClassification

    exported = AutoModelForSequenceClassification.from_pretrained(
        str(run_dir / "global" / "round-0000")
    )
    assert exported.config.num_labels == 2
