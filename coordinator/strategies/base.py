"""What an aggregation strategy is, and the registry that finds one by name.

A strategy is the coordinator-side half of a method: a `Strategy` subclass decorated with
`@register_strategy` in a module of this package (one file per strategy or family, like
`edge/methods/`). It is shaped like Flower's Strategy: `configure_round` adds what the round's
task needs beyond the global state, `aggregate` turns the accepted updates into the next global
state, `evaluate` and `export` look at the result. A method names its strategy
(`FederatedMethod.strategy`, FedAvg by default); the experiment config may override it.
Methods that talk to the coordinator during a round (split learning) handle those messages in
`on_exchange` and answer with `ctx.send`.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from jetfed.edge.data import TextDataset
from jetfed.edge.errors import ProtocolError, UserError, validation_line
from jetfed.edge.instruction_eval import GenerationBudget, evaluate_instructions
from jetfed.edge.instructions import InstructionSet
from jetfed.edge.methods.base import FederatedMethod, Tensors, register_unique
from jetfed.edge.tensorfile import TensorFile, refuse_index_tensors
from jetfed.edge.wire import ModelRef, Update


class StrategySettings(BaseModel):
    """A strategy's `aggregation:` keys (besides `strategy` and `max_update_norm`, which every
    strategy takes); subclasses add fields. Unknown keys are a user error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class AcceptedUpdate:
    """A verified update: its announcement and its tensors. On the coordinator `tensors` is the
    upload's validated safetensors file, read lazily (`jetfed.edge.tensorfile.TensorFile`), which
    stays on disk until the round ends; tests and benches may pass an in-memory mapping."""

    update: Update
    tensors: Mapping[str, torch.Tensor]


@dataclass
class ServerContext:
    """What a strategy may use on the coordinator."""

    method: FederatedMethod
    model_ref: ModelRef
    eval_model: Any
    tokenizer: Any
    validation: Union[TextDataset, InstructionSet]
    init: Optional[Tensors]
    torch_device: str
    settings: Dict[str, Any]
    send: Callable[[str, str, bytes], None]
    """send(device_id, subtopic, payload) → `devices/{id}/exchange/down/{subtopic}`."""
    data_path: str = ""
    """The experiment's data.path: public/auxiliary splits of distillation strategies."""
    generation: GenerationBudget = field(default_factory=GenerationBudget)
    """Causal LMs: how much generation an evaluation may spend."""

    @classmethod
    def aggregation_only(
        cls,
        settings: Optional[Dict[str, Any]] = None,
        method: Optional[FederatedMethod] = None,
        init: Optional[Tensors] = None,
    ) -> ServerContext:
        """For a strategy's aggregation alone (benches, tests): no model, data or network;
        `method` (unbuilt) gives LoRA strategies their alpha/r, `init` a frozen A."""
        return cls(
            method=method,  # type: ignore[arg-type]
            model_ref=None,  # type: ignore[arg-type]
            eval_model=None,
            tokenizer=None,
            validation=None,  # type: ignore[arg-type]
            init=init,
            torch_device="cpu",
            settings=settings or {},
            send=lambda device_id, subtopic, payload: None,
        )


class Strategy(ABC):
    """The coordinator's half of a method: everything but the round loop and the wire."""

    name: ClassVar[str]
    settings_model: ClassVar[Type[StrategySettings]] = StrategySettings
    state_in_eval_model: ClassVar[bool] = False
    """The coordinator keeps the global state in the evaluation model's parameters (one copy of
    a full model, not two; `FederatedMethod.state_in_model`) and aggregates with
    `aggregate_into`. Only for strategies that write those parameters through nothing but
    `evaluate`/`export`'s set_state of the global state, and that keep no global state across
    rounds (the next round overwrites it)."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.layer_errors: Dict[str, float] = {}
        """Set by `aggregate` for LoRA states: per adapted layer ‖Σ pₖsₖBₖAₖ − s·B̄Ā‖/‖Σ pₖsₖBₖAₖ‖
        (`lowrank.py`); the round records its summary."""
        try:
            self.settings = self.settings_model(**ctx.settings)
        except ValidationError as exc:
            line = validation_line(exc, root="aggregation", default="aggregation")
            raise UserError(f"{line} (strategy {self.name})") from None

    def update_spec(self) -> Dict[str, Tuple[int, ...]]:
        """Names and shapes an update must have; anything else is refused with a nack."""
        return self.ctx.method.state_spec(self.ctx.eval_model)

    def device_state(self, global_state: Tensors, rank: int) -> Tensors:
        """The global state as a device assigned LoRA rank `rank` starts from; only strategies
        that federate mixed ranks (flexlora) have one."""
        raise UserError(
            f"aggregation.strategy {self.name} trains one LoRA rank on every device; an "
            "assignment of other ranks needs aggregation.strategy: flexlora"
        )

    def check_update(self, tensors: TensorFile) -> None:
        """Refuse (ProtocolError with a code: a nack) an upload whose names, shapes and finite
        values passed but whose content is wrong for this strategy; by default, integer
        tensors (kd's top-k indices are the one kind of upload that has them)."""
        refuse_index_tensors(tensors)

    def configure_round(self, round_index: int, global_state: Tensors) -> Dict[str, bytes]:
        """Extra blobs (name → bytes) that devices fetch with the task; none by default."""
        return {}

    @abstractmethod
    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        """The next global state from this round's accepted updates (sorted by device id).

        Each update's tensors are a file on disk: read them a tensor or a few rows at a time
        (`jetfed.edge.tensorfile.read_rows`) to keep a full-model round at 2 × model size."""

    def aggregate_into(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> None:
        """`aggregate`, the result written into `global_state`'s own tensors (strategies with
        `state_in_eval_model`). This default holds the result beside them meanwhile; FedAvg
        writes its row blocks there directly. If it fails midway the state is half-written:
        the coordinator stops, and its last checkpoint holds the previous state."""
        for name, value in self.aggregate(round_index, global_state, updates).items():
            global_state[name].copy_(value)

    def evaluate(self, global_state: Tensors) -> Dict[str, float]:
        """`accuracy` and `eval_loss` of the global model on the validation split (+ extras);
        for a causal LM `eval_loss`, `perplexity` and `exact_match` or `rouge_l`."""
        self.ctx.method.set_state(self.ctx.eval_model, global_state)
        return self.evaluate_model(self.ctx.eval_model)

    def evaluate_model(self, model: Any) -> Dict[str, float]:
        """`evaluate`'s metrics of any model of the run's kind and tokenizer (fedcollm's LLM)."""
        from jetfed.edge.train import evaluate

        ctx = self.ctx
        if isinstance(ctx.validation, InstructionSet):
            return evaluate_instructions(
                model,
                ctx.tokenizer,
                ctx.validation,
                max_length=ctx.model_ref.max_length,
                device=ctx.torch_device,
                budget=ctx.generation,
            )
        stats = evaluate(
            model,
            ctx.tokenizer,
            ctx.validation,
            max_length=ctx.model_ref.max_length,
            device=ctx.torch_device,
        )
        return {"accuracy": stats.accuracy, "eval_loss": stats.loss}

    def export(self, global_state: Tensors, out_dir: str) -> None:
        """Save the global model where users load it (PEFT format for adapters)."""
        self.ctx.method.set_state(self.ctx.eval_model, global_state)
        self.ctx.method.export(self.ctx.eval_model, out_dir)

    def on_exchange(self, device_id: str, subtopic: str, payload: bytes) -> None:
        """A device's in-round message on `devices/{id}/exchange/up/{subtopic}`."""
        raise ProtocolError(f"method {self.ctx.method.name} exchanges no in-round messages")

    def state(self) -> Tensors:
        """Server-side tensors beyond the global state that `--resume` must restore (split's
        server half, kd's consensus, fedcollm's LLM adapter); none by default."""
        return {}

    def load_state(self, tensors: Tensors) -> None:
        """Restore what `state()` returned, before the first resumed round."""
        if tensors:
            raise UserError(f"checkpoint holds strategy state that {self.name} does not keep")


def check_saved_state(expected: Mapping[str, torch.Tensor], saved: Tensors, what: str) -> None:
    """Refuse a checkpoint whose tensors do not match (names and shapes) what the run keeps."""
    if set(saved) != set(expected) or any(saved[n].shape != t.shape for n, t in expected.items()):
        raise UserError(f"checkpoint's {what} does not match this experiment's model")


_REGISTRY: Dict[str, Type[Strategy]] = {}


def register_strategy(cls: Type[Strategy]) -> Type[Strategy]:
    """Class decorator: make `cls` findable as `cls.name` (`make_strategy`)."""
    return register_unique(_REGISTRY, cls, "strategy")


def _import_all() -> None:
    """Import every module of this package: each registers the strategies it defines."""
    import jetfed.coordinator.strategies

    for info in pkgutil.iter_modules(jetfed.coordinator.strategies.__path__):
        importlib.import_module(f"jetfed.coordinator.strategies.{info.name}")


def available_strategies() -> List[str]:
    _import_all()
    return sorted(_REGISTRY)


def make_strategy(name: str, ctx: ServerContext) -> Strategy:
    """The strategy registered as `name`, built on `ctx` (the package is scanned on demand)."""
    if name not in _REGISTRY:
        _import_all()
    factory = _REGISTRY.get(name)
    if factory is None:
        known = ", ".join(sorted(_REGISTRY))
        raise UserError(f"unknown aggregation strategy {name!r}; known: {known}")
    return factory(ctx)
