"""The coordinator's half of split learning: the layers above the cut and the head (a
classifier's pooler/classifier; a decoder's final norm and lm_head, the loss on response tokens;
`jetfed.edge.split_layout`). Each round the whole model it shares modules with is evaluated like
any method's (accuracy, or a causal LM's eval_loss, perplexity and exact_match/rouge_l).

`SplitServer` answers each device's per-batch messages (see `edge/methods/split.py`) as they
arrive on the coordinator's protocol thread; it never waits for a device, so one that drops only
leaves its own lane idle. Every answer is cached per device: a device that re-sends a request
(same session, step and kind) gets the same bytes back and the server part is not stepped twice.

Server copies (`server_copies`): `shared` — one copy, stepped by every device's batches in
arrival order (SFL-V2); `per_device` — each device trains its own copy from the round's start,
and the copies are averaged, weighted by the samples each processed, when the round aggregates
(SFL-V1). Optimizer state is fresh each round, as on the devices.

U-shaped mode: the forward that produced the top activations is recomputed when their gradient
comes back (with the same RNG state, so the same dropout masks) instead of keeping its graph:
another device may step the shared weights in between, and nothing is held for a device that
never answers. The server part's trainable tensors are checkpointed with the global state and
restored by `--resume` (its optimizer state is fresh each round anyway). Limit: in `shared`
mode, batches of a device whose update is later refused have already stepped the shared copy.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from jetfed.coordinator.strategies.base import (
    AcceptedUpdate,
    ServerContext,
    check_saved_state,
    register_strategy,
)
from jetfed.coordinator.strategies.fedavg import FedAvg
from jetfed.edge.errors import ProtocolError, UserError
from jetfed.edge.logs import log_event
from jetfed.edge.methods.base import Tensors
from jetfed.edge.methods.split import (
    SplitHeader,
    SplitMethod,
    SplitSettings,
    check_tensors,
    decode_split_message,
    encode_split_message,
    torch_dtype,
)
from jetfed.edge.split_layout import SplitLayout

logger = logging.getLogger(__name__)

MAX_BATCH = 4096
KIND_ORDER = {"fwd": 0, "bwd": 1}


@dataclass
class _Pending:
    """U-shaped: a forward whose top gradient has not come back yet."""

    step: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    rng_state: torch.Tensor
    cuda_rng_state: Optional[torch.Tensor]


@dataclass
class _Lane:
    """One device's place on the server."""

    session: str = ""
    position: Tuple[int, int] = (-1, -1)
    reply_key: Optional[Tuple[str, int, str]] = None
    reply: Optional[Tuple[str, bytes]] = None
    pending: Optional[_Pending] = None
    samples: int = 0
    state: Optional[Tensors] = None
    optimizer: Optional[torch.optim.Optimizer] = None


@dataclass
class ServerStats:
    """Server-side work of one round (RoundMetrics.extra)."""

    server_s: float = 0.0
    batches: int = 0
    replays: int = 0
    dropped: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def as_metrics(self) -> Dict[str, float]:
        return {
            "split_server_s": self.server_s,
            "split_server_batches": float(self.batches),
            "split_server_replays": float(self.replays),
            "split_server_dropped": float(self.dropped),
            "split_bytes_per_batch": (self.bytes_in + self.bytes_out) / max(1, self.batches),
            "split_bytes_round": float(self.bytes_in + self.bytes_out),
        }


class SplitServer:
    """Runs the upper part of the split model for every device's batches."""

    def __init__(
        self, model: Any, settings: SplitSettings, max_length: int, torch_device: str
    ) -> None:
        self.settings = settings
        self.max_length = max_length
        self.torch_device = torch_device
        self.layout = SplitLayout.of(model, settings.cut_layer, settings.u_shaped)
        self.layout.model.to(torch_device)
        server_ids = self.layout.server_ids()
        self.params = {
            name: param
            for name, param in model.named_parameters()
            if param.requires_grad and id(param) in server_ids
        }
        self.wire_dtype = torch_dtype(settings.activation_dtype)
        self.hidden_size = int(self.layout.model.config.hidden_size)
        self.round_index: Optional[int] = None
        self.lanes: Dict[str, _Lane] = {}
        self.stats = ServerStats()
        self._round_start: Tensors = {}
        self._shared_optimizer: Optional[torch.optim.Optimizer] = None

    # ------------------------------------------------------------------ rounds

    def state(self) -> Tensors:
        """The server-side trainable tensors."""
        return {name: param.detach().clone() for name, param in self.params.items()}

    def begin_round(self, round_index: int) -> None:
        self.round_index = round_index
        self.lanes = {}
        self.stats = ServerStats()
        self._round_start = self.state()
        self._shared_optimizer = self._optimizer()

    def end_round(self, device_ids: List[str]) -> None:
        """`per_device`: average the copies of these devices, weighted by samples processed."""
        if self.settings.server_copies != "per_device":
            return
        lanes = [self.lanes[d] for d in device_ids if d in self.lanes and self.lanes[d].state]
        total = float(sum(lane.samples for lane in lanes))
        if not lanes or total <= 0:
            return
        with torch.no_grad():
            for name, param in self.params.items():
                mean = torch.zeros_like(param, dtype=torch.float64)
                for lane in lanes:
                    assert lane.state is not None
                    mean += lane.state[name].double() * (lane.samples / total)
                param.copy_(mean.to(param.dtype))

    def _optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(self.params.values()), lr=self.settings.server_learning_rate)

    def load(self, tensors: Tensors) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(tensors[name])

    @contextlib.contextmanager
    def _weights_of(self, lane: _Lane) -> Iterator[torch.optim.Optimizer]:
        """The copy this lane trains (and its optimizer); `per_device` swaps it in and out."""
        if self.settings.server_copies == "shared":
            assert self._shared_optimizer is not None
            yield self._shared_optimizer
            return
        if lane.state is None or lane.optimizer is None:
            lane.state = {name: t.clone() for name, t in self._round_start.items()}
            lane.optimizer = self._optimizer()
        self.load(lane.state)
        try:
            yield lane.optimizer
        finally:
            lane.state = self.state()
            self.load(self._round_start)

    # ------------------------------------------------------------------ messages

    def handle(self, device_id: str, subtopic: str, payload: bytes) -> Optional[Tuple[str, bytes]]:
        """A device's message → the reply (subtopic, bytes), or None when it is stale or for
        another round. ProtocolError for a malformed message."""
        header, tensors = decode_split_message(payload)
        if header.kind != subtopic or header.kind not in KIND_ORDER:
            raise ProtocolError(f"split message kind {header.kind!r} on subtopic {subtopic!r}")
        if header.round_index != self.round_index:
            self._drop(device_id, header, "not the current round")
            return None
        lane = self.lanes.setdefault(device_id, _Lane())
        key = (header.session, header.step, header.kind)
        if lane.reply_key == key and lane.reply is not None:
            self.stats.replays += 1
            return lane.reply
        position = (header.step, KIND_ORDER[header.kind])
        if header.session == lane.session and position <= lane.position:
            self._drop(device_id, header, "older than the last request")
            return None
        if header.session != lane.session:
            lane.session, lane.pending = header.session, None
        started = time.perf_counter()
        if header.kind == "fwd":
            reply_kind, reply_tensors, loss = self._forward(lane, header, tensors)
        else:
            reply_kind, reply_tensors, loss = self._backward(lane, header, tensors)
        server_s = time.perf_counter() - started
        reply_header = SplitHeader(
            kind=reply_kind,
            session=header.session,
            round_index=header.round_index,
            step=header.step,
            loss=loss,
            server_s=server_s,
        )
        reply = (reply_kind, encode_split_message(reply_header, reply_tensors))
        lane.position, lane.reply_key, lane.reply = position, key, reply
        self.stats.server_s += server_s
        self.stats.bytes_in += len(payload)
        self.stats.bytes_out += len(reply[1])
        if reply_kind == "grad":
            self.stats.batches += 1
        return reply

    def _drop(self, device_id: str, header: SplitHeader, reason: str) -> None:
        self.stats.dropped += 1
        log_event(
            logger,
            logging.INFO,
            "split.dropped",
            device_id=device_id,
            kind=header.kind,
            round_index=header.round_index,
            step=header.step,
            reason=reason,
        )
        return None

    def _check_forward(self, tensors: Dict[str, torch.Tensor]) -> Tuple[int, int]:
        hidden = tensors.get("hidden")
        if hidden is None or hidden.dim() != 3:
            raise ProtocolError("split fwd needs a 3-d `hidden` tensor")
        batch, length = int(hidden.shape[0]), int(hidden.shape[1])
        if not (1 <= batch <= MAX_BATCH and 1 <= length <= self.max_length):
            raise ProtocolError(f"split fwd batch {batch} × length {length} out of range")
        expected: Dict[str, Tuple[Tuple[int, ...], Any]] = {
            "hidden": ((batch, length, self.hidden_size), self.wire_dtype),
            "attention_mask": ((batch, length), torch.int64),
        }
        if not self.settings.u_shaped:
            expected["labels"] = (self.layout.labels_shape(batch, length), torch.int64)
        check_tensors(tensors, expected)
        mask = tensors["attention_mask"]
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ProtocolError("split attention_mask holds values other than 0 and 1")
        labels = tensors.get("labels")
        problem = self.layout.labels_error(labels) if labels is not None else None
        if problem is not None:
            raise ProtocolError(f"split {problem}")
        return batch, length

    def _step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.settings.server_max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(
                list(self.params.values()), self.settings.server_max_grad_norm
            )
        optimizer.step()

    def _forward(
        self, lane: _Lane, header: SplitHeader, tensors: Dict[str, torch.Tensor]
    ) -> Tuple[str, Dict[str, torch.Tensor], Optional[float]]:
        batch, _ = self._check_forward(tensors)
        device = self.torch_device
        hidden = tensors["hidden"].to(device, torch.float32)
        mask = tensors["attention_mask"].to(device)
        model = self.layout.model
        model.train()
        lane.samples += batch
        if self.settings.u_shaped:
            rng_state = torch.get_rng_state()
            cuda_state = torch.cuda.get_rng_state(device) if device.startswith("cuda") else None
            with self._weights_of(lane), torch.no_grad():
                top = self.layout.middle(hidden, mask)
            lane.pending = _Pending(header.step, hidden, mask, rng_state, cuda_state)
            return "top", {"top": top.to("cpu", self.wire_dtype)}, None
        hidden.requires_grad_(True)
        with self._weights_of(lane) as optimizer:
            optimizer.zero_grad(set_to_none=True)
            loss = self.layout.top_loss(hidden, mask, tensors["labels"].to(device))
            loss.backward()
            self._step(optimizer)
        assert hidden.grad is not None
        return "grad", {"grad": hidden.grad.to("cpu", self.wire_dtype)}, float(loss.detach())

    def _backward(
        self, lane: _Lane, header: SplitHeader, tensors: Dict[str, torch.Tensor]
    ) -> Tuple[str, Dict[str, torch.Tensor], Optional[float]]:
        pending = lane.pending
        if not self.settings.u_shaped or pending is None or pending.step != header.step:
            raise ProtocolError(f"split bwd for step {header.step} without its forward")
        check_tensors(tensors, {"grad": (tuple(pending.hidden.shape), self.wire_dtype)})
        device = self.torch_device
        hidden = pending.hidden.detach().requires_grad_(True)
        devices = [torch.device(device)] if pending.cuda_rng_state is not None else []
        with self._weights_of(lane) as optimizer, torch.random.fork_rng(devices=devices):
            torch.set_rng_state(pending.rng_state)
            if pending.cuda_rng_state is not None:
                torch.cuda.set_rng_state(pending.cuda_rng_state, device)
            self.layout.model.train()
            optimizer.zero_grad(set_to_none=True)
            top = self.layout.middle(hidden, pending.attention_mask)
            top.backward(tensors["grad"].to(device, torch.float32))
            self._step(optimizer)
        lane.pending = None
        assert hidden.grad is not None
        return "grad", {"grad": hidden.grad.to("cpu", self.wire_dtype)}, None


@register_strategy
class SplitStrategy(FedAvg):
    """FedAvg of the device-side tensors + the split server for the rest (see module doc)."""

    name = "split"
    state_in_eval_model = False  # the split server trains the evaluation model's server half

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        if not isinstance(ctx.method, SplitMethod):
            raise UserError("aggregation.strategy split needs method.name split")
        self.server = SplitServer(
            ctx.eval_model, ctx.method.config, ctx.model_ref.max_length, ctx.torch_device
        )

    def configure_round(self, round_index: int, global_state: Tensors) -> Dict[str, bytes]:
        self.server.begin_round(round_index)
        return {}

    def on_exchange(self, device_id: str, subtopic: str, payload: bytes) -> None:
        reply = self.server.handle(device_id, subtopic, payload)
        if reply is not None:
            self.ctx.send(device_id, *reply)

    def aggregate(
        self, round_index: int, global_state: Tensors, updates: List[AcceptedUpdate]
    ) -> Tensors:
        self.server.end_round([item.update.device_id for item in updates])
        return super().aggregate(round_index, global_state, updates)

    def state(self) -> Tensors:
        return self.server.state()

    def load_state(self, tensors: Tensors) -> None:
        check_saved_state(self.server.params, tensors, "split server half")
        self.server.load(tensors)

    def evaluate(self, global_state: Tensors) -> Dict[str, float]:
        """The full split model: device part from the global state + the server part."""
        metrics = super().evaluate(global_state)
        metrics.update(self.server.stats.as_metrics())
        return metrics
