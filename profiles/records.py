"""Load a run directory (`runs/<experiment>/`) into typed records, without torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Type, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from jetfed.coordinator.records import RoundMetrics
from jetfed.edge.errors import UserError, validation_line
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.edge.wire import Hello

M = TypeVar("M", bound=BaseModel)


@dataclass
class RunRecords:
    """Everything a report needs from one run; `devices` holds each device's latest hello."""

    path: Path
    name: str
    method: str
    config: Dict[str, Any]
    metrics: List[RoundMetrics]
    profiles: List[PhaseRecord]
    devices: Dict[str, Hello] = field(default_factory=dict)


def read_jsonl(path: Path, model: Type[M]) -> List[M]:
    """One model per non-empty line; a missing file is empty; a bad line names file and line."""
    if not path.exists():
        return []
    items: List[M] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(model.model_validate_json(line))
        except ValidationError as exc:
            reason = validation_line(exc, default="line")
            raise UserError(f"{path}:{number}: not a {model.__name__} ({reason})") from None
    return items


def load_run(path: Path) -> RunRecords:
    """A run directory as written by the coordinator (see coordinator/rundir.py)."""
    path = Path(path)
    if not (path / "metrics.jsonl").exists():
        raise UserError(f"RUN_DIR {path} has no metrics.jsonl: pass a runs/<experiment> folder")
    config_file = path / "config.yaml"
    config: Dict[str, Any] = {}
    if config_file.exists():
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    metrics = read_jsonl(path / "metrics.jsonl", RoundMetrics)
    method = metrics[0].method if metrics else str(config.get("method", {}).get("name", "?"))
    devices = {hello.device_id: hello for hello in read_jsonl(path / "devices.jsonl", Hello)}
    return RunRecords(
        path=path,
        name=str(config.get("name", path.name)),
        method=method,
        config=config,
        metrics=metrics,
        profiles=read_jsonl(path / "profiles.jsonl", PhaseRecord),
        devices=devices,
    )
