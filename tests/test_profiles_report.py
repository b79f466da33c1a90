"""`jetfed profiles report` on REAL runs: two tiny demos (LoRA, FeDeRA) side by side, and a run
whose device reads power from an INA3221 sysfs tree laid out like an AGX Orin's.

Every number the report prints is recomputed here from the run directories' JSONL files.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from tests.fleet import ENV, jetfed, log_tail, read_metrics, stop, write_config
from tests.telemetry_trees import build_ina3221_tree

DEMO_ARGS = ["--rounds", "2", "--local-steps", "3", "--max-eval-samples", "64"]
IDLE_BASELINE_S = "0.5"
# rail → (mV, mA): module power = GPU_SOC + CPU_CV + SYS_5V0 = 5 + 3 + 4 W; 1V8AO is inside SYS_5V0
RAILS = {
    "VDD_GPU_SOC": (5000, 1000),
    "VDD_CPU_CV": (5000, 600),
    "VIN_SYS_5V0": (5000, 800),
    "VDDQ_VDD2_1V8AO": (1800, 500),
}
MODULE_W = 12.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JETFED = [sys.executable, "-m", "jetfed"]


def run_demo(method: str, output_dir: Path) -> Tuple[Path, str]:
    name = f"rep-{method}"
    result = subprocess.run(
        [
            *JETFED,
            "demo",
            "--method",
            method,
            "--name",
            name,
            *DEMO_ARGS,
            "--output-dir",
            str(output_dir),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir / name, result.stdout


@pytest.fixture(scope="module")
def demo_runs(
    tmp_path_factory: pytest.TempPathFactory, minilm_path: str
) -> Dict[str, Tuple[Path, str]]:
    output_dir = tmp_path_factory.mktemp("runs")
    return {method: run_demo(method, output_dir) for method in ("lora", "federa")}


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def md_tables(text: str) -> Dict[str, List[Dict[str, str]]]:
    """Each Markdown table as rows of {header: cell}, keyed by the heading above it."""
    tables: Dict[str, List[Dict[str, str]]] = {}
    heading = ""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("| ") and (index == 0 or not lines[index - 1].startswith("|")):
            headers = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for row in lines[index + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(headers, (c.strip() for c in row.strip("|").split("|")))))
            tables[heading] = rows
    return tables


def number(cell: str) -> Optional[float]:
    return None if cell == "n/a" else float(cell.replace(",", ""))


def assert_cell(cell: str, expected: Optional[float], digits: int) -> None:
    """The printed cell is the expected value rounded to `digits` (n/a when None)."""
    if expected is None:
        assert cell == "n/a"
        return
    value = number(cell)
    assert value is not None and abs(value - expected) <= 0.5 * 10**-digits + 1e-9, (
        cell,
        expected,
    )


def round_energy(records: List[Dict[str, Any]], round_index: int) -> Optional[float]:
    """Independent of profiles/: all devices, all phases but the idle baseline; n/a if any lacks."""
    energies = [
        r["energy_j"] for r in records if r["round_index"] == round_index and r["phase"] != "idle"
    ]
    if not energies or any(e is None for e in energies):
        return None
    return sum(energies)


def check_round_table(rows: List[Dict[str, str]], run_dir: Path) -> None:
    metrics = read_metrics(run_dir)
    records = read_jsonl(run_dir / "profiles.jsonl")
    assert [int(r["round"]) for r in rows] == [m["round_index"] for m in metrics]
    for row, m in zip(rows, metrics):
        work = [r for r in records if r["round_index"] == m["round_index"] and r["phase"] != "idle"]
        assert_cell(row["accuracy"], m["accuracy"], 4)
        assert_cell(row["round (s)"], m["round_s"], 2)
        assert_cell(row["cumulative (s)"], m["wall_clock_s"], 2)
        assert number(row["bytes up"]) == m["bytes_up"]
        assert number(row["bytes down"]) == m["bytes_down"]
        assert_cell(row["energy (J)"], round_energy(records, m["round_index"]), 2)
        for phase in ("download", "setup", "train", "upload"):
            energies = [r["energy_j"] for r in work if r["phase"] == phase]
            expected = None if None in energies else sum(energies)
            assert_cell(row[f"{phase} (J)"], expected, 2)
        assert_cell(row["peak RSS (MB)"], max(r["peak_rss_bytes"] for r in work) / 1e6, 1)


def check_pngs(report_dir: Path, markdown: str) -> None:
    from matplotlib.image import imread

    names = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert len(names) == len(set(names)) == (6 if "power_trace_round_" in markdown else 3)
    html = (report_dir / "report.html").read_text()
    for name in names:
        path = report_dir / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        pixels = imread(path)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100, name
        assert pixels.std() > 0, f"{name} is blank"
        assert f'src="{name}"' in html


def test_demo_ends_with_report_and_fills_memory_not_energy(
    demo_runs: Dict[str, Tuple[Path, str]],
) -> None:
    run_dir, stdout = demo_runs["lora"]
    last_line = stdout.strip().splitlines()[-1]
    assert last_line.startswith(f"report: {run_dir / 'report' / 'report.md'}")
    assert (run_dir / "report" / "report.html").exists()
    assert "round 0: aggregated, 2/2 devices" in stdout  # not a terminal: a line per round
    for device in ("demo-01", "demo-02"):  # each device's own progress, at default verbosity
        log = (run_dir / "logs" / f"{device}.log").read_text()
        assert "round.progress round_index=0 phase=train" in log, log[-2000:]
    for m in read_metrics(run_dir):
        # psutil backend: no power sensor → no energy (never 0), but memory is measured
        assert "energy_j" not in m["extra"]
        assert m["extra"]["peak_rss_bytes"] > 100e6
    hellos = read_jsonl(run_dir / "devices.jsonl")
    assert {h["telemetry_backend"] for h in hellos} == {"psutil"}
    assert all(h["context"]["backend"] == "psutil" for h in hellos)
    assert all(h["context"]["effective_sample_rate_hz"] > 0 for h in hellos)
    records = read_jsonl(run_dir / "profiles.jsonl")
    idle = [r for r in records if r["phase"] == "idle"]
    assert {r["device_id"] for r in idle} == {"demo-01", "demo-02"}
    assert all(r["idle_power_w"] is None and r["energy_j"] is None for r in idle)
    # the last round's upload phase is reported after its ack: the coordinator waits for it
    last_round = read_metrics(run_dir)[-1]["round_index"]
    uploads = {
        r["device_id"] for r in records if (r["round_index"], r["phase"]) == (last_round, "upload")
    }
    assert uploads == {"demo-01", "demo-02"}


def test_two_runs_side_by_side_match_the_stored_records(
    demo_runs: Dict[str, Tuple[Path, str]], tmp_path: Path
) -> None:
    runs = {method: demo_runs[method][0] for method in ("lora", "federa")}
    out = tmp_path / "compare"
    result = subprocess.run(
        [*JETFED, "profiles", "report", str(runs["lora"]), str(runs["federa"]), "--out", str(out)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"report: {out / 'report.md'}" in result.stdout
    markdown = (out / "report.md").read_text()
    tables = md_tables(markdown)

    metrics = {method: read_metrics(path) for method, path in runs.items()}
    target = min(max(m["accuracy"] for m in ms) for ms in metrics.values())
    target_rows = {row["run"]: row for row in tables["To target accuracy"]}
    assert set(target_rows) == {"lora", "federa"}
    for method, ms in metrics.items():
        row = target_rows[method]
        assert_cell(row["target accuracy"], target, 4)
        hit = next(i for i, m in enumerate(ms) if m["accuracy"] >= target)
        assert int(row["rounds-to-target"]) == hit + 1
        assert_cell(row["time-to-target (s)"], ms[hit]["wall_clock_s"], 2)
        assert row["energy-to-target (J)"] == "n/a"
        spent = sum(m["bytes_up"] + m["bytes_down"] for m in ms[: hit + 1])
        assert number(row["bytes-to-target"]) == spent

    overview = {row["run"]: row for row in tables["jetfed profile report"]}
    for method, ms in metrics.items():
        assert int(overview[method]["rounds"]) == len(ms)
        assert overview[method]["backend"] == "psutil"
        assert overview[method]["energy (J)"] == "n/a"
        check_round_table(tables[method], runs[method])

    memory = {row["run"]: row for row in tables["Peak memory"]}
    for method, path in runs.items():
        work = [r for r in read_jsonl(path / "profiles.jsonl") if r["phase"] != "idle"]
        peak_mb = max(r["peak_rss_bytes"] for r in work) / 1e6
        assert_cell(memory[method]["peak RSS (MB)"], peak_mb, 1)
        assert memory[method]["peak GPU (MB)"] == "n/a"
    check_pngs(out, markdown)
    # no power sensor: said once, and no empty "energy n/a" plots
    assert markdown.count("No device had a power sensor (telemetry: psutil)") == 1
    for absent in ("accuracy_vs_energy", "energy_per_round_by_phase", "power_trace_round_"):
        assert absent not in markdown
        assert not list(out.glob(f"{absent}*.png"))


def test_report_rejects_a_folder_that_is_no_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [*JETFED, "profiles", "report", str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "no metrics.jsonl" in result.stdout + result.stderr


def test_edge_refuses_an_unavailable_telemetry_backend(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *JETFED,
            *("edge", "run", "--broker", "mqtt://127.0.0.1:9", "--device-id", "d1"),
            *("--data", str(tmp_path), "--telemetry", "ina3221", "--sysfs-root", str(tmp_path)),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "telemetry backend ina3221 is unavailable" in result.stdout + result.stderr


def test_profiles_report_does_not_import_torch() -> None:
    code = (
        "import jetfed.profiles.report, jetfed.profiles.cli, sys; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, timeout=120)


@pytest.fixture(scope="module")
def ina3221_run(
    tmp_path_factory: pytest.TempPathFactory, sst2_dir: Path, minilm_path: str
) -> Iterator[Path]:
    """One device reading an AGX Orin INA3221 tree with constant rails, one real round."""
    tmp_path = tmp_path_factory.mktemp("ina3221")
    sysfs = tmp_path / "sys"
    build_ina3221_tree(sysfs, RAILS)
    name = "rep-ina3221"
    config = write_config(tmp_path, name, "lora", sst2_dir, rounds=1, clients=1)
    from tests.brokers import free_port

    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    coordinator = jetfed(
        "coordinator", "run", str(config), "--embedded-port", str(port), log=tmp_path / "c.log"
    )
    edge = jetfed(
        "edge",
        "run",
        "--broker",
        url,
        "--device-id",
        "orin-1",
        "--experiment",
        name,
        "--data",
        str(sst2_dir),
        "--threads",
        "1",
        "--telemetry",
        "ina3221",
        "--sysfs-root",
        str(sysfs),
        "--idle-baseline-s",
        IDLE_BASELINE_S,
        log=tmp_path / "edge.log",
    )
    try:
        code = coordinator.wait(timeout=600)
        assert code == 0, log_tail(tmp_path / "c.log", tmp_path / "edge.log")
    finally:
        stop([coordinator, edge])
    yield tmp_path / "runs" / name


def test_ina3221_energy_end_to_end(ina3221_run: Path, tmp_path: Path) -> None:
    records = read_jsonl(ina3221_run / "profiles.jsonl")
    assert {r["phase"] for r in records} >= {"idle", "download", "setup", "train", "upload"}
    for r in records:
        assert r["backend"] == "ina3221"
        assert r["energy_j"] == pytest.approx(MODULE_W * r["duration_s"], rel=0.01, abs=0.005)
        assert r["energy_by_rail_j"]["VDDQ_VDD2_1V8AO"] == pytest.approx(
            0.9 * r["duration_s"], rel=0.01, abs=0.001
        )
        assert r["idle_power_w"] == pytest.approx(MODULE_W)
        assert r["energy_above_idle_j"] == pytest.approx(0.0, abs=0.01)
        if r["phase"] in ("idle", "setup", "train"):
            watts = [w for _, w in r["power_trace"]]
            assert watts and all(w == pytest.approx(MODULE_W) for w in watts)
    hello = read_jsonl(ina3221_run / "devices.jsonl")[-1]
    assert hello["telemetry_backend"] == "ina3221" and hello["context"]["backend"] == "ina3221"
    assert read_metrics(ina3221_run)[0]["extra"]["energy_j"] > 0

    from jetfed.profiles.report import build_report

    report = build_report([ina3221_run], tmp_path / "report", target_accuracy=0.0)
    tables = md_tables(report.markdown_path.read_text())
    check_round_table(tables["lora"], ina3221_run)
    energy = round_energy(records, 0)
    assert energy is not None and energy > 0
    assert_cell(tables["To target accuracy"][0]["energy-to-target (J)"], energy, 2)
    assert_cell(tables["Devices"][0]["idle power (W)"], MODULE_W, 2)
    check_pngs(report.markdown_path.parent, report.markdown_path.read_text())


def test_same_method_twice_and_target_not_reached(ina3221_run: Path, tmp_path: Path) -> None:
    from jetfed.profiles.report import build_report

    copy = tmp_path / "again"
    shutil.copytree(ina3221_run, copy)
    report = build_report([ina3221_run, copy], tmp_path / "both", target_accuracy=1.0)
    rows = md_tables(report.markdown_path.read_text())["To target accuracy"]
    assert [row["run"] for row in rows] == ["lora · rep-ina3221", "lora · again"]
    assert all(row["rounds-to-target"] == "not reached" for row in rows)
    assert all(row["energy-to-target (J)"] == "n/a" for row in rows)
