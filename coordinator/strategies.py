"""Aggregation strategies by name: the coordinator-side half of each method.

Shaped like Flower's Strategy: `configure_round` adds what the round's task needs beyond the
global state, `aggregate` turns accepted updates into the next global state, `evaluate` and
`export` look at the result. A method names its strategy (`FederatedMethod.strategy`, FedAvg by
default); the experiment config may override it. Methods that talk to the coordinator during a
round (split learning) handle those messages in `on_exchange` and answer with `ctx.send`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch

from edge.data import TextDataset
from edge.errors import ProtocolError, UserError
from edge.instruction_eval import GenerationBudget, evaluate_instructions
from edge.instructions import InstructionSet
from edge.methods.base import FederatedMethod, Tensors
from edge.tensorfile import read_rows, row_ranges
from edge.wire import ModelRef, Update, tensor_spec


@dataclass
class AcceptedUpdate:
    """A verified update: its announcement and its decoded tensors (fp32; empty for streaming
    strategies, which folded them in with `accumulate` already)."""

    update: Update
    tensors: Tensors


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
    def aggregation_only(cls, settings: Optional[Dict[str, Any]] = None) -> ServerContext:
        """For a strategy's aggregation alone (benches, tests): no model, data or network."""
        return cls(
            method=None,  # type: ignore[arg-type]
            model_ref=None,  # type: ignore[arg-type]
            eval_model=None,
            tokenizer=None,
            validation=None,  # type: ignore[arg-type]
            init=None,
            torch_device="cpu",
            settings=settings or {},
            send=lambda device_id, subtopic, payload: None,
        )


class Strategy:
    """FedAvg over deltas: global + Σ nₖ·Δₖ / Σ nₖ (for LoRA: A, B and the head separately)."""

    name = "fedavg"
    streaming: ClassVar[bool] = False
    """True: the server hands each update to `accumulate` as it is accepted and calls `finalize`
    instead of `aggregate`, so a round never holds every device's tensors at once (full models).
    False: updates are collected and `aggregate` sees them all (median, trimmed mean)."""

    takes_settings: ClassVar[bool] = False
    """True if the strategy reads `aggregation:` keys (`ctx.settings`); others refuse any, so
    a misspelt or misplaced key is a one-line error instead of being silently ignored."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        if ctx.settings and not self.takes_settings:
            raise UserError(
                f"aggregation.{sorted(ctx.settings)[0]} is not a setting of {self.name} "
                "(it takes none; max_update_norm applies to every strategy)"
            )

    def update_spec(self) -> Dict[str, Tuple[int, ...]]:
        """Names and shapes an update must have; anything else is refused with a nack."""
        return tensor_spec(self.ctx.method.get_state(self.ctx.eval_model))

    def validate_update(self, candidate: AcceptedUpdate, global_state: Tensors) -> None:
        """Last check before an update is accepted; raise ProtocolError to refuse it (nack)."""

    def configure_round(self, round_index: int, global_state: Tensors) -> Dict[str, bytes]:
        """Extra blobs (name → bytes) that devices fetch with the task; none for FedAvg."""
        return {}

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        return apply_mean_delta(global_state, updates)

    def accumulate(
        self, round_index: int, update: Update, tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Streaming strategies: fold in one verified update (`tensors` may be read lazily from
        disk); raise ProtocolError before changing anything to refuse it (nack)."""
        raise NotImplementedError(f"strategy {self.name} does not stream")

    def finalize(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        """Streaming strategies: the next global state from what `accumulate` folded in."""
        raise NotImplementedError(f"strategy {self.name} does not stream")

    def evaluate(self, global_state: Tensors) -> Dict[str, float]:
        """`accuracy` and `eval_loss` of the global model on the validation split (+ extras);
        for a causal LM `eval_loss`, `perplexity` and `exact_match` or `rouge_l`."""
        from edge.train import evaluate

        ctx = self.ctx
        ctx.method.set_state(ctx.eval_model, global_state)
        if isinstance(ctx.validation, InstructionSet):
            return evaluate_instructions(
                ctx.eval_model,
                ctx.tokenizer,
                ctx.validation,
                max_length=ctx.model_ref.max_length,
                device=ctx.torch_device,
                budget=ctx.generation,
            )
        stats = evaluate(
            ctx.eval_model,
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
        server half, kd's consensus, fedcollm's LLM adapter); FedAvg keeps none."""
        return {}

    def load_state(self, tensors: Tensors) -> None:
        """Restore what `state()` returned, before the first resumed round."""
        if tensors:
            raise UserError(f"checkpoint holds strategy state that {self.name} does not keep")


def check_saved_state(expected: Mapping[str, torch.Tensor], saved: Tensors, what: str) -> None:
    """Refuse a checkpoint whose tensors do not match (names and shapes) what the run keeps."""
    if set(saved) != set(expected) or any(saved[n].shape != t.shape for n, t in expected.items()):
        raise UserError(f"checkpoint's {what} does not match this experiment's model")


def weighted_mean(updates: List[AcceptedUpdate]) -> Tensors:
    """Σ nₖ·tₖ / Σ nₖ per tensor name, accumulated in float64."""
    total = float(sum(item.update.num_samples for item in updates))
    mean: Tensors = {}
    for name in updates[0].tensors:
        acc = torch.zeros_like(updates[0].tensors[name], dtype=torch.float64)
        for item in updates:
            acc += item.tensors[name].double() * (item.update.num_samples / total)
        mean[name] = acc.to(torch.float32)
    return mean


def apply_mean_delta(global_state: Tensors, updates: List[AcceptedUpdate]) -> Tensors:
    delta = weighted_mean(updates)
    return {
        name: (value.double() + delta[name].double()).float()
        for name, value in global_state.items()
    }


class FedAvg(Strategy):
    """FedAvg that never holds more than the global state and the result: global + Σ nₖ·Δₖ / Σ nₖ.

    `accumulate` keeps a reference to each accepted update, which stays in its spool file on
    disk until the round ends; `finalize` then walks the tensors a few MB of rows at a time,
    summing nₖ·Δₖ over the devices in fp64 in device-id order. Memory: 2 × model size for any
    number of devices. Bit-identical whatever order updates arrived in (n·Δ is exact in fp64
    and the order is fixed), so a rerun or a resumed run ends where an uninterrupted one does."""

    streaming = True

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        self._round_index = -1
        self._received: Dict[str, Tuple[int, Mapping[str, torch.Tensor]]] = {}

    def accumulate(
        self, round_index: int, update: Update, tensors: Mapping[str, torch.Tensor]
    ) -> None:
        if round_index != self._round_index:  # a skipped round leaves nothing behind
            self._round_index, self._received = round_index, {}
        self._received[update.device_id] = (update.num_samples, tensors)

    def finalize(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        if round_index != self._round_index or not self._received:
            raise RuntimeError(f"round {round_index} accumulated no update")
        received = [self._received[device_id] for device_id in sorted(self._received)]
        self._round_index, self._received = -1, {}
        total = float(sum(n for n, _ in received))
        # results allocated before any block is read, so short-lived blocks do not fragment
        # the heap between long-lived results (that kept ~70 MB of holes resident)
        new_state = {
            name: torch.empty_like(v, dtype=torch.float32) for name, v in global_state.items()
        }
        for name, value in global_state.items():
            result = new_state[name]
            for start, end in row_ranges(tuple(value.shape)):
                rows = slice(start, end) if value.dim() >= 2 else slice(None)
                acc = torch.zeros_like(value[rows], dtype=torch.float64)
                for num_samples, tensors in received:
                    acc.add_(read_rows(tensors, name, start, end), alpha=float(num_samples))
                result[rows] = acc.div_(total).add_(value[rows])
        return new_state


_STRATEGIES: Dict[str, Type[Strategy]] = {"fedavg": FedAvg}


def register_strategy(cls: Type[Strategy]) -> Type[Strategy]:
    _STRATEGIES[cls.name] = cls
    return cls


STRATEGY_MODULES = ("coordinator.robust", "coordinator.split_server", "coordinator.distill")


def make_strategy(name: str, ctx: ServerContext) -> Strategy:
    """The strategy registered as `name` (modules in STRATEGY_MODULES register on import)."""
    if name not in _STRATEGIES:
        for module in STRATEGY_MODULES:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
    factory = _STRATEGIES.get(name)
    if factory is None:
        known = ", ".join(sorted(_STRATEGIES))
        raise UserError(f"unknown aggregation strategy {name!r}; known: {known}")
    return factory(ctx)
