"""KD-FedLLM end to end: a coordinator and 2 edge processes over a real Mosquitto, real SST-2."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from tests.brokers import MosquittoBroker
from tests.fleet import jetfed, log_tail, read_metrics, start_edges, stop, write_config

PROXY = 64
CLASSES = 2
HEADER_BYTES = 512
"""Allowance for one safetensors header (names, dtypes, shapes as JSON)."""


def test_kd_two_devices_two_rounds(
    tmp_path: Path, mosquitto: MosquittoBroker, minilm_path: str, sst2_dir: Path
) -> None:
    name = "it-kd"
    config = write_config(tmp_path, name, "kd", sst2_dir, rounds=2)
    log = tmp_path / "coord.log"
    overrides = ["--set", f"method.proxy_size={PROXY}", "--set", "method.server_steps=3"]
    coordinator = jetfed(
        "-v", "coordinator", "run", str(config), "--broker", mosquitto.url, *overrides, log=log
    )
    edges = start_edges(mosquitto.url, name, sst2_dir, 2, tmp_path / "logs")
    try:
        assert coordinator.wait(timeout=600) == 0, log_tail(log, *(tmp_path / "logs").iterdir())
    finally:
        stop([coordinator, *edges])
    run_dir = tmp_path / "runs" / name
    metrics = read_metrics(run_dir)
    assert [m["round_index"] for m in metrics] == [0, 1]
    for m in metrics:
        assert m["status"] == "aggregated" and m["num_aggregated"] == 2
        assert 0.0 <= m["accuracy"] <= 1.0
        # Down: per device a 16-byte empty global state and the kd_proxy blob (indices as int32,
        # the texts' digest and, from round 1, the fp16 consensus), plus chunk requests.
        proxy_blob_bytes = PROXY * 4 + 32 + PROXY * CLASSES * 2
        update_bytes = m["extra"]["update_payload_bytes"]
        assert 2 * PROXY * CLASSES * 2 < update_bytes <= 2 * (PROXY * CLASSES * 2 + HEADER_BYTES)
        assert 0 < m["bytes_down"] <= 2 * (proxy_blob_bytes + 16 + 4 * HEADER_BYTES)
    for round_index in (0, 1):
        export = run_dir / "global" / f"round-{round_index:04d}"
        consensus = load_file(str(export / "consensus.safetensors"))
        assert tuple(consensus["consensus"].shape) == (PROXY, CLASSES)
        assert (export / "adapter_model.safetensors").exists()
    checkpoint = load_file(str(run_dir / "checkpoint" / "global.safetensors"))
    assert checkpoint == {}
