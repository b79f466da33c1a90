"""The README's "Deploying on real devices", command by command: `jetfed broker-config` bundles,
Mosquitto started with the generated mosquitto.conf, devices running `jetfed edge run` with their
generated edge.env (sourced by the shell, as the systemd unit does) and nothing else but --data
(no --experiment, no -v), and `jetfed coordinator run` of a tiny experiment with coordinator.env.
The devices, installed before any experiment existed, serve it: a round completes over the TLS
listener, each process on its own account with the ACL active, and the logs say what happens."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import List

from jetfed.coordinator.broker_config import read_env_file
from tests.fleet import ENV, log_tail, read_metrics, stop, wait_for, write_config
from tests.test_broker_security import deploy

NAME = "it-tls"


def sourced(env_file: Path, *command: str, log: Path) -> subprocess.Popen[bytes]:
    """`set -a; . ENV_FILE; set +a; jetfed ...`: the env file as a shell (and systemd) reads it."""
    jetfed = shlex.join([sys.executable, "-m", "jetfed", *command])
    script = f"set -a; . {shlex.quote(str(env_file))}; set +a; exec {jetfed}"
    out = open(log, "wb")  # noqa: SIM115 - owned by the process
    with out:
        return subprocess.Popen(
            ["bash", "-c", script], stdout=out, stderr=subprocess.STDOUT, env=ENV
        )


def test_readme_deployment_serves_an_experiment_the_devices_were_never_told_about(
    tmp_path: Path, minilm_path: str, sst2_dir: Path
) -> None:
    (tmp_path / "deploy").mkdir()
    deployment = deploy(tmp_path / "deploy", {"devices": ["dev-0", "dev-1"]})
    logs = tmp_path / "logs"
    logs.mkdir()
    devices = ("dev-0", "dev-1")
    edges: List[subprocess.Popen[bytes]] = []
    try:
        for device in devices:
            env_file = deployment.out / "devices" / device / "edge.env"
            args = ("edge", "run", "--data", str(sst2_dir), "--threads", "1")
            edges.append(sourced(env_file, *args, log=logs / f"{device}.log"))
        # devices wait, and say for what, before any experiment exists
        for device in devices:
            log = logs / f"{device}.log"
            wait_for(lambda log=log: "edge.waiting" in log.read_text(), 120, f"{device} waiting")
        config = write_config(tmp_path, NAME, "lora", sst2_dir, rounds=1)
        coordinator = sourced(
            deployment.out / "coordinator" / "coordinator.env",
            *("coordinator", "run", str(config)),
            log=logs / "coordinator.log",
        )
        try:
            assert coordinator.wait(timeout=300) == 0, log_tail(*sorted(logs.iterdir()))
        except subprocess.TimeoutExpired:
            raise AssertionError(log_tail(*sorted(logs.iterdir()))) from None
        for device in devices:  # the run's end sends them back to waiting for the next one
            log = logs / f"{device}.log"
            wait_for(lambda log=log: "experiment.ended" in log.read_text(), 60, f"{device} left")
    finally:
        stop(edges)
        deployment.broker.stop()
    metrics = read_metrics(tmp_path / "runs" / NAME)
    assert [(m["status"], m["devices"]) for m in metrics] == [("aggregated", list(devices))]
    broker_log = deployment.broker.log_text()
    for account in ("coordinator", *devices):
        assert f"u'{account}'" in broker_log, broker_log[-2000:]

    for device in devices:
        tls_url = read_env_file(deployment.out / "devices" / device / "edge.env")["JETFED_BROKER"]
        assert tls_url.startswith("mqtts://")
        text = (logs / f"{device}.log").read_text()
        assert f"edge.waiting device_id={device} broker={tls_url}" in text, text
        assert "listening=jetfed/+/coordinator" in text
        assert f"experiment.joined experiment={NAME}" in text
        assert f"listening=jetfed/{NAME}/task" in text
        # the device's own progress at its default verbosity
        for phase in ("download", "setup", "train", "upload"):
            assert f"round.progress round_index=0 phase={phase}" in text, text
        assert "phase=train step=3/3" in text
        assert "Traceback" not in text
    output = (logs / "coordinator.log").read_text()
    # not a terminal: a line per round, then the table; rounds numbered from 0 as in global/
    assert "round 0: aggregated, 2/2 devices" in output, output
    assert (tmp_path / "runs" / NAME / "global" / "round-0000").is_dir()
