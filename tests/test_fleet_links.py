"""Local fleets behind emulated links: `jetfed demo --link` end to end, what its run directory
records, transfer phases no shorter than the link rate allows, brokers devices can reach, and no
leftovers. Nothing is timed against an upper bound: rates are measured by bench/link_rates.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from jetfed.cli import main
from jetfed.coordinator.fleet import LINK_FILE, device_broker_url
from jetfed.coordinator.links import LinkedFleet, LinkSpec
from jetfed.coordinator.links.netns import ROOT_ERROR
from jetfed.coordinator.local_mosquitto import LocalMosquitto
from jetfed.edge.errors import UserError
from tests.brokers import MosquittoBroker, free_port
from tests.fleet import ENV, link_leftovers, log_tail, read_metrics

CAN_LINK = os.geteuid() == 0 and os.path.exists("/dev/net/tun")
ROOT_REASON = "needs root and /dev/net/tun (network namespaces, TUN devices)"
root_only = pytest.mark.skipif(not CAN_LINK, reason=ROOT_REASON)

LINK = "20mbit,10ms"
RATE_BIT_S = 20e6


def _jsonl(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.root
@root_only
def test_lora_demo_behind_20mbit_links_records_the_link_and_its_transfer_times(
    tmp_path: Path, minilm_path: str, sst2_dir: Path
) -> None:
    argv = [sys.executable, "-m", "jetfed", "demo", "--name", "it-link", "--link", LINK]
    argv += ["--output-dir", str(tmp_path / "runs"), "--data", str(sst2_dir), "--clients", "2"]
    argv += ["--rounds", "1", "--local-steps", "3", "--max-eval-samples", "64"]
    demo = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    try:
        output, _ = demo.communicate(timeout=600)
    finally:
        if demo.poll() is None:
            demo.terminate()  # its fleet tears down on SIGTERM
            demo.wait(timeout=30)
    run_dir = tmp_path / "runs" / "it-link"
    assert demo.returncode == 0, output[-3000:] + log_tail(*(run_dir / "logs").glob("*.log"))
    assert f"devices behind {LINK} links" in output
    # Teardown: nothing the demo's fleet made remains (its tag starts jf{pid}{letters}).
    fleet_tag = re.compile(rf"jf{demo.pid}[a-z]")
    assert [name for name in link_leftovers(f"jf{demo.pid}") if fleet_tag.match(name)] == []

    [metrics] = read_metrics(run_dir)
    assert metrics["status"] == "aggregated" and metrics["num_aggregated"] == 2
    record = json.loads((run_dir / LINK_FILE).read_text())
    assert record["link"] == LinkSpec.parse(LINK).to_dict()
    assert record["n_devices"] == 2 and record["broker"] == "amqtt"
    hellos = _jsonl(run_dir / "devices.jsonl")
    assert {h["device_id"] for h in hellos} == {"demo-01", "demo-02"}
    assert {h["context"]["link"] for h in hellos} == {LINK}

    records = _jsonl(run_dir / "profiles.jsonl")
    transfers = [r for r in records if r["phase"] in ("download", "upload")]
    assert sorted((r["device_id"], r["phase"]) for r in transfers) == [
        ("demo-01", "download"),
        ("demo-01", "upload"),
        ("demo-02", "download"),
        ("demo-02", "upload"),
    ]
    for r in transfers:
        download = r["phase"] == "download"
        payload_bytes = r["bytes_received"] if download else r["extra"]["update_payload_bytes"]
        assert payload_bytes > 250_000  # LoRA r=8 on query,value + head, fp32
        # The link shaped the transfer: every payload byte crossed the 20 Mbit/s link inside the
        # phase (headers only add), so no phase is shorter than the rate allows; how much longer
        # it took depends on the machine's load (bench/link_rates.py measures rates).
        assert r["duration_s"] >= payload_bytes * 8 / RATE_BIT_S, r


def _cli_error(monkeypatch: pytest.MonkeyPatch, capsys: Any, *argv: str) -> str:
    """Run `jetfed ARGV` in this process; it must fail with exit status 2 and say why."""
    monkeypatch.setattr(sys, "argv", ["jetfed", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    return str(capsys.readouterr().err)


def test_malformed_link_is_one_line_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    out = str(tmp_path / "runs")
    error = _cli_error(monkeypatch, capsys, "demo", "--output-dir", out, "--link", "100mb")
    assert error.startswith("jetfed: error: --link '100mb': cannot tell what '100mb' is")
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_link_without_root_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    out = str(tmp_path / "runs")
    error = _cli_error(monkeypatch, capsys, "demo", "--output-dir", out, "--link", "10mbit")
    assert error.strip() == f"jetfed: error: {ROOT_ERROR}"
    assert not (tmp_path / "runs").exists()


@pytest.mark.root
@root_only
def test_devices_reach_a_broker_only_where_it_listens(tmp_path: Path) -> None:
    """A private Mosquitto on the fleet's broker host serves devices as is; a loopback-only
    broker given by URL is refused with the fix, instead of devices that never join."""
    with LinkedFleet(1, LinkSpec.parse("10mbit"), prefix="jfl") as fleet:
        with LocalMosquitto(host=fleet.broker_host) as own:
            assert device_broker_url(own.url, fleet) == own.url
        loopback = MosquittoBroker(tmp_path / "mosquitto", free_port())
        loopback.start()
        try:
            with pytest.raises(UserError, match=re.escape("listener PORT 0.0.0.0")):
                device_broker_url(f"mqtt://user:pw@127.0.0.1:{loopback.port}", fleet)
        finally:
            loopback.stop()
    assert link_leftovers(fleet.tag) == []
