"""Bytes on the wire per LoRA update vs the raw tensor bytes (goal: ≤ 1.05×).

One simulated device (bench/sim_device.py) talks to a real coordinator through a private
Mosquitto; its connection runs through a byte-counting TCP proxy, so every MQTT byte is counted
as sent: the Update message (manifest, train stats, the phase records riding on it), the chunk
publish, the pull request and ack it receives, and the PUBACKs both ways. Raw = the tensors' own
bytes (74,498 parameters × 4 B in fp32, × 2 B in fp16). The same is reported for the download of
the global state. TCP/IP headers are not in the proxy's count; a projection for an Ethernet
path (MSS 1448, 52 B of IPv4 + TCP headers per segment) is given beside it.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from bench.broker import private_mosquitto
from bench.coordinator_run import experiment_config, run_coordinator
from bench.runner import DEFAULT_DATASETS, table
from bench.sim_device import RoundLog, SimDevice, SimFleet
from bench.stats import median
from bench.tcp_counter import CountingProxy
from bench.tensors import lora_spec, random_tensors, raw_bytes

GOAL_RATIO = 1.05
ETHERNET_MSS_BYTES = 1448
IP_TCP_HEADER_BYTES = 52


def with_tcp_ip_headers(payload_bytes: int) -> int:
    """Bytes including IPv4 + TCP (with timestamps) headers if sent in full-MSS segments."""
    return payload_bytes + math.ceil(payload_bytes / ETHERNET_MSS_BYTES) * IP_TCP_HEADER_BYTES


def _round_bytes(log: RoundLog) -> Dict[str, int]:
    assert log.meter_at_download_done is not None and log.meter_at_ack is not None
    return {
        "upload_sent": log.meter_at_ack[0] - log.meter_at_download_done[0],
        "upload_received": log.meter_at_ack[1] - log.meter_at_download_done[1],
        "download_received": log.meter_at_download_done[1] - log.meter_at_task[1],
        "download_sent": log.meter_at_download_done[0] - log.meter_at_task[0],
        "update_payload": log.update_payload_bytes,
        "update_message": log.update_message_bytes,
        "update_profile": log.update_profile_bytes,
    }


def measure(dtype: str, rounds: int, datasets: Path) -> Dict[str, Any]:
    from jetfed.edge.tensor_codec import encode_tensors

    spec = lora_spec("lora")
    raw = raw_bytes(spec, 4 if dtype == "fp32" else 2)
    raw_fp32 = raw_bytes(spec, 4)
    blob = encode_tensors(random_tensors(spec, seed=0), dtype)
    name = f"bench-wire-{dtype}"
    with private_mosquitto() as broker, tempfile.TemporaryDirectory() as tmp:
        proxy = CountingProxy(broker.host, broker.port)
        device = SimDevice(
            proxy.url,
            name,
            "sim-000",
            blob,
            num_samples=100,
            meter=lambda: (proxy.client_to_broker_bytes, proxy.broker_to_client_bytes),
        )
        fleet = SimFleet([device])
        fleet.start()
        raw_config = experiment_config(
            name, 1, rounds, datasets / "sst2", Path(tmp) / "runs", update_dtype=dtype
        )
        try:
            run_coordinator(raw_config, broker.url, Path(tmp), 300, failed=fleet.failed)
        finally:
            fleet.close()
            proxy.close()
    per_round: List[Dict[str, int]] = [_round_bytes(log) for log in device.rounds.values()]
    upload = median([r["upload_sent"] for r in per_round])
    upload_both = median([r["upload_sent"] + r["upload_received"] for r in per_round])
    download = median([r["download_received"] for r in per_round])
    profile = median([r["update_profile"] for r in per_round])
    return {
        "dtype": dtype,
        "raw_tensor_bytes": raw,
        "safetensors_payload_bytes": len(blob),
        "upload_sent_bytes": upload,
        "upload_ratio": upload / raw,
        "upload_ratio_without_profile_records": (upload - profile) / raw,
        "upload_both_directions_ratio": upload_both / raw,
        "upload_ratio_with_tcp_ip_headers": with_tcp_ip_headers(int(upload)) / raw,
        "profile_records_in_update_bytes": profile,
        "download_received_bytes": download,
        "download_ratio": download / raw_fp32,
        "per_round": per_round,
        "meets_goal": upload / raw <= GOAL_RATIO,
    }


def run(
    quick: bool,
    datasets: Path = DEFAULT_DATASETS,
    dtypes: Tuple[str, ...] = ("fp32", "fp16"),
    rounds: Optional[int] = None,
) -> Dict[str, Any]:
    rounds = rounds or (2 if quick else 4)
    return {
        "goal_ratio": GOAL_RATIO,
        "method": "lora",
        "rounds": rounds,
        "updates": {dtype: measure(dtype, rounds, datasets) for dtype in dtypes},
    }


def markdown(results: Dict[str, Any]) -> str:
    rows = [
        [
            item["dtype"],
            item["raw_tensor_bytes"],
            item["safetensors_payload_bytes"],
            item["upload_sent_bytes"],
            item["upload_ratio"],
            item["upload_ratio_without_profile_records"],
            item["upload_both_directions_ratio"],
            item["upload_ratio_with_tcp_ip_headers"],
            item["download_ratio"],
        ]
        for item in results["updates"].values()
    ]
    verdict = all(item["meets_goal"] for item in results["updates"].values())
    return "\n".join(
        [
            "LoRA r=8 on query,value + head (MiniLM), one device through a byte-counting TCP "
            f"proxy, median of {results['rounds']} rounds. Ratios are bytes / raw tensor bytes; "
            "the download (global state, always fp32) is compared with the fp32 tensor bytes.",
            "",
            table(
                [
                    "update dtype",
                    "raw B",
                    "safetensors B",
                    "MQTT bytes sent",
                    "ratio",
                    "ratio w/o profile records",
                    "ratio incl. received",
                    "ratio + TCP/IP headers (projected)",
                    "download ratio",
                ],
                rows,
            ),
            "",
            f"Goal ≤ {results['goal_ratio']}× (MQTT bytes sent per update): "
            f"{'met' if verdict else 'NOT met'}.",
        ]
    )
