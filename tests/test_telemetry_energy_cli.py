"""`jetfed profiles energy --tegrastats LOG` on logs made of real AGX Orin lines
(/work/shared/fixtures/tegrastats-orin.md, via tests/tegrastats_lines.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from tests.tegrastats_lines import JP5_IDLE, JP5_LOAD, ORIN_NX

REPO_ROOT = Path(__file__).resolve().parent.parent
IDLE_MODULE_W = 2.399 + 0.400 + 4.032
LOAD_MODULE_W = 3.150 + 14.312 + 4.968


def _energy(log: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jetfed", "profiles", "energy", "--tegrastats", str(log), *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def _restamp(line: str, second: int) -> str:
    return f"04-24-2023 00:01:{second:02d}" + line[len("04-24-2023 00:01:24") :]


def _write(tmp_path: Path, lines: List[str]) -> Path:
    log = tmp_path / "tegrastats.log"
    log.write_text("\n".join(lines) + "\n")
    return log


def test_timestamped_log_uses_the_lines_clock(tmp_path: Path) -> None:
    log = _write(tmp_path, [_restamp(JP5_IDLE, s) for s in (24, 25, 27)])
    result = _energy(log)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["time_source"] == "line" and report["duration_s"] == 3.0
    assert report["module_rails"] == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"]
    assert report["module"]["energy_j"] == pytest.approx(IDLE_MODULE_W * 3)
    assert report["rails"]["VDDQ_VDD2_1V8AO"]["energy_j"] == pytest.approx(0.301 * 3)
    assert "NC" not in report["rails"]


def test_untimed_log_uses_the_interval(tmp_path: Path) -> None:
    log = _write(tmp_path, ["", JP5_LOAD, JP5_IDLE[len("04-24-2023 00:01:24 ") :], JP5_LOAD])
    report = json.loads(_energy(log, "--interval-ms", "500").stdout)
    assert report["time_source"] == "interval" and report["line_count"] == 3
    assert report["duration_s"] == 1.0
    expected = 0.25 * (LOAD_MODULE_W + IDLE_MODULE_W) * 2
    assert report["module"]["energy_j"] == pytest.approx(expected)
    assert report["module"]["mean_power_w"] == pytest.approx(expected / 1.0)
    assert report["module"]["peak_power_w"] == pytest.approx(LOAD_MODULE_W)
    assert report["rails"]["VDD_CPU_CV"]["peak_power_w"] == pytest.approx(14.312)


def test_orin_nx_module_is_vdd_in(tmp_path: Path) -> None:
    report = json.loads(_energy(_write(tmp_path, [ORIN_NX, ORIN_NX])).stdout)
    assert report["module_rails"] == ["VDD_IN"]
    assert report["module"]["energy_j"] == pytest.approx(4.542)  # 1 s at the default interval


def test_repeated_timestamps_need_the_interval(tmp_path: Path) -> None:
    log = _write(tmp_path, [_restamp(JP5_IDLE, 24)] * 3)
    result = _energy(log)
    assert result.returncode == 2 and "--interval-ms" in result.stderr
    report = json.loads(_energy(log, "--interval-ms", "100").stdout)
    assert report["duration_s"] == pytest.approx(0.2)


def test_a_log_without_rails_is_a_user_error(tmp_path: Path) -> None:
    result = _energy(_write(tmp_path, ["RAM 1282/62795MB CPU [0%@729]"]))
    assert result.returncode == 2 and "no tegrastats lines with power rails" in result.stderr
