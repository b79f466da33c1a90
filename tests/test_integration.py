"""End to end: a coordinator and 2 edge processes over a real broker, real MiniLM, real SST-2."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

import pytest
from safetensors.torch import load_file

from tests.brokers import MosquittoBroker, free_port
from tests.fleet import jetfed, log_tail, read_metrics, start_edges, stop, wait_for, write_config


def _assert_two_aggregated_rounds(run_dir: Path) -> None:
    metrics = read_metrics(run_dir)
    assert [m["round_index"] for m in metrics] == [0, 1]
    for m in metrics:
        assert m["status"] == "aggregated" and m["num_aggregated"] == 2
        assert 0.0 <= m["accuracy"] <= 1.0
        assert m["bytes_up"] > 0 and m["bytes_down"] > 0
    first = load_file(str(run_dir / "global/round-0000/adapter_model.safetensors"))
    second = load_file(str(run_dir / "global/round-0001/adapter_model.safetensors"))
    assert set(first) == set(second)
    assert any(not first[name].equal(second[name]) for name in first), "global adapter unchanged"
    from peft import PeftModel

    from jetfed.edge.models import load_classifier
    from jetfed.edge.wire import ModelRef

    base = load_classifier(ModelRef(name_or_path="minilm", num_labels=2))
    loaded = PeftModel.from_pretrained(base, str(run_dir / "global/round-0001"))
    assert any("lora_A" in name for name, _ in loaded.named_parameters())
    profiles = (run_dir / "profiles.jsonl").read_text()
    assert '"phase":"train"' in profiles and '"device_id":"dev-1"' in profiles


@pytest.mark.parametrize("method", ["lora", "federa"])
@pytest.mark.parametrize("broker_kind", ["mosquitto", "embedded"])
def test_two_devices_two_rounds(
    method: str,
    broker_kind: str,
    tmp_path: Path,
    mosquitto_factory: Callable[..., MosquittoBroker],
    minilm_path: str,
    sst2_dir: Path,
) -> None:
    name = f"it-{method}-{broker_kind}"
    config = write_config(tmp_path, name, method, sst2_dir)
    if broker_kind == "mosquitto":
        url = mosquitto_factory().url
        coordinator = jetfed(
            "-v", "coordinator", "run", str(config), "--broker", url, log=tmp_path / "coord.log"
        )
    else:
        port = free_port()
        url = f"mqtt://127.0.0.1:{port}"
        coordinator = jetfed(
            "-v",
            "coordinator",
            "run",
            str(config),
            "--embedded-port",
            str(port),
            log=tmp_path / "coord.log",
        )
    edges = start_edges(url, name, sst2_dir, 2, tmp_path / "logs")
    try:
        assert coordinator.wait(timeout=600) == 0, log_tail(
            tmp_path / "coord.log", *(tmp_path / "logs").iterdir()
        )
    finally:
        stop([coordinator, *edges])
    _assert_two_aggregated_rounds(tmp_path / "runs" / name)


def test_coordinator_killed_after_round_one_resumes(
    tmp_path: Path, mosquitto: MosquittoBroker, minilm_path: str, sst2_dir: Path
) -> None:
    name = "it-resume"
    config = write_config(tmp_path, name, "lora", sst2_dir)
    run_dir = tmp_path / "runs" / name
    log = tmp_path / "coord.log"
    coordinator = jetfed(
        "-v", "coordinator", "run", str(config), "--broker", mosquitto.url, log=log
    )
    edges = start_edges(mosquitto.url, name, sst2_dir, 2, tmp_path / "logs")
    try:
        wait_for(
            lambda: len(read_metrics(run_dir)) >= 1 or coordinator.poll() is not None,
            300,
            "round 1",
        )
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait()
        assert len(read_metrics(run_dir)) == 1, log_tail(log)
        resumed_log = tmp_path / "coord-resumed.log"
        resumed = jetfed(
            "-v",
            "coordinator",
            "run",
            str(config),
            "--broker",
            mosquitto.url,
            "--resume",
            log=resumed_log,
        )
        assert resumed.wait(timeout=300) == 0, log_tail(resumed_log, *(tmp_path / "logs").iterdir())
    finally:
        stop([coordinator, *edges])
    _assert_two_aggregated_rounds(run_dir)
    assert "run.resumed next_round=1" in resumed_log.read_text()


def test_existing_run_dir_without_resume_is_refused(tmp_path: Path, sst2_dir: Path) -> None:
    config = write_config(tmp_path, "it-exists", "lora", sst2_dir)
    (tmp_path / "runs" / "it-exists").mkdir(parents=True)
    (tmp_path / "runs" / "it-exists" / "metrics.jsonl").write_text("")
    process = jetfed(
        "coordinator",
        "run",
        str(config),
        "--broker",
        "mqtt://127.0.0.1:1",
        log=tmp_path / "out.log",
    )
    assert process.wait(timeout=120) == 2
    output = (tmp_path / "out.log").read_text()
    assert "already exists: pass --resume" in output and "Traceback" not in output
