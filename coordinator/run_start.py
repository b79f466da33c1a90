"""Where a run starts: its validation data, its label count, and its state — fresh from the
method's initial state, or from the checkpoint of an interrupted run (`--resume`), refused in
one line when the config changed in a way the checkpoint cannot follow."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from jetfed.coordinator.config import ExperimentConfig, resume_conflicts
from jetfed.coordinator.registry import DeviceRegistry
from jetfed.coordinator.rundir import RunDir
from jetfed.edge.data import load_task_split
from jetfed.edge.errors import UserError
from jetfed.edge.logs import log_event
from jetfed.edge.methods.base import FederatedMethod, Tensors

logger = logging.getLogger(__name__)


def load_validation(config: ExperimentConfig, causal: Any) -> Any:
    """The coordinator's evaluation rows, at most `data.max_eval_samples`."""
    data = config.data
    dataset = load_task_split(data.path, data.validation_split, causal)
    if data.max_eval_samples is not None and len(dataset) > data.max_eval_samples:
        dataset = dataset.subset(range(data.max_eval_samples))
    return dataset


def num_labels(config: ExperimentConfig, validation: Any) -> int:
    """labels.json's count where the data has one, else the classes the validation rows hold."""
    labels_file = Path(config.data.path) / "labels.json"
    if labels_file.exists():
        return len(json.loads(labels_file.read_text()))
    return max(2, validation.num_classes)


@dataclass
class RunStart:
    """The first round to run and the state it starts from."""

    global_state: Tensors
    init: Optional[Tensors] = None
    start_round: int = 0
    wall_clock_offset_s: float = 0.0
    strategy_state: Tensors = field(default_factory=dict)


def start_run(
    config: ExperimentConfig,
    method: FederatedMethod,
    run_dir: RunDir,
    registry: DeviceRegistry,
    resume: bool,
) -> RunStart:
    """A fresh run (its folder created) or, with `resume` and a checkpoint, the checkpoint's
    state; the registry takes back the client indices the checkpoint recorded."""
    if resume and (run_dir.checkpoint_dir / "state.json").exists():
        conflicts = resume_conflicts(run_dir.load_config(), config)
        if conflicts:
            raise UserError(
                f"--resume: {config.name}'s config changed since the checkpoint "
                f"({'; '.join(conflicts[:3])}); only rounds.count and broker may change"
            )
        state, global_state, init, strategy_state = run_dir.load_checkpoint()
        registry.client_indices.update(state.client_indices)
        start = RunStart(
            global_state=global_state,
            init=init,
            start_round=state.completed_round + 1,
            wall_clock_offset_s=state.wall_clock_s,
            strategy_state=strategy_state,
        )
        log_event(logger, logging.WARNING, "run.resumed", next_round=start.start_round)
        return start
    initial = method.initial_state(seed=config.seed)
    run_dir.create(config.model_dump(mode="json", exclude={"broker"}))
    return RunStart(global_state=initial.global_state, init=initial.init)
