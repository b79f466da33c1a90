"""What a person sees while a run starts and goes: the live table with each device's progress, a
line per round when output is not a terminal, one line (and no empty table) for a mistake, and
the device's progress reports (small, validated, rate-limited)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import yaml
from rich.console import Console

from jetfed.coordinator.config import load_config, parse_config
from jetfed.coordinator.progress import RoundTable
from jetfed.coordinator.records import RoundMetrics
from jetfed.edge.errors import ProtocolError, UserError
from jetfed.edge.mqtt import LinkCounters
from jetfed.edge.progress import ProgressReporter
from jetfed.edge.wire import Progress, encode_message, parse_message
from tests.brokers import free_port
from tests.fleet import ENV


def config(rounds: int = 1, name: str = "exp") -> object:
    raw = {"name": name, "data": {"path": "data"}, "rounds": {"count": rounds}}
    return parse_config(raw)


def metrics(round_index: int) -> RoundMetrics:
    return RoundMetrics(
        round_index=round_index,
        status="aggregated",
        method="lora",
        num_selected=2,
        num_aggregated=2,
        train_loss=0.5,
        accuracy=0.75,
        bytes_up=600_000,
        bytes_down=1_200_000,
        round_s=12.5,
        wall_clock_s=40.0,
    )


def progress(device_id: str, **fields: object) -> Progress:
    values = {
        "device_id": device_id,
        "round_index": 0,
        "phase": "train",
        "step": 12,
        "total_steps": 50,
        "bytes_received": 298_000,
        "bytes_sent": 0,
    }
    return Progress(**{**values, **fields})  # type: ignore[arg-type]


def terminal(width: int = 120) -> Console:
    return Console(force_terminal=True, width=width, record=True, color_system=None)


def shown(table: RoundTable, width: int = 120) -> str:
    """What the live display shows now."""
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(table.render())
    return console.export_text()


def test_live_table_shows_each_devices_progress_and_numbers_rounds_from_zero() -> None:
    with RoundTable(config(rounds=2), 2, console=terminal()) as table:  # type: ignore[arg-type]
        table.progress(progress("dev-1"))
        table.progress(progress("dev-0", phase="download", step=None, total_steps=None))
        during = shown(table)
        table.add(metrics(0))
        after = shown(table)
    assert "dev-1 train 12/50, 298.0 KB down, 0 B up" in during
    assert "dev-0 download, 298.0 KB down" in during
    assert "dev-1 train" not in after  # a finished round's progress is gone
    row = next(line for line in after.splitlines() if "2/2" in line)
    assert row.split()[1] == "0"  # round 0, as in metrics.jsonl, the report and global/


def test_the_empty_tables_title_fits_on_one_line_and_counts_grammatically() -> None:
    name = "demo-lora-20261203-150938"  # longer than the empty table is wide
    table = RoundTable(config(rounds=1, name=name), 1, console=terminal())  # type: ignore[arg-type]
    text = shown(table, width=100)
    title = f"jetfed {name}: lora on minilm, 1 device, 1 round"
    assert text.splitlines()[0].strip() == title
    assert "1 rounds" not in text and "1 devices" not in text


def test_output_that_is_no_terminal_gets_a_line_per_round() -> None:
    console = Console(force_terminal=False, width=120, record=True)
    with RoundTable(config(rounds=2), 2, console=console) as table:  # type: ignore[arg-type]
        table.progress(progress("dev-0"))
        table.add(metrics(0))
        first = console.export_text(clear=False)
    assert "round 0: aggregated, 2/2 devices, loss 0.500, acc 0.750" in first
    assert "12.5 s" in first
    assert "dev-0 train" not in first  # progress is for the live table only


def test_progress_is_validated_strictly() -> None:
    good = encode_message(progress("dev-0"))
    assert parse_message(Progress, good).step == 12
    for bad in (
        good.replace(b'"train"', b'"mining"'),
        good.replace(b'"step":12', b'"step":-1'),
        good.replace(b'"bytes_sent":0', b'"bytes_sent":0,"extra":1'),
        good.replace(b'"dev-0"', b'"a/b"'),
    ):
        with pytest.raises(ProtocolError):
            parse_message(Progress, bad)


def test_progress_reports_are_rate_limited_but_phase_changes_always_go() -> None:
    sent: List[Progress] = []
    counters = LinkCounters(bytes_sent=100, bytes_received=1000)
    reporter = ProgressReporter(
        "dev-0",
        lambda payload: sent.append(parse_message(Progress, payload)),
        counters,
        publish_interval_s=3600,
        log_interval_s=3600,
    )
    reporter.phase("idle", 0)  # not a round's phase
    reporter.step(1, 3)  # no round yet
    assert sent == []
    reporter.phase("download", 0)
    counters.bytes_received += 5000
    reporter.phase("train", 0)
    for step in (1, 2, 3):
        reporter.step(step, 3)
    assert [(p.phase, p.step) for p in sent] == [("download", None), ("train", None), ("train", 3)]
    assert sent[-1].bytes_received == 5000 and sent[-1].bytes_sent == 0
    assert all(len(encode_message(p)) < 200 for p in sent)


def test_a_bad_set_key_is_blamed_on_the_set_option(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "exp", "data": {"path": "data"}}))
    with pytest.raises(UserError) as error:
        load_config(str(path), ["rounds.cont=3"])
    assert str(error.value).startswith("--set rounds.cont=3: rounds.cont: unknown field")
    with pytest.raises(UserError, match=r"^--set name\.x=1: name is not a section$"):
        load_config(str(path), ["name.x=1"])
    path.write_text(yaml.safe_dump({"name": "exp", "data": {"path": "data"}, "rounds": {"x": 1}}))
    with pytest.raises(UserError, match=rf"^{path}: rounds\.x: unknown field"):
        load_config(str(path), ["rounds.count=3"])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jetfed", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )


def test_a_data_error_is_one_line_without_an_empty_table_before_it(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    raw = {"name": "exp", "data": {"path": str(tmp_path / "nowhere")}, "output_dir": str(tmp_path)}
    path.write_text(yaml.safe_dump(raw))
    result = run_cli("coordinator", "run", str(path), "--embedded-port", str(free_port()))
    assert result.returncode == 2
    assert "jetfed exp" not in result.stdout and "round" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere" in lines[0], result.stderr


@pytest.mark.parametrize("listens", [True, False])
def test_a_port_clash_suggests_embedded_port(tmp_path: Path, listens: bool) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"name": "exp", "data": {"path": str(tmp_path)}}))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        if listens:
            holder.listen()
        port = holder.getsockname()[1]
        result = run_cli("coordinator", "run", str(path), "--embedded-port", str(port))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--embedded-port" in lines[0] and str(port) in lines[0], lines


def test_rounds_show_the_lora_error_and_assigned_ranks() -> None:
    from jetfed.coordinator.records import AggregationError, DeviceAssignment

    lora = metrics(0).model_copy(
        update={
            "aggregation_error": AggregationError.of({"q": 0.012, "v": 0.034}),
            "assignments": {
                d: DeviceAssignment(rank=r, batch_size=8, reason="fits")
                for d, r in (("dev-0", 16), ("dev-1", 4))
            },
            "refused": {"dev-2": "too little memory"},
        }
    )
    console = Console(force_terminal=False, width=160, record=True)
    with RoundTable(config(rounds=2), 2, console=console) as table:  # type: ignore[arg-type]
        table.add(lora)
        shown_now = shown(table, width=160)
    assert "err 3.4e-02, ranks 4/16, 1 refused" in console.export_text()
    assert "err 3.4e-02" in shown_now
