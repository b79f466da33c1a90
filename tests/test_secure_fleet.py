"""A real coordinator and real edges complete a round over the TLS listener of a Mosquitto
started with the config `jetfed broker-config` wrote, each with its own account, the ACL active,
and every credential taken from the generated coordinator.env / edge.env (no flags)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict

from coordinator.broker_config import read_env_file
from tests.fleet import ENV, jetfed, log_tail, read_metrics, stop, write_config
from tests.test_broker_security import deploy

NAME = "it-tls"


def _env(bundle: Dict[str, str], **extra: str) -> Dict[str, str]:
    return {**ENV, "JETFED_IDLE_BASELINE_S": "0", **bundle, **extra}


def test_round_over_tls_with_generated_accounts(
    tmp_path: Path, minilm_path: str, sst2_dir: Path
) -> None:
    (tmp_path / "deploy").mkdir()
    deployment = deploy(tmp_path / "deploy", {"devices": ["dev-0", "dev-1"]})
    try:
        coordinator_env = read_env_file(deployment.out / "coordinator" / "coordinator.env")
        assert coordinator_env["JETFED_BROKER"].startswith("mqtts://")
        config = write_config(tmp_path, NAME, "lora", sst2_dir, rounds=1)
        logs = tmp_path / "logs"
        logs.mkdir()
        coordinator = jetfed(
            "-v",
            "coordinator",
            "run",
            str(config),
            log=logs / "coord.log",
            env=_env(coordinator_env),
        )
        edges = [
            jetfed(
                "-v",
                "edge",
                "run",
                "--experiment",
                NAME,
                "--threads",
                "1",
                log=logs / f"{device}.log",
                env=_env(
                    read_env_file(deployment.out / "devices" / device / "edge.env"),
                    JETFED_DATA=str(sst2_dir),
                ),
            )
            for device in ("dev-0", "dev-1")
        ]
        try:
            assert coordinator.wait(timeout=300) == 0, log_tail(*sorted(logs.iterdir()))
        except subprocess.TimeoutExpired:
            raise AssertionError(log_tail(*sorted(logs.iterdir()))) from None
        finally:
            stop([coordinator, *edges])
    finally:
        deployment.broker.stop()
    metrics = read_metrics(tmp_path / "runs" / NAME)
    assert [(m["status"], m["devices"]) for m in metrics] == [("aggregated", ["dev-0", "dev-1"])]
    broker_log = deployment.broker.log_text()
    for account in ("coordinator", "dev-0", "dev-1"):
        assert f"u'{account}'" in broker_log, broker_log[-2000:]
