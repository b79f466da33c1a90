"""Runs benchmarks by name and writes each result as JSON + Markdown with the machine it ran on.

A bench is a module `bench.<name>` with `run(quick: bool, ...) -> dict`; options such as
`datasets` or `link` are passed only to benches whose `run` accepts them, so the benches other
helpers write (telemetry, transfer throughput, split overhead) plug in unchanged. A module may
also define `markdown(results) -> str` for a better table than the generic key/value one.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
DEFAULT_DATASETS = REPO_ROOT.parent / "shared" / "datasets"

BENCHES = (
    "wire_efficiency",
    "round_overhead",
    "aggregation_throughput",
    "telemetry_overhead",
    "edge_step_overhead",
    "transfer_throughput",
    "split_overhead",
    "link_rates",
    "hostile_replay",
    "live_page",
    "lora_aggregation",
    "kd_payload",
    "simulation",
)
"""What `all` runs, cheapest first. The reproduction (tens of minutes), the compression
accuracy study (federated full fine-tuning per update dtype), the 1,000-device soak and the
weight spectra run only by name."""
SEPARATE = (
    "reproduction",
    "compression_accuracy",
    "causal_lm",
    "coordinator_memory",
    "method_comparison",
    "fleet_soak",
    "spectra",
)


def known_benches() -> List[str]:
    return list(BENCHES) + list(SEPARATE)


def bench_available(name: str) -> bool:
    """Benches written by other helpers may not have landed yet."""
    return importlib.util.find_spec(f"bench.{name}") is not None


def _version(module: str) -> Optional[str]:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # an absent or broken package is reported as missing, not fatal
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mosquitto_version() -> Optional[str]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(binary):
        return None
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (out.stdout or out.stderr).splitlines()
    return first[0].strip() if first else None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine_info() -> Dict[str, Any]:
    """What a reader needs to compare numbers across machines."""
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_bytes": int(psutil.virtual_memory().total),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "paho_mqtt": _version("paho.mqtt"),
        "mosquitto": _mosquitto_version(),
        "git_commit": _git_commit(),
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _flatten(prefix: str, value: Any, rows: List[List[str]]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, rows)
    elif isinstance(value, float):
        rows.append([prefix, f"{value:.6g}"])
    else:
        rows.append([prefix, json.dumps(value) if isinstance(value, list) else str(value)])


def table(header: List[str], rows: List[List[Any]]) -> str:
    """A Markdown table (floats shown with 4 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
        return "–" if value is None else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def generic_markdown(results: Dict[str, Any]) -> str:
    rows: List[List[str]] = []
    _flatten("", results, rows)
    return table(["metric", "value"], rows)  # type: ignore[arg-type]


def render_markdown(report: Dict[str, Any], module: Any) -> str:
    body = (
        module.markdown(report["results"])
        if hasattr(module, "markdown")
        else generic_markdown(report["results"])
    )
    machine = report["machine"]
    lines = [
        f"# bench: {report['bench']}{' (quick)' if report['quick'] else ''}",
        "",
        f"Command: `{report['command']}`  ",
        f"Started {report['started_utc']}, finished {report['finished_utc']} "
        f"({report['duration_s']:.1f} s).  ",
        f"Machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores, "
        f"{machine['ram_bytes'] / 2**30:.1f} GiB RAM, Python {machine['python']}, "
        f"torch {machine['torch']}, transformers {machine['transformers']}, "
        f"peft {machine['peft']}, {machine['mosquitto']}, commit {machine['git_commit']}, "
        f"load average {machine['load_average_1m']:.2f} at start.",
        "",
        body,
        "",
    ]
    return "\n".join(lines)


def run_bench(name: str, quick: bool, out_dir: Path, options: Dict[str, Any]) -> Dict[str, Any]:
    """Run one bench and write `<out>/<name>.json` and `<out>/<name>.md`; returns the report."""
    module = importlib.import_module(f"bench.{name}")
    accepted = inspect.signature(module.run).parameters
    kwargs = {key: value for key, value in options.items() if key in accepted}
    started_utc, started_s = utc_now(), time.monotonic()
    machine = machine_info()
    results = module.run(quick, **kwargs)
    report = {
        "bench": name,
        "quick": quick,
        "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
        "started_utc": started_utc,
        "finished_utc": utc_now(),
        "duration_s": time.monotonic() - started_s,
        "machine": machine,
        "options": {key: str(value) for key, value in kwargs.items()},
        "results": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(render_markdown(report, module))
    return report
