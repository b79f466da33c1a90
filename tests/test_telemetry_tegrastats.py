"""Real AGX Orin / Orin NX tegrastats lines (JetPack 5, 6, 7) parse into the right rails and
values. Lines from /work/shared/fixtures/tegrastats-orin.md, copied in tests/tegrastats_lines.py."""

from __future__ import annotations

import calendar

import pytest

from jetfed.edge.telemetry.rails import module_power_w, module_rail_names
from jetfed.edge.telemetry.tegrastats_parse import parse_line
from tests import tegrastats_lines as lines


def test_jetpack5_idle_drops_nc_keeps_every_rail_and_reads_ram_and_time() -> None:
    parsed = parse_line(lines.JP5_IDLE)
    assert parsed.rails_w == {
        "VDD_GPU_SOC": 2.399,
        "VDD_CPU_CV": 0.400,
        "VIN_SYS_5V0": 4.032,
        "VDDQ_VDD2_1V8AO": 0.301,
    }
    assert parsed.ram_used_bytes == 1282 * 1024 * 1024
    assert parsed.timestamp_unix_s == calendar.timegm((2023, 4, 24, 0, 1, 24, 0, 0, 0))
    # VDDQ_VDD2_1V8AO is inside VIN_SYS_5V0: module power leaves it out.
    assert module_power_w(parsed.rails_w) == pytest.approx(2.399 + 0.400 + 4.032)


def test_jetpack5_load_uses_instantaneous_not_average() -> None:
    parsed = parse_line(lines.JP5_LOAD)
    assert parsed.rails_w == {
        "VDD_GPU_SOC": 3.150,
        "VDD_CPU_CV": 14.312,
        "VIN_SYS_5V0": 4.968,
        "VDDQ_VDD2_1V8AO": 1.091,
    }
    assert parsed.timestamp_unix_s is None and parsed.ram_used_bytes is None
    assert module_power_w(parsed.rails_w) == pytest.approx(22.430)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (lines.JP6_ROOT, {"VDD_GPU_SOC": 2.412, "VDD_CPU_CV": 1.607, "VIN_SYS_5V0": 4.707}),
        (lines.JP6_USER, {"VDD_GPU_SOC": 3.178, "VDD_CPU_CV": 0.794, "VIN_SYS_5V0": 4.543}),
        (lines.JP7, {"VDD_GPU_SOC": 5.139, "VDD_CPU_CV": 3.268, "VIN_SYS_5V0": 5.500}),
    ],
    ids=["jetpack6-root", "jetpack6-user", "jetpack7-triple"],
)
def test_jetpack6_and_7_three_rail_lines(line: str, expected: dict) -> None:
    parsed = parse_line(line)
    assert parsed.rails_w == expected
    assert parsed.timestamp_unix_s is not None
    assert module_power_w(parsed.rails_w) == pytest.approx(sum(expected.values()))


def test_jetpack6_ram_and_temperatures_are_not_rails() -> None:
    parsed = parse_line(lines.JP6_ROOT)
    assert parsed.ram_used_bytes == 18207 * 1024 * 1024
    assert not any(name.lower().startswith(("cpu", "soc", "tj", "swap")) for name in parsed.rails_w)


def test_orin_nx_module_power_is_vdd_in_alone() -> None:
    parsed = parse_line(lines.ORIN_NX)
    assert parsed.rails_w == {"VDD_IN": 4.542, "VDD_CPU_GPU_CV": 0.495, "VDD_SOC": 1.286}
    assert module_rail_names(parsed.rails_w) == ("VDD_IN",)
    assert module_power_w(parsed.rails_w) == pytest.approx(4.542)


def test_pre_jetpack5_lines_without_mw_suffix() -> None:
    parsed = parse_line("RAM 2000/3964MB (lfb 4x4MB) POM_5V_IN 3218/3218 POM_5V_GPU 40/40")
    assert parsed.rails_w == {"POM_5V_IN": 3.218, "POM_5V_GPU": 0.040}
    assert module_power_w(parsed.rails_w) == pytest.approx(3.218)


def test_agx_orin_module_power_is_none_when_a_top_rail_is_missing() -> None:
    assert module_power_w({"VDD_GPU_SOC": 1.0, "VDD_CPU_CV": 1.0}) is None
