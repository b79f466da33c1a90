"""The wire format: topics, message models, the safetensors tensor codec, digests and chunking.

Everything that crosses the network is defined here, so that a device and the coordinator can
never disagree on it. Every inbound message is parsed with `parse_message`, which enforces the
size limit before parsing and the schema after; tensors are decoded only through
`decode_tensors`, which checks names, shapes, dtypes and finiteness. No pickle, ever.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge.errors import ProtocolError
from edge.telemetry.records import PhaseRecord

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
DEFAULT_CHUNK_SIZE_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
MAX_JSON_MESSAGE_BYTES = 4 << 20
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DIGEST_PATTERN = r"^[0-9a-f]{64}$"
WIRE_DTYPES = ("fp32", "fp16", "bf16")


class PayloadTooLarge(ValueError):
    """A publish over the broker's message limit (it would be dropped, or re-sent forever)."""


# --------------------------------------------------------------------------- topics


@dataclass(frozen=True)
class Topics:
    """The topic scheme under `jetfed/{experiment}/` (see docs/PROTOCOL.md)."""

    experiment: str

    @property
    def root(self) -> str:
        return f"jetfed/{self.experiment}"

    @property
    def task(self) -> str:
        return f"{self.root}/task"

    def device(self, device_id: str, leaf: str) -> str:
        return f"{self.root}/devices/{device_id}/{leaf}"

    def chunk(self, device_id: str, direction: str, digest: str, index: int) -> str:
        return f"{self.root}/devices/{device_id}/{direction}/{digest}/{index}"

    def all_devices(self, leaf: str) -> str:
        return f"{self.root}/devices/+/{leaf}"

    def parse_device_topic(self, topic: str) -> Tuple[str, str, List[str]]:
        """`jetfed/e/devices/ID/leaf/rest...` → (ID, leaf, rest); ProtocolError otherwise."""
        prefix = f"{self.root}/devices/"
        if not topic.startswith(prefix):
            raise ProtocolError(f"topic {topic!r} is not under {prefix}")
        parts = topic[len(prefix) :].split("/")
        if len(parts) < 2 or not re.fullmatch(ID_PATTERN, parts[0]):
            raise ProtocolError(f"topic {topic!r} has no valid device id")
        return parts[0], parts[1], parts[2:]


# --------------------------------------------------------------------------- messages


class WireModel(BaseModel):
    """Strict, closed models: unknown fields and wrong types are refused, never coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BlobManifest(WireModel):
    """What a receiver needs to fetch, verify and resume a chunked payload."""

    digest: str = Field(pattern=DIGEST_PATTERN)
    size_bytes: int = Field(ge=0)
    chunk_size_bytes: int = Field(gt=0)
    chunk_digests: List[str]
    content: str = "safetensors"

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_digests)

    @model_validator(mode="after")
    def _consistent(self) -> BlobManifest:
        expected = max(1, math.ceil(self.size_bytes / self.chunk_size_bytes))
        if len(self.chunk_digests) != expected:
            raise ValueError(
                f"chunk_digests has {len(self.chunk_digests)} entries, size implies {expected}"
            )
        for digest in self.chunk_digests:
            if not re.fullmatch(DIGEST_PATTERN, digest):
                raise ValueError("chunk digest is not 64 lowercase hex characters")
        return self

    def chunk_range(self, index: int) -> Tuple[int, int]:
        start = index * self.chunk_size_bytes
        return start, min(self.size_bytes, start + self.chunk_size_bytes)


class ModelRef(WireModel):
    """Which pre-trained model to fine-tune: a Hugging Face id or a local path."""

    name_or_path: str
    revision: Optional[str] = None
    num_labels: int = Field(ge=1)
    max_length: int = Field(default=128, ge=8, le=8192)
    num_hidden_layers: Optional[int] = Field(default=None, ge=1)
    kind: Optional[str] = Field(default=None, pattern="^(causal_lm|classifier)$")
    """None: taken from the model's config (`*ForCausalLM` → causal_lm)."""
    dtype: str = Field(default="auto", pattern="^(auto|fp32|bf16|fp16)$")
    """Compute dtype: weights stay fp32; bf16/fp16 autocast on CUDA (auto: bf16 there, fp32 on
    CPU)."""
    chat_template: Optional[str] = Field(default=None, pattern="^[a-z0-9_-]{1,32}$")
    """Causal LMs: a built-in template by name (`edge.instructions.TEMPLATES`) instead of the
    tokenizer's own."""
    gradient_checkpointing: bool = False


class TrainingConfig(WireModel):
    """The local training budget of one round on one device."""

    local_steps: Optional[int] = Field(default=50, ge=1)
    epochs: Optional[float] = Field(default=None, gt=0)
    batch_size: int = Field(default=16, ge=1, le=4096)
    learning_rate: float = Field(default=1e-3, gt=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    seed: int = 0
    max_grad_norm: Optional[float] = Field(default=1.0, gt=0)


class PartitionSpec(WireModel):
    """How a shared dataset is split into client shards in simulation (no data crosses the wire)."""

    kind: str = Field(default="none", pattern="^(none|iid|dirichlet|shards)$")
    num_clients: int = Field(default=1, ge=1, le=100000)
    alpha: float = Field(default=0.5, gt=0)
    shards_per_client: int = Field(default=2, ge=1)
    seed: int = 0


class Task(WireModel):
    """The coordinator's instruction for one round (retained, so late devices still get it)."""

    schema_version: int = SCHEMA_VERSION
    experiment: str = Field(pattern=ID_PATTERN)
    round_index: int = Field(ge=0)
    method: str = Field(pattern=ID_PATTERN)
    method_config: Dict[str, Any] = Field(default_factory=dict)
    model: ModelRef
    training: TrainingConfig
    partition: PartitionSpec = PartitionSpec()
    client_indices: Dict[str, int] = Field(default_factory=dict)
    selected_devices: List[str]
    global_state: BlobManifest
    init_state: Optional[BlobManifest] = None
    extra_blobs: Dict[str, BlobManifest] = Field(default_factory=dict)
    update_dtype: str = Field(default="fp32", pattern="^(fp32|fp16|bf16|int8)$")
    chunk_size_bytes: int = Field(default=DEFAULT_CHUNK_SIZE_BYTES, gt=0)
    issued_unix_s: float
    deadline_unix_s: float


class Hello(WireModel):
    """A device's capabilities, sent on every (re)connect."""

    schema_version: int = SCHEMA_VERSION
    device_id: str = Field(pattern=ID_PATTERN)
    jetfed_version: str
    hostname: str
    machine: str
    accelerator: str
    memory_total_bytes: int = Field(ge=0)
    telemetry_backend: str = "none"
    methods: List[str] = Field(default_factory=list)
    context: Dict[str, Any] = Field(default_factory=dict)


class Update(WireModel):
    """A device's result for a round; the tensors follow as the chunks of `blob`."""

    schema_version: int = SCHEMA_VERSION
    experiment: str
    device_id: str = Field(pattern=ID_PATTERN)
    round_index: int = Field(ge=0)
    base_digest: str = Field(pattern=DIGEST_PATTERN)
    num_samples: int = Field(ge=1)
    local_steps: int = Field(ge=0)
    train_loss: float
    blob: BlobManifest
    metrics: Dict[str, float] = Field(default_factory=dict)
    profile: List[PhaseRecord] = Field(default_factory=list, max_length=10000)
    """Phase records not yet acknowledged; riding on the update makes them as reliable as it."""

    @field_validator("train_loss")
    @classmethod
    def _finite_loss(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("train_loss is not finite")
        return value


class ChunkRequest(WireModel):
    """Ask the holder of a blob to (re)send some of its chunks."""

    device_id: str = Field(pattern=ID_PATTERN)
    digest: str = Field(pattern=DIGEST_PATTERN)
    indices: List[int] = Field(max_length=1 << 20)

    @field_validator("indices")
    @classmethod
    def _non_negative(cls, value: List[int]) -> List[int]:
        if any(index < 0 for index in value):
            raise ValueError("chunk indices must be >= 0")
        return value


class Ack(WireModel):
    device_id: str
    round_index: int
    digest: str


class Nack(WireModel):
    """Why a message from this device was refused; `code` is stable, `reason` is for people."""

    device_id: str
    round_index: Optional[int] = None
    code: str
    reason: str


class ProfileBatch(WireModel):
    device_id: str = Field(pattern=ID_PATTERN)
    round_index: int = Field(ge=0)
    records: List[PhaseRecord] = Field(max_length=10000)


M = TypeVar("M", bound=BaseModel)


def encode_message(message: BaseModel) -> bytes:
    return message.model_dump_json().encode("utf-8")


def parse_message(model: Type[M], payload: bytes, max_bytes: int = MAX_JSON_MESSAGE_BYTES) -> M:
    """Size check first (cheap), then strict JSON schema validation; ProtocolError on failure."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"{model.__name__} message of {len(payload)} bytes > {max_bytes}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "message"
        raise ProtocolError(f"invalid {model.__name__}: {where}: {first.get('msg')}") from None


# --------------------------------------------------------------------------- digests and chunks


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def make_manifest(data: bytes, chunk_size_bytes: int, content: str = "safetensors") -> BlobManifest:
    view = memoryview(data)
    digests = [
        sha256_hex(view[start : start + chunk_size_bytes])
        for start in range(0, max(len(data), 1), chunk_size_bytes)
    ]
    return BlobManifest(
        digest=sha256_hex(data),
        size_bytes=len(data),
        chunk_size_bytes=chunk_size_bytes,
        chunk_digests=digests,
        content=content,
    )


def check_publish_size(topic: str, payload_bytes: int, max_message_bytes: int) -> None:
    """Refuse before publishing: brokers drop (3.1.1) or paho re-sends forever (5) otherwise."""
    if payload_bytes > max_message_bytes:
        raise PayloadTooLarge(
            f"payload of {payload_bytes} bytes on {topic} exceeds max_message_bytes="
            f"{max_message_bytes}; lower chunk_size_bytes"
        )


def mqtt_publish_wire_bytes(topic: str, payload_bytes: int, qos: int = 1) -> int:
    """Bytes of one MQTT 3.1.1 PUBLISH packet (fixed header, topic, packet id, payload)."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + payload_bytes
    length_bytes = 1
    while remaining >= 128**length_bytes and length_bytes < 4:
        length_bytes += 1
    return 1 + length_bytes + remaining


# --------------------------------------------------------------------------- tensor codec


TensorSpec = Mapping[str, Tuple[int, ...]]


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def encode_tensors(tensors: Mapping[str, torch.Tensor], dtype: str = "fp32") -> bytes:
    """safetensors bytes of `tensors` cast to the wire dtype (contiguous CPU copies)."""
    from safetensors.torch import save

    if dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {dtype!r} is not one of {WIRE_DTYPES}")
    target = _torch_dtype(dtype)
    prepared = {
        name: tensor.detach().to("cpu", target).contiguous() for name, tensor in tensors.items()
    }
    return bytes(save(prepared))


def decode_tensors(
    data: bytes, expected: Optional[TensorSpec] = None, allow_dtypes: Sequence[str] = WIRE_DTYPES
) -> Dict[str, torch.Tensor]:
    """Parse safetensors bytes into fp32 tensors, refusing anything not exactly as expected."""
    import torch
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise ProtocolError(f"not a valid safetensors payload: {exc}") from None
    allowed = {_torch_dtype(name) for name in allow_dtypes}
    if expected is not None:
        missing = sorted(set(expected) - set(tensors))
        unknown = sorted(set(tensors) - set(expected))
        if missing or unknown:
            raise ProtocolError(
                f"tensor names differ: missing {missing[:3]}, unexpected {unknown[:3]}"
            )
    decoded: Dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if tensor.dtype not in allowed:
            raise ProtocolError(f"tensor {name} has dtype {tensor.dtype}, allowed {allow_dtypes}")
        if expected is not None and tuple(tensor.shape) != tuple(expected[name]):
            raise ProtocolError(
                f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name])}"
            )
        as_fp32 = tensor.to(torch.float32)
        if not bool(torch.isfinite(as_fp32).all()):
            raise ProtocolError(f"tensor {name} contains NaN or Inf")
        decoded[name] = as_fp32
    return decoded


def tensor_spec(tensors: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def to_json_dict(message: BaseModel) -> Dict[str, Any]:
    return dict(json.loads(message.model_dump_json()))
