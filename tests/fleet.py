"""Real processes for integration tests: the coordinator and edge agents as `jetfed` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from jetfed.coordinator.links.netns import list_namespaces

ENV = dict(
    os.environ,
    HF_HUB_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    PYTHONUNBUFFERED="1",
    JETFED_IDLE_BASELINE_S="0.5",  # edges measure idle power before round 0: keep tests short
)


def write_config(
    tmp_path: Path,
    name: str,
    method: str,
    data: Path,
    rounds: int = 2,
    clients: int = 2,
    **sections: Dict[str, Any],
) -> Path:
    """A small but real experiment: MiniLM, 3 local steps, 64 validation samples."""
    raw: Dict[str, Any] = {
        "name": name,
        "model": {"name_or_path": "minilm", "max_length": 48},
        "method": {"name": method},
        "training": {"local_steps": 3, "batch_size": 8, "learning_rate": 1e-3},
        "data": {
            "path": str(data),
            "partition": {"kind": "iid", "num_clients": clients},
            "max_eval_samples": 64,
        },
        "rounds": {
            "count": rounds,
            "min_clients": clients,
            "deadline_s": 300,
            "wait_for_devices_s": 240,
        },
        "output_dir": str(tmp_path / "runs"),
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def jetfed(
    *args: str, log: Optional[Path] = None, env: Optional[Dict[str, str]] = None
) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the process
    return subprocess.Popen(
        [sys.executable, "-m", "jetfed", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env or ENV,
    )


def start_edges(
    broker_url: str, experiment: str, data: Path, count: int, log_dir: Path
) -> List[subprocess.Popen[bytes]]:
    log_dir.mkdir(parents=True, exist_ok=True)
    return [
        jetfed(
            "-v",
            "edge",
            "run",
            "--broker",
            broker_url,
            "--device-id",
            f"dev-{i}",
            "--experiment",
            experiment,
            "--data",
            str(data),
            "--threads",
            "1",
            log=log_dir / f"dev-{i}.log",
        )
        for i in range(count)
    ]


def stop(processes: List[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate: Any, timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def log_tail(*paths: Path, chars: int = 3000) -> str:
    return "\n".join(
        f"--- {p}\n{p.read_text(errors='replace')[-chars:]}" for p in paths if p.exists()
    )


def link_leftovers(tag_start: str) -> List[str]:
    """Network namespaces and links whose names start with `tag_start` (a LinkedFleet's tag)."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    return [name for name in list_namespaces() + names if name.startswith(tag_start)]
