"""Split learning (Split-FedLLM, SFL-style): the device runs the bottom of the model only.

The device holds the embeddings and the first `cut_layer` layers (with LoRA); the split server on
the coordinator (`coordinator/strategies/split.py`) holds the other layers and the head (a
classifier's pooler/classifier; a decoder's final norm and lm_head), with LoRA. Per batch the
device sends the cut activations, the attention mask and the labels (a class id per row, or a
token per position for a causal LM: the prompt and padding masked); the server runs forward and
backward, steps its part and returns the gradient at the cut; the device finishes backward and
steps. In U-shaped mode (`u_shaped: true`) the head stays on the device and labels never leave it:
the server returns the top activations, the device runs head + loss and sends back their
gradient, and the server answers with the gradient at the cut.

Rounds are SFL-style: the device-side tensors (bottom LoRA, + the head when U-shaped) are the
global state and are averaged like LoRA; the server-side tensors live in the strategy.

Which models and how they are cut: `jetfed.edge.split_layout` (BERT-like encoders; Llama-style
decoders, whose positions and causal mask each side rebuilds from the attention mask, with no
KV cache on the wire). Differences from unsplit training: dropout masks come from each side's
own RNG, and gradient clipping (`max_grad_norm`, `server_max_grad_norm`) applies per side.

Wire: each message is one safetensors file whose metadata holds the JSON `SplitHeader`
(correlation id = session + step, round); no pickle. Activations travel as `activation_dtype`.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

from pydantic import Field

from jetfed.edge.errors import ProtocolError, UserError
from jetfed.edge.logs import log_event
from jetfed.edge.methods.base import (
    LocalResult,
    LocalRound,
    MemoryFootprint,
    Tensors,
    register_method,
)
from jetfed.edge.methods.lora import LoraMethod, LoraSettings
from jetfed.edge.split_layout import SplitLayout
from jetfed.edge.transfer import TransferTimeout
from jetfed.edge.wire import PayloadTooLarge, WireModel, parse_message

if TYPE_CHECKING:
    import torch

    from jetfed.edge.exchange import Exchange

logger = logging.getLogger(__name__)

MAX_SPLIT_MESSAGE_BYTES = 256 << 20
MAX_HEADER_BYTES = 64 << 10
SESSION_PATTERN = r"^[0-9a-f]{16}$"


class SplitSettings(LoraSettings):
    """`method:` keys of split learning (LoRA keys apply to both halves)."""

    cut_layer: int = Field(default=2, ge=1)
    u_shaped: bool = False
    activation_dtype: str = Field(default="fp32", pattern="^(fp32|fp16|bf16)$")
    server_copies: str = Field(default="shared", pattern="^(shared|per_device)$")
    server_learning_rate: float = Field(default=1e-3, gt=0, le=1)
    server_max_grad_norm: Optional[float] = Field(default=1.0, gt=0)
    reply_timeout_s: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=5, ge=0)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# --------------------------------------------------------------------------- wire messages


class SplitHeader(WireModel):
    """Correlation and bookkeeping of one split message (the tensors ride alongside).

    kind: fwd (device: cut activations), top (server, U-shaped: top activations), bwd (device,
    U-shaped: gradient of the top), grad (server: gradient at the cut). A request is identified by
    (session, step, kind); `session` is random per device round, so a restarted device never
    collides with its earlier attempt.
    """

    kind: str = Field(pattern="^(fwd|top|bwd|grad)$")
    session: str = Field(pattern=SESSION_PATTERN)
    round_index: int = Field(ge=0)
    step: int = Field(ge=0)
    loss: Optional[float] = None
    server_s: Optional[float] = Field(default=None, ge=0)


def encode_split_message(header: SplitHeader, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """One safetensors file: the tensors as they are, the header in its metadata."""
    from safetensors.torch import save

    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return bytes(save(prepared, metadata={"jetfed_split": header.model_dump_json()}))


def decode_split_message(
    payload: bytes, max_bytes: int = MAX_SPLIT_MESSAGE_BYTES
) -> Tuple[SplitHeader, Dict[str, torch.Tensor]]:
    """(header, tensors) of a split message; ProtocolError for anything malformed."""
    from safetensors.torch import load

    if len(payload) > max_bytes or len(payload) < 8:
        raise ProtocolError(f"split message of {len(payload)} bytes (limit {max_bytes})")
    header_bytes = int.from_bytes(payload[:8], "little")
    if header_bytes > min(MAX_HEADER_BYTES, len(payload) - 8):
        raise ProtocolError("split message header is larger than the message")
    try:
        meta = json.loads(payload[8 : 8 + header_bytes])["__metadata__"]["jetfed_split"]
        tensors = load(payload)
    except Exception as exc:  # json/safetensors raise their own error types on garbage
        raise ProtocolError(f"not a split message: {type(exc).__name__}") from None
    if not isinstance(meta, str):
        raise ProtocolError("split message metadata is not a string")
    return parse_message(SplitHeader, meta.encode("utf-8"), MAX_HEADER_BYTES), tensors


def check_tensors(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, Tuple[Tuple[int, ...], Any]]
) -> None:
    """Exactly the expected names, shapes and dtypes; float tensors finite."""
    import torch

    if set(tensors) != set(expected):
        raise ProtocolError(f"split tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ProtocolError(
                f"split tensor {name}: {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {tuple(shape)} {dtype}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ProtocolError(f"split tensor {name} contains NaN or Inf")


# --------------------------------------------------------------------------- device side


@dataclass
class SplitTraffic:
    """What the device's batches cost: seconds computing, waiting, and reported by the server."""

    batches: int = 0
    wait_s: float = 0.0
    server_s: float = 0.0
    retries: int = 0


class ExchangeTransport:
    """Device side of a request: send, wait for the reply with the same correlation id, re-send
    the same bytes when none comes in time (the server answers a repeat from its cache)."""

    def __init__(self, exchange: Exchange, timeout_s: float, max_retries: int) -> None:
        self.exchange = exchange
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retries = 0

    def request(
        self, header: SplitHeader, tensors: Mapping[str, torch.Tensor], reply_kind: str
    ) -> Tuple[SplitHeader, Dict[str, torch.Tensor]]:
        payload = encode_split_message(header, tensors)
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
                log_event(logger, logging.WARNING, "split.retry", step=header.step, attempt=attempt)
            try:
                self.exchange.send(header.kind, payload)
            except PayloadTooLarge as exc:
                raise ProtocolError(f"{exc} (use a smaller batch or activation_dtype)") from None
            reply = self._await(header, reply_kind, time.monotonic() + self.timeout_s)
            if reply is not None:
                return reply
        raise TransferTimeout(
            f"split: no {reply_kind} for step {header.step} after {self.max_retries + 1} tries"
        )

    def _await(
        self, header: SplitHeader, reply_kind: str, deadline: float
    ) -> Optional[Tuple[SplitHeader, Dict[str, torch.Tensor]]]:
        while True:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return None
            try:
                _, data = self.exchange.receive(remaining_s)
            except TimeoutError:
                return None
            try:
                reply = decode_split_message(data)
            except ProtocolError as exc:
                log_event(logger, logging.WARNING, "split.reply_rejected", reason=exc)
                continue
            got = reply[0]
            if (got.kind, got.session, got.round_index, got.step) == (
                reply_kind,
                header.session,
                header.round_index,
                header.step,
            ):
                return reply


@dataclass
class SplitBatchLoss:
    """`loss_fn` for `jetfed.edge.train.train_local`: one batch through the split model.

    It returns a tensor whose value is the batch loss and whose backward() delivers exactly the
    split gradients to the device's parameters: the server's gradient at the cut (and, U-shaped,
    the head's own gradient), so the shared loop's optimizer, clipping and stats apply unchanged.
    """

    layout: SplitLayout
    transport: Any
    round_index: int
    activation_dtype: str
    session: str = field(default_factory=lambda: secrets.token_hex(8))
    traffic: SplitTraffic = field(default_factory=SplitTraffic)

    def _request(
        self, kind: str, tensors: Dict[str, torch.Tensor], reply_kind: str
    ) -> Tuple[SplitHeader, torch.Tensor]:
        header = SplitHeader(
            kind=kind, session=self.session, round_index=self.round_index, step=self.traffic.batches
        )
        started = time.perf_counter()
        reply_header, reply = self.transport.request(header, tensors, reply_kind)
        self.traffic.wait_s += time.perf_counter() - started
        self.traffic.server_s += reply_header.server_s or 0.0
        return reply_header, reply[reply_kind]

    def __call__(self, model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch

        wire = torch_dtype(self.activation_dtype)
        hidden = self.layout.bottom(batch)
        mask = batch["attention_mask"].to(torch.int64)
        up = {"hidden": hidden.detach().to("cpu", wire), "attention_mask": mask.cpu()}
        if self.layout.u_shaped:
            _, top_wire = self._request("fwd", up, "top")
            top = top_wire.to(hidden.device, torch.float32).requires_grad_(True)
            loss = self.layout.head_loss(top, mask, batch["labels"])
            (top_grad,) = torch.autograd.grad(loss, [top], retain_graph=True)
            _, cut_grad = self._request("bwd", {"grad": top_grad.to("cpu", wire)}, "grad")
            surrogate = loss + (hidden * cut_grad.to(hidden.device, hidden.dtype)).sum()
            value = loss.detach()
        else:
            up["labels"] = batch["labels"].to("cpu", torch.int64)
            reply_header, cut_grad = self._request("fwd", up, "grad")
            surrogate = (hidden * cut_grad.to(hidden.device, hidden.dtype)).sum()
            value = torch.tensor(float(reply_header.loss or 0.0), device=hidden.device)
        self.traffic.batches += 1
        return surrogate - surrogate.detach() + value


# --------------------------------------------------------------------------- the method


@register_method
class SplitMethod(LoraMethod):
    name = "split"
    strategy = "split"
    config_model = SplitSettings
    config: SplitSettings
    default_learning_rate = 5e-4

    def memory_footprint(self, model: Any) -> MemoryFootprint:
        """What the device side of the layout holds (embeddings, the first `cut_layer` layers;
        U-shaped also the head), with LoRA on those layers; a decoder's logits only U-shaped."""
        layout = SplitLayout.of(model, self.config.cut_layer, self.config.u_shaped, training=False)
        held = layout.device_ids()
        return MemoryFootprint(
            held_params=sum(p.numel() for p in model.parameters() if id(p) in held),
            trainable_params=self.lora_params(model, self.config.cut_layer),
            layers=self.config.cut_layer,
            logits_on_device=self.config.u_shaped,
        )

    def layout(self, model: Any) -> SplitLayout:
        return SplitLayout.of(model, self.config.cut_layer, self.config.u_shaped)

    def _device_params(self, model: Any) -> Dict[str, Any]:
        """The device-side trainable parameters: bottom LoRA (+ the head when U-shaped)."""
        device_ids = self.layout(model).device_ids()
        return {
            name: param
            for name, param in model.named_parameters()
            if param.requires_grad and id(param) in device_ids
        }

    def get_state(self, model: Any) -> Tensors:
        return {name: param.detach().clone() for name, param in self._device_params(model).items()}

    def state_spec(self, model: Any) -> Dict[str, Tuple[int, ...]]:
        return {name: tuple(param.shape) for name, param in self._device_params(model).items()}

    def local_round(self, job: LocalRound) -> LocalResult:
        if job.exchange is None:
            raise UserError("method split needs the in-round exchange channel to the coordinator")
        self.set_state(job.model, job.global_state)
        layout = self.layout(job.model)
        layout.release_server_layers()
        settings = self.config
        transport = ExchangeTransport(job.exchange, settings.reply_timeout_s, settings.max_retries)
        loss_fn = SplitBatchLoss(layout, transport, job.round_index, settings.activation_dtype)
        job.exchange.drain()
        sent_before, received_before = job.exchange.bytes_sent, job.exchange.bytes_received
        started = time.perf_counter()
        stats = self.train(job, loss_fn)
        train_s = time.perf_counter() - started
        counters = job.counters
        counters.bytes_sent += job.exchange.bytes_sent - sent_before
        counters.bytes_received += job.exchange.bytes_received - received_before
        counters.extra.update(split_counters(loss_fn.traffic, transport.retries, train_s))
        counters.extra["split_cut_layer"] = float(settings.cut_layer)
        counters.extra["split_bytes_per_batch"] = (
            counters.bytes_sent + counters.bytes_received
        ) / max(1, loss_fn.traffic.batches)
        return self.delta_result(job, stats)


def split_counters(traffic: SplitTraffic, retries: int, train_s: float) -> Dict[str, float]:
    """Device seconds (compute) vs wait seconds (network + server), as the profile reports them."""
    return {
        "split_batches": float(traffic.batches),
        "split_device_s": max(0.0, train_s - traffic.wait_s),
        "split_wait_s": traffic.wait_s,
        "split_server_s": traffic.server_s,
        "split_retries": float(retries),
    }
