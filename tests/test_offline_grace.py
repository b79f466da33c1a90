"""A selected device that goes offline mid-round does not hold the round open until its
deadline: once `min_clients` updates are in and the missing device has been offline for
`rounds.offline_grace_s`, the coordinator aggregates. Real coordinator process, real Mosquitto,
scripted devices (the one that leaves publishes `offline`, as a dying edge's last will does)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from jetfed.edge.wire import Ack
from tests.brokers import MosquittoBroker
from tests.fleet import jetfed, log_tail, read_metrics, stop, write_config
from tests.scripted_device import ScriptedDevice

NAME = "it-offline-grace"


def test_round_closes_at_quorum_once_the_missing_device_is_offline(
    tmp_path: Path, mosquitto: MosquittoBroker, minilm_path: str, sst2_dir: Path
) -> None:
    config = write_config(tmp_path, NAME, "lora", sst2_dir, rounds=1, clients=3)
    raw = yaml.safe_load(config.read_text())
    raw["rounds"].update(min_clients=2, deadline_s=3600, offline_grace_s=1.0)
    config.write_text(yaml.safe_dump(raw))
    log = tmp_path / "coord.log"
    devices = [ScriptedDevice(mosquitto.url, NAME, d) for d in ("dev-0", "dev-1", "dev-2")]
    # All three announce (retained) before the coordinator subscribes, so round 0 selects all.
    for device in devices:
        device.join()
    coordinator = jetfed(
        "-v", "coordinator", "run", str(config), "--broker", mosquitto.url, log=log
    )
    try:
        tasks = [device.wait_task() for device in devices]
        assert tasks[0].selected_devices == ["dev-0", "dev-1", "dev-2"], log_tail(log)
        shapes = devices[0].fetch(tasks[0].global_state)
        small = {n: torch.full_like(t, 1e-4) for n, t in shapes.items()}
        for device, task in zip(devices[:2], tasks):
            device.send(device.update(task, device.offer_tensors(small)))
            assert isinstance(device.wait_reply(), Ack), log_tail(log)
        assert "round.closed_early" not in log.read_text(), "dev-2 is online: the round waits"
        devices[2].close()
        # The deadline is an hour away: returning at all means the round closed early.
        assert coordinator.wait(timeout=120) == 0, log_tail(log)
    finally:
        stop([coordinator])
        for device in devices[:2]:
            device.close()
    (metrics,) = read_metrics(tmp_path / "runs" / NAME)
    assert metrics["status"] == "aggregated"
    assert (metrics["num_selected"], metrics["devices"]) == (3, ["dev-0", "dev-1"])
    closed = [line for line in log.read_text().splitlines() if "round.closed_early" in line]
    assert len(closed) == 1 and "offline=dev-2" in closed[0], closed
