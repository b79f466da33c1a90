"""Mistakes that retrying cannot fix end at once, in one line naming the cause: a model that is
not installed (offline), a wrong password (one attempt, not a retry loop), nothing listening at
the broker's address (with the time really waited). Real Mosquitto, real `jetfed` processes."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

import pytest

from jetfed.coordinator.broker_config import pbkdf2_password_hash
from jetfed.edge.errors import UserError
from jetfed.edge.mqtt import CONNECT_WAIT_S, BrokerSpec, MqttLink
from tests.brokers import MosquittoBroker, free_port
from tests.fleet import ENV, write_config

# Generous: each case must end by itself, long before this (no wall-clock bound is asserted).
COMPLETES_S = 60


def jetfed_lines(*args: str) -> List[str]:
    """Run `jetfed ARGS` to its end; it must fail (exit 2) and print only its stderr lines."""
    result = subprocess.run(
        [sys.executable, "-m", "jetfed", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=COMPLETES_S,
    )
    assert result.returncode == 2, result.stderr
    return result.stderr.strip().splitlines()


def test_a_model_that_is_not_installed_is_one_line_offline(tmp_path: Path, sst2_dir: Path) -> None:
    config = write_config(
        tmp_path, "ff-model", "lora", sst2_dir, model={"name_or_path": "roberta-base"}
    )
    lines = jetfed_lines("coordinator", "run", str(config), "--embedded-port", str(free_port()))
    assert len(lines) == 1, lines
    assert "model 'roberta-base' is not installed" in lines[0]
    assert "not found locally" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_a_missing_local_model_folder_is_one_line(tmp_path: Path) -> None:
    from jetfed.edge.models import resolve_model_path

    with pytest.raises(UserError, match="no such folder"):
        resolve_model_path(str(tmp_path / "nowhere" / "model"))


def test_a_wrong_password_is_refused_once_in_one_line(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker], sst2_dir: Path
) -> None:
    port = free_port()
    passwords = tmp_path / "passwords"
    passwords.write_text(f"orin-01:{pbkdf2_password_hash('right')}\n")
    broker = mosquitto_factory(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n"
        "log_type all\nuser root",  # as root, keep root: the file is in a private tmp dir
        port=port,
    )
    lines = jetfed_lines(
        "edge", "run", "--broker", f"mqtt://127.0.0.1:{port}", "--device-id", "orin-01",
        "--username", "orin-01", "--password", "wrong", "--data", str(sst2_dir),
        "--telemetry", "psutil", "--idle-baseline-s", "0",
    )  # fmt: skip
    assert len(lines) == 1, lines
    assert "refused" in lines[0] and "user 'orin-01' is not authorised" in lines[0]
    assert "check the username and password" in lines[0]
    log = (broker.workdir / "mosquitto.log").read_text()
    assert log.count("disconnected, not authorised") == 1, log  # one attempt, no retries


def test_nothing_listening_names_the_address_and_the_time_waited() -> None:
    port = free_port()
    link = MqttLink(BrokerSpec(url=f"mqtt://127.0.0.1:{port}"), "ff-probe", [])
    started_s = time.monotonic()
    with pytest.raises(UserError) as caught:
        link.connect(timeout_s=2)
    waited_s = time.monotonic() - started_s
    message = str(caught.value)
    assert "\n" not in message
    assert f"nothing is listening at 127.0.0.1:{port}" in message
    stated_s = float(re.search(r"after (\d+) s", message).group(1))  # type: ignore[union-attr]
    assert 2 <= stated_s <= waited_s + 0.5, (message, waited_s)


def test_a_device_pointed_at_nothing_says_so_in_one_line_after_the_default_wait(
    sst2_dir: Path,
) -> None:
    """`jetfed edge run` at an address where nothing listens: one line, after the default
    wait (`CONNECT_WAIT_S`, 10 s), not 30 s of silence (issue: "after 30 s" took 47 s)."""
    port = free_port()
    lines = jetfed_lines(
        "edge", "run", "--broker", f"mqtt://127.0.0.1:{port}", "--device-id", "orin-01",
        "--data", str(sst2_dir), "--telemetry", "psutil", "--idle-baseline-s", "0",
    )  # fmt: skip
    assert len(lines) == 1, lines
    assert f"nothing is listening at 127.0.0.1:{port}" in lines[0]
    stated_s = float(re.search(r"after (\d+) s", lines[0]).group(1))  # type: ignore[union-attr]
    assert CONNECT_WAIT_S <= stated_s <= CONNECT_WAIT_S + 2, lines[0]


def test_a_device_that_cannot_do_its_round_says_why_and_is_not_waited_for(
    tmp_path: Path, sst2_dir: Path, minilm_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A device whose data cannot fill the task (here: labels beyond the model's num_labels)
    reports it; with min_clients out of reach the coordinator closes the round at once with the
    device's reason in its log, instead of waiting for rounds.deadline_s."""
    from jetfed.coordinator.config import parse_config
    from jetfed.coordinator.simulate import simulate

    wrong = tmp_path / "four-classes"
    wrong.mkdir()
    rows = [f'{{"text": "row {i}", "label": {i % 4}}}' for i in range(16)]
    (wrong / "train.jsonl").write_text("\n".join(rows) + "\n")
    config = parse_config(
        {
            "name": "cannot",
            "model": {"name_or_path": "minilm", "max_length": 32, "num_hidden_layers": 1},
            "training": {"local_steps": 1, "batch_size": 4},
            "data": {
                "path": str(sst2_dir),
                "client_paths": {"demo-02": str(wrong)},
                "max_eval_samples": 8,
            },
            "rounds": {"count": 1, "min_clients": 2, "deadline_s": 600, "wait_for_devices_s": 60},
            "output_dir": str(tmp_path / "runs"),
        },
        "test",
    )
    with caplog.at_level("INFO"):
        (metrics,) = simulate(config, clients=2)
    assert metrics.status == "skipped"
    failed = [r.getMessage() for r in caplog.records if "device.round_failed" in r.getMessage()]
    assert failed and "demo-02" in failed[0] and "num_labels=2" in failed[0], failed
    assert any("round.closed_early" in r.getMessage() for r in caplog.records)
