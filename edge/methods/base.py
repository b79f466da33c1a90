"""What a federated method is, and the registry that finds one by name.

A method is one file in `edge/methods/` defining a `FederatedMethod` subclass decorated with
`@register_method`. `get_method(name)` imports `jetfed.edge.methods.<name>` on demand, so adding a
method never touches the agent loop or the coordinator's round loop. The coordinator pairs it with
an aggregation strategy (`coordinator/strategies/`), FedAvg unless the method names another.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Dict,
    List,
    Mapping,
    Optional,
    Tuple,
    Type,
    TypeVar,
)

from pydantic import BaseModel, ConfigDict, ValidationError

from jetfed.edge.errors import UserError, validation_line
from jetfed.edge.wire import ModelRef, TrainingConfig

if TYPE_CHECKING:
    import torch

    from jetfed.edge.data import TextDataset
    from jetfed.edge.exchange import Exchange
    from jetfed.edge.telemetry.phases import PhaseCounters, Profiler
    from jetfed.edge.train import TrainStats

logger = logging.getLogger(__name__)

Tensors = Dict[str, "torch.Tensor"]


class MethodConfig(BaseModel):
    """Hyper-parameters of a method; subclasses add fields. Unknown keys are a user error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class InitialState:
    """Round-0 state built once by the coordinator.

    `init` is shipped once and fixed for the run (FeDeRA's SVD factors); `global_state` is what
    rounds average and broadcast.
    """

    global_state: Tensors
    init: Optional[Tensors] = None


@dataclass
class MemoryFootprint:
    """What one device's local round holds, counted in parameters; `jetfed.edge.memory_budget` turns
    it into bytes for `jetfed doctor`."""

    held_params: int
    """Weights resident on the device (fp32), frozen or not."""
    trainable_params: int
    """Parameters with gradients and AdamW's two moments."""
    layers: int
    """Encoder layers whose activations the backward pass keeps."""
    graphs: int = 1
    """Forward graphs kept per step (kd also runs a proxy batch)."""
    logits_on_device: bool = True
    """A causal LM's [batch, response tokens, vocab] logits are computed here (not for split)."""


def _phase_counters() -> PhaseCounters:
    from jetfed.edge.telemetry.phases import PhaseCounters

    return PhaseCounters()


@dataclass
class LocalRound:
    """Everything one device's round needs; built by the agent, consumed by the method."""

    model: Any
    tokenizer: Any
    dataset: TextDataset
    training: TrainingConfig
    model_ref: ModelRef
    round_index: int
    seed: int
    device: str
    global_state: Tensors
    profiler: Profiler
    counters: PhaseCounters = field(default_factory=_phase_counters)
    """The "train" phase's counters (opened by `run_local_round`): a method adds its extras
    (bytes exchanged, its own counters) here; it never opens that phase itself."""
    extra_blobs: Dict[str, bytes] = field(default_factory=dict)
    exchange: Optional[Exchange] = None
    data_path: Optional[str] = None
    """The device's --data source, for methods that read a public split by index (KD's proxy)."""


@dataclass
class LocalResult:
    """What a device uploads: `tensors` (a delta against the global state unless the method
    says otherwise), the FedAvg weight `num_samples`, and train statistics."""

    tensors: Tensors
    num_samples: int
    train_loss: float
    local_steps: int
    metrics: Dict[str, float] = field(default_factory=dict)
    wire_dtype: Optional[str] = None
    """Overrides the task's update_dtype (KD logits always travel fp16)."""


class FederatedMethod(ABC):
    """One federated fine-tuning method: model construction, state exchange, local round."""

    name: ClassVar[str]
    config_model: ClassVar[Type[MethodConfig]] = MethodConfig
    strategy: ClassVar[str] = "fedavg"
    default_learning_rate: ClassVar[float] = 5e-4
    """The local learning rate the demo and the benches use unless told otherwise."""

    def __init__(self, config: Mapping[str, Any], model_ref: ModelRef) -> None:
        try:
            self.config = self.config_model(**dict(config))
        except ValidationError as exc:
            line = validation_line(exc, root="method", default="method")
            raise UserError(f"{line} (method {self.name})") from None
        self.model_ref = model_ref

    @abstractmethod
    def initial_state(self, seed: int) -> InitialState:
        """Coordinator, once per run: the round-0 global state (and fixed init, if any)."""

    @abstractmethod
    def build(self, init: Optional[Tensors], seed: int) -> Any:
        """A trainable model; devices and the coordinator build it the same way."""

    def run_facts(self) -> Dict[str, float]:
        """Numbers every round's metrics record about the method's set-up (LoRA: r, α and the
        scaling α/r), so runs of a sweep say which convention they trained with."""
        return {}

    def get_state(self, model: Any) -> Tensors:
        """The federated tensors: every trainable parameter, by name."""
        return {
            name: param.detach().clone()
            for name, param in model.named_parameters()
            if param.requires_grad
        }

    def set_state(self, model: Any, state: Mapping[str, torch.Tensor]) -> None:
        import torch

        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))

    def state_spec(self, model: Any) -> Dict[str, Tuple[int, ...]]:
        """Names and shapes of `get_state(model)`, without copying a tensor (a full model's
        state is the model's size). A method that overrides `get_state` overrides this too."""
        return {
            name: tuple(param.shape)
            for name, param in model.named_parameters()
            if param.requires_grad
        }

    def state_in_model(self, model: Any, state: Mapping[str, torch.Tensor]) -> Tensors:
        """`state` made `model`'s parameters (adopted as their storage, not copied) and
        returned as those parameters, detached: whoever holds it and the model share one copy
        of the weights (a full model's state is the model), and the model's own storage is
        freed. `state` itself where a tensor is no parameter of the model or differs from its
        parameter in shape, device or dtype (a model evaluated on CUDA)."""
        params = dict(model.named_parameters())
        if any(
            name not in params
            or params[name].shape != value.shape
            or params[name].device != value.device
            or params[name].dtype != value.dtype
            for name, value in state.items()
        ):
            return dict(state)
        for name, value in state.items():
            params[name].data = value.detach()
        return {name: params[name].detach() for name in state}

    def train(self, job: LocalRound, loss_fn: Optional[Any] = None) -> TrainStats:
        """The shared local loop on the job's model, data and budget (`loss_fn` replaces CE)."""
        from jetfed.edge.models import autocast_dtype
        from jetfed.edge.train import train_local

        return train_local(
            job.model,
            job.tokenizer,
            job.dataset,
            job.training,
            max_length=job.model_ref.max_length,
            device=job.device,
            seed=job.seed,
            loss_fn=loss_fn,
            on_step=job.profiler.step,
            autocast=autocast_dtype(job.model_ref, job.device),
        )

    def local_round(self, job: LocalRound) -> LocalResult:
        """Default: train locally, upload the change of the federated tensors. Runs inside the
        "train" phase, which `run_local_round` opens."""
        self.set_state(job.model, job.global_state)
        return self.delta_result(job, self.train(job))

    def delta_result(self, job: LocalRound, stats: TrainStats) -> LocalResult:
        """The upload after local training: the change of the federated tensors."""
        trained = self.get_state(job.model)
        delta = {name: trained[name] - job.global_state[name].to(trained[name]) for name in trained}
        return LocalResult(
            tensors=delta,
            num_samples=len(job.dataset),
            train_loss=stats.mean_loss,
            local_steps=stats.steps,
            metrics={"samples_seen": float(stats.samples_seen)},
        )

    def memory_footprint(self, model: Any) -> MemoryFootprint:
        """What a device holds to train `model` (the classifier on PyTorch's meta device:
        shapes, no storage). Default: every weight held and trained, the upper bound."""
        from jetfed.edge.memory_budget import num_layers

        params = sum(param.numel() for param in model.parameters())
        return MemoryFootprint(
            held_params=params, trainable_params=params, layers=num_layers(model)
        )

    def export(self, model: Any, out_dir: str) -> None:
        """Save the global model in a format users load directly (PEFT for adapters).

        A short model card is written first: PEFT then updates it instead of compiling its
        Jinja template, which was 80 % of the coordinator's per-round export (≈ 0.2 s)."""
        import os

        os.makedirs(out_dir, exist_ok=True)
        readme = os.path.join(out_dir, "README.md")
        if not os.path.exists(readme):
            with open(readme, "w", encoding="utf-8") as handle:
                handle.write(f"---\ntags:\n- jetfed\n---\n# jetfed global model ({self.name})\n")
        from jetfed.edge.models import quiet_transformers

        with quiet_transformers():
            model.save_pretrained(out_dir)


def run_local_round(method: FederatedMethod, job: LocalRound) -> LocalResult:
    """The method's local round inside the "train" phase, opened here for every method (one
    that forgot could not lose its profile record); the method only adds extras."""
    with job.profiler.phase("train", job.round_index) as counters:
        job.counters = counters
        result = method.local_round(job)
        counters.extra["steps"] = float(result.local_steps)
    return result


_REGISTRY: Dict[str, Type[FederatedMethod]] = {}
R = TypeVar("R", bound=type)


def register_unique(registry: Dict[str, R], cls: R, kind: str) -> R:
    """Put `cls` in `registry` under `cls.name`; a second class of that name is an error (it
    would silently replace the first). Methods and strategies register through this."""
    name = cls.name  # type: ignore[attr-defined]
    existing = registry.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"{kind} {name!r} is registered twice: {existing.__module__}."
            f"{existing.__qualname__} and {cls.__module__}.{cls.__qualname__}"
        )
    registry[name] = cls
    return cls


def register_method(cls: Type[FederatedMethod]) -> Type[FederatedMethod]:
    """Class decorator: make `cls` findable as `cls.name` (`get_method`)."""
    return register_unique(_REGISTRY, cls, "method")


def get_method(name: str) -> Type[FederatedMethod]:
    """The method class registered as `name`, importing `jetfed.edge.methods.<name>` if needed."""
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"jetfed.edge.methods.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"jetfed.edge.methods.{name}":
                raise
    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r}; known: {', '.join(available_methods())}")
    return _REGISTRY[name]


def available_methods() -> List[str]:
    import pkgutil

    import jetfed.edge.methods

    return sorted(
        info.name
        for info in pkgutil.iter_modules(jetfed.edge.methods.__path__)
        if info.name != "base"
    )
