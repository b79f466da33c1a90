"""The run directory `runs/<experiment>/`: config, metrics, profiles, adapters and checkpoint.

```
config.yaml            the validated experiment config
metrics.jsonl          one RoundMetrics per completed round
profiles.jsonl         every PhaseRecord devices sent (profiles.parquet / .csv beside it)
devices.jsonl          each device's hello (capabilities and context), latest last
link.json              the emulated links devices sat behind (local fleets with --link only)
global/round-NNNN/     the global model after round N in PEFT format (PeftModel.from_pretrained)
checkpoint/            state.json + global.safetensors (+ init.safetensors, strategy.safetensors):
                       what --resume needs
```
Files are written atomically (temp file + rename), so a coordinator killed mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import yaml

from jetfed.coordinator.config import ExperimentConfig, parse_config
from jetfed.coordinator.records import CheckpointState, RoundMetrics
from jetfed.edge.methods.base import Tensors
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.edge.wire import Hello


def _atomic_save(path: Path, write: Callable[[Path], object]) -> None:
    """`write` fills a temp file, which is synced and renamed to `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _atomic_write(path: Path, data: bytes) -> None:
    _atomic_save(path, lambda tmp: tmp.write_bytes(data))


def _atomic_save_tensors(path: Path, tensors: Tensors) -> None:
    """Written from the tensors' own memory (safetensors' save_file): `save()`'s bytes held two
    encoded copies at once, 1.1 GB for a full SmolLM2 state."""
    from safetensors.torch import save_file

    _atomic_save(path, lambda tmp: save_file(tensors, str(tmp)))


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoint_dir = path / "checkpoint"

    def create(self, config_dump: Dict[str, object]) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (self.path / "global").mkdir(exist_ok=True)
        _atomic_write(
            self.path / "config.yaml", yaml.safe_dump(config_dump, sort_keys=False).encode()
        )

    def load_config(self) -> ExperimentConfig:
        """The config the run was created with, parsed by this version of jetfed."""
        path = self.path / "config.yaml"
        return parse_config(yaml.safe_load(path.read_text()) or {}, str(path))

    def exists(self) -> bool:
        return (self.path / "metrics.jsonl").exists() or (
            self.checkpoint_dir / "state.json"
        ).exists()

    def _append(self, name: str, lines: List[str]) -> None:
        with open(self.path / name, "a", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for line in lines)

    def append_metrics(self, metrics: RoundMetrics) -> None:
        self._append("metrics.jsonl", [metrics.model_dump_json()])

    def read_metrics(self) -> List[RoundMetrics]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
        return [RoundMetrics.model_validate_json(line) for line in lines if line.strip()]

    def append_profiles(self, records: List[PhaseRecord]) -> None:
        self._append("profiles.jsonl", [record.model_dump_json() for record in records])

    def read_profiles(self) -> List[PhaseRecord]:
        path = self.path / "profiles.jsonl"
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
        return [PhaseRecord.model_validate_json(line) for line in lines if line.strip()]

    def append_device(self, hello: Hello) -> None:
        self._append("devices.jsonl", [hello.model_dump_json()])

    def write_profile_tables(self) -> None:
        """profiles.parquet and profiles.csv next to profiles.jsonl (needs pandas + pyarrow)."""
        source = self.path / "profiles.jsonl"
        if not source.exists():
            return
        try:
            import pandas as pd
        except ImportError:
            return
        rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        frame = pd.json_normalize(rows, sep=".")
        frame.to_csv(self.path / "profiles.csv", index=False)
        with contextlib.suppress(ImportError):
            frame.to_parquet(self.path / "profiles.parquet", index=False)

    def adapter_dir(self, round_index: int) -> Path:
        return self.path / "global" / f"round-{round_index:04d}"

    def save_checkpoint(
        self,
        state: CheckpointState,
        global_state: Tensors,
        init: Optional[Tensors],
        strategy_state: Tensors,
    ) -> None:
        """state.json goes last: a checkpoint is whatever the last complete state.json names."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _atomic_save_tensors(self.checkpoint_dir / "global.safetensors", global_state)
        if init is not None:
            _atomic_save_tensors(self.checkpoint_dir / "init.safetensors", init)
        if strategy_state:
            _atomic_save_tensors(self.checkpoint_dir / "strategy.safetensors", strategy_state)
        state = state.model_copy(update={"has_strategy_state": bool(strategy_state)})
        _atomic_write(self.checkpoint_dir / "state.json", state.model_dump_json(indent=2).encode())

    def load_checkpoint(self) -> Tuple[CheckpointState, Tensors, Optional[Tensors], Tensors]:
        """(state, global state, FeDeRA init or None, strategy state, empty if none)."""
        from safetensors.torch import load_file

        state = CheckpointState.model_validate_json(
            (self.checkpoint_dir / "state.json").read_text()
        )
        global_state = load_file(str(self.checkpoint_dir / "global.safetensors"))
        init = load_file(str(self.checkpoint_dir / "init.safetensors")) if state.has_init else None
        strategy = (
            load_file(str(self.checkpoint_dir / "strategy.safetensors"))
            if state.has_strategy_state
            else {}
        )
        return state, global_state, init, strategy
