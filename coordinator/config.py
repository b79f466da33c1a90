"""The experiment config (YAML), validated with one clear line per mistake naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jetfed.coordinator.assignment import AssignmentSection
from jetfed.edge.errors import UserError, validation_line
from jetfed.edge.instruction_eval import GenerationBudget
from jetfed.edge.mqtt import BrokerSpec
from jetfed.edge.topics import ID_PATTERN
from jetfed.edge.wire import DEFAULT_CHUNK_SIZE_BYTES, ModelRef, PartitionSpec, TrainingConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    name_or_path: str = "minilm"
    revision: Optional[str] = None
    max_length: int = Field(default=64, ge=8, le=8192)
    num_labels: Optional[int] = Field(default=None, ge=1)
    num_hidden_layers: Optional[int] = Field(default=None, ge=1)
    kind: Optional[str] = Field(default=None, pattern="^(causal_lm|classifier)$")
    """None: read from the model's config (`*ForCausalLM` → causal_lm)."""
    dtype: str = Field(default="auto", pattern="^(auto|fp32|bf16|fp16)$")
    chat_template: Optional[str] = None
    """Causal LMs: a built-in chat template by name (chatml, plain) instead of the model's."""
    gradient_checkpointing: bool = False


class MethodSection(BaseModel):
    """`name` picks the method; every other key is that method's hyper-parameter."""

    model_config = ConfigDict(extra="allow")

    name: str = "lora"

    def settings(self) -> Dict[str, Any]:
        return dict(self.model_extra or {})


class DataSection(Section):
    path: str
    train_split: str = "train"
    validation_split: str = "validation"
    partition: PartitionSpec = PartitionSpec(kind="iid", num_clients=2)
    client_indices: Dict[str, int] = Field(default_factory=dict)
    max_eval_samples: Optional[int] = Field(default=None, ge=1)
    client_paths: Dict[str, str] = Field(default_factory=dict)
    """A local fleet's per-device data folders (device id → path; others use `path`): each
    client may hold a different task. Devices elsewhere pass their own --data."""

    def path_for(self, device_id: str) -> str:
        """The data folder of a local fleet's device `device_id`."""
        return self.client_paths.get(device_id, self.path)


class RoundsSection(Section):
    count: int = Field(default=3, ge=1)
    min_clients: int = Field(default=2, ge=1)
    clients_per_round: Optional[int] = Field(default=None, ge=1)
    deadline_s: float = Field(default=900.0, gt=0)
    wait_for_devices_s: float = Field(default=600.0, gt=0)
    offline_grace_s: float = Field(default=60.0, ge=0)
    """Once min_clients updates are in, selected devices offline this long no longer hold the
    round open until its deadline (a device that drops and returns within it still counts)."""


class AggregationSection(BaseModel):
    """`strategy` overrides the method's own; other keys are the strategy's settings."""

    model_config = ConfigDict(extra="allow")

    strategy: Optional[str] = None
    max_update_norm: Optional[float] = Field(default=None, gt=0)
    """Any strategy: refuse (nack `update_norm_too_large`) an update whose L2 norm is larger."""

    def settings(self) -> Dict[str, Any]:
        return dict(self.model_extra or {})


class TransferSection(Section):
    chunk_size_bytes: int = Field(default=DEFAULT_CHUNK_SIZE_BYTES, ge=1024)
    update_dtype: str = Field(default="fp32", pattern="^(fp32|fp16|bf16|int8)$")
    max_update_bytes: int = Field(default=4 << 30, gt=0)
    retry_after_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=300.0, gt=0)


class EvaluationSection(GenerationBudget):
    """The coordinator's evaluation of a causal LM: bounded generation, and the metric a run
    is judged by (time-/energy-to-target)."""

    model_config = ConfigDict(extra="forbid")

    metric: Optional[str] = Field(
        default=None, pattern="^(accuracy|exact_match|rouge_l|perplexity|eval_loss)$"
    )
    """None: accuracy for classifiers, the data's generation metric for causal LMs."""


class ExperimentConfig(Section):
    name: str = Field(pattern=ID_PATTERN)
    broker: Optional[BrokerSpec] = None
    model: ModelSection = ModelSection()
    method: MethodSection = MethodSection()
    training: TrainingConfig = TrainingConfig()
    data: DataSection
    rounds: RoundsSection = RoundsSection()
    aggregation: AggregationSection = AggregationSection()
    transfer: TransferSection = TransferSection()
    evaluation: EvaluationSection = EvaluationSection()
    assignment: Optional[AssignmentSection] = None
    """Per-device LoRA rank, batch size and local steps (coordinator/assignment.py)."""
    output_dir: str = "runs"
    seed: int = Field(default=0, ge=0, le=(1 << 32) - 1)
    """Seeds the initial state, the selection and (unless `training.seed` is set) every device's
    local training: each device derives its own from (seed, round, client index)."""
    eval_device: Optional[str] = None

    @model_validator(mode="after")
    def _training_seed(self) -> ExperimentConfig:
        if "seed" not in self.training.model_fields_set:
            self.training = self.training.model_copy(update={"seed": self.seed})
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _blame(where: str, origin: str, overridden: Mapping[str, str]) -> str:
    """The `--set` option that wrote the failing field, else the config file."""
    for key, override in overridden.items():
        if where == key or where.startswith(key + "."):
            return f"--set {override}"
    return origin


def parse_config(
    raw: Any, origin: str = "config", overridden: Optional[Mapping[str, str]] = None
) -> ExperimentConfig:
    """Validate; a mistake is one line blaming `origin`, or the `--set KEY=VALUE` (in
    `overridden`, by key) that wrote the failing field."""
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: expected a mapping of sections (name, model, method, data...)")
    try:
        config = ExperimentConfig.model_validate(raw, strict=False)
    except ValidationError as exc:
        line = validation_line(exc, default="config")
        blamed = _blame(line.split(":", 1)[0], origin, overridden or {})
        raise UserError(f"{blamed}: {line}") from None
    if config.rounds.clients_per_round is not None and (
        config.rounds.clients_per_round < config.rounds.min_clients
    ):
        raise UserError(f"{origin}: rounds.clients_per_round must be >= rounds.min_clients")
    from jetfed.edge.methods.base import get_method

    method_cls = get_method(config.method.name)
    method_cls(config.method.settings(), ModelRef(name_or_path="x", num_labels=2))
    return config


CLASSIFIER_ONLY_MODEL_FIELDS = ("num_labels",)
CAUSAL_LM_METHODS = ("lora", "federa", "full", "split", "kd", "fedcollm")


def model_ref_of(config: ExperimentConfig, num_labels: int) -> ModelRef:
    """The wire form of the `model:` section (what tasks carry to devices)."""
    model = config.model
    return ModelRef(
        name_or_path=model.name_or_path,
        revision=model.revision,
        num_labels=num_labels,
        max_length=model.max_length,
        num_hidden_layers=model.num_hidden_layers,
        kind=model.kind,
        dtype=model.dtype,
        chat_template=model.chat_template,
        gradient_checkpointing=model.gradient_checkpointing,
    )


def causal_lm_config(config: ExperimentConfig) -> bool:
    """Whether the run's model is a causal LM (its config, or `model.kind`); a classifier-only
    option on a causal LM is a user error."""
    from jetfed.edge.models import CAUSAL_LM, model_kind

    model = config.model
    causal = model_kind(model_ref_of(config, num_labels=1)) == CAUSAL_LM
    if causal and config.method.name not in CAUSAL_LM_METHODS:
        raise UserError(
            f"method {config.method.name} does not train causal LMs yet; "
            f"{', '.join(CAUSAL_LM_METHODS)} do"
        )
    for name in CLASSIFIER_ONLY_MODEL_FIELDS:
        if causal and getattr(model, name) is not None:
            raise UserError(
                f"model.{name} is a classifier option; {model.name_or_path} is a causal LM "
                "(remove it, or set model.kind: classifier)"
            )
    return causal


def load_config(path: str, overrides: Optional[List[str]] = None) -> ExperimentConfig:
    """Read YAML, apply `section.key=value` overrides (values parsed as YAML), validate."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"config file {path!r} does not exist")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    overridden: Dict[str, str] = {}
    for override in overrides or []:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise UserError(f"--set {override!r} must look like section.key=value")
        target = raw
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise UserError(f"--set {override}: {part} is not a section")
        target[parts[-1]] = yaml.safe_load(value)
        overridden[key] = override
    return parse_config(raw, path, overridden)


RESUME_MAY_CHANGE: Dict[str, Any] = {"broker": True, "output_dir": True, "rounds": {"count"}}


def config_digest(config: ExperimentConfig) -> str:
    """Identifies what a resumed run must match (the broker and output dir may change)."""
    import hashlib

    fields = config.model_dump(mode="json", exclude=RESUME_MAY_CHANGE)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _dotted(value: Any, prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; an empty dict stays a value."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    rows: Dict[str, Any] = {}
    for key, item in value.items():
        rows.update(_dotted(item, f"{prefix}.{key}" if prefix else str(key)))
    return rows


def resume_conflicts(saved: ExperimentConfig, current: ExperimentConfig) -> List[str]:
    """`key: old → new` for every setting that differs between a run's saved config and the one
    it is resumed with. Both are parsed by this version of jetfed, so a setting that a newer
    version added (at its default) is no conflict."""

    old, new = (
        _dotted(config.model_dump(mode="json", exclude=RESUME_MAY_CHANGE))
        for config in (saved, current)
    )
    return [
        f"{key}: {old.get(key)!r} → {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]
