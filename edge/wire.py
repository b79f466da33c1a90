"""The wire format: message models, blob manifests, digests and chunking, size checks.

Every message that crosses the network is defined here (its topics in `jetfed.edge.topics`, its
tensors in `jetfed.edge.tensor_codec`), so that a device and the coordinator can never disagree
on it. Every inbound message is parsed with `parse_message`, which enforces the size limit before
parsing and the schema after.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from typing_extensions import Annotated

from jetfed.edge.bounds import (
    MAX_BYTES,
    MAX_COUNT,
    MAX_MAP_ENTRIES,
    MAX_METRIC,
    MAX_POWER_W,
    Bytes,
    Count,
    Metric,
    Name,
    RoundIndex,
    UnixSeconds,
)
from jetfed.edge.errors import ProtocolError, validation_line
from jetfed.edge.telemetry.records import PhaseRecord
from jetfed.edge.topics import ID_PATTERN

SCHEMA_VERSION = 1
DEFAULT_CHUNK_SIZE_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
MAX_JSON_MESSAGE_BYTES = 4 << 20
DIGEST_PATTERN = r"^[0-9a-f]{64}$"
MANIFEST_VERSION = 2
"""2: a blob's `digest` is the sha256 of its chunk digests, so each side hashes every byte once
(per chunk). 1 (no `version` field, jetfed before it): the sha256 of the whole payload, a
second pass over every byte on both sides; refused with one line."""


class PayloadTooLarge(ValueError):
    """A publish over the broker's message limit (it would be dropped, or re-sent forever)."""


# --------------------------------------------------------------------------- messages


class WireModel(BaseModel):
    """Strict, closed models: unknown fields and wrong types are refused, never coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BlobManifest(WireModel):
    """What a receiver needs to fetch, verify and resume a chunked payload.

    `digest` = sha256(d_0 ‖ d_1 ‖ … ‖ d_{n-1}) over the raw 32-byte sha256 digests d_i of the
    chunks (`chunk_list_digest`), checked when the manifest is parsed: a receiver that verifies
    every chunk against `chunk_digests` has verified the whole payload, with one hash pass."""

    version: int
    digest: str = Field(pattern=DIGEST_PATTERN)
    size_bytes: Bytes
    chunk_size_bytes: int = Field(gt=0, le=MAX_BYTES)
    chunk_digests: List[str] = Field(max_length=1 << 22)
    content: str = Field(default="safetensors", max_length=64)

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_digests)

    @model_validator(mode="before")
    @classmethod
    def _known_version(cls, data: Any) -> Any:
        """A peer on another manifest version hashes differently: one line, before anything
        else about its manifest is judged."""
        version = data.get("version", 1) if isinstance(data, dict) else MANIFEST_VERSION
        if version != MANIFEST_VERSION:
            raise ValueError(
                f"blob manifest version {version!r} from another jetfed (this one reads version "
                f"{MANIFEST_VERSION}, digest over the chunk digests): run the same jetfed on the "
                "coordinator and every device"
            )
        return data

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
        if self.digest != chunk_list_digest(self.chunk_digests):
            raise ValueError("digest is not the sha256 of the chunk digests")
        return self

    def chunk_range(self, index: int) -> Tuple[int, int]:
        start = index * self.chunk_size_bytes
        return start, min(self.size_bytes, start + self.chunk_size_bytes)


class ModelRef(WireModel):
    """Which pre-trained model to fine-tune: a Hugging Face id or a local path."""

    name_or_path: str
    revision: Optional[str] = None
    num_labels: int = Field(ge=1, le=1 << 20)
    max_length: int = Field(default=128, ge=8, le=8192)
    num_hidden_layers: Optional[int] = Field(default=None, ge=1, le=10_000)
    kind: Optional[str] = Field(default=None, pattern="^(causal_lm|classifier)$")
    """None: taken from the model's config (`*ForCausalLM` → causal_lm)."""
    dtype: str = Field(default="auto", pattern="^(auto|fp32|bf16|fp16)$")
    """Compute dtype: weights stay fp32; bf16/fp16 autocast on CUDA (auto: bf16 on GPUs that
    compute it natively, fp16 with loss scaling on older ones; fp32 on CPU)."""
    chat_template: Optional[str] = Field(default=None, pattern="^[a-z0-9_-]{1,32}$")
    """Causal LMs: a built-in template by name (`jetfed.edge.instructions.TEMPLATES`) instead of the
    tokenizer's own."""
    gradient_checkpointing: bool = False


class TrainingConfig(WireModel):
    """The local training budget of one round on one device."""

    local_steps: Optional[int] = Field(default=50, ge=1, le=1 << 30)
    epochs: Optional[float] = Field(default=None, gt=0, le=1e6)
    batch_size: int = Field(default=16, ge=1, le=4096)
    learning_rate: float = Field(default=1e-3, gt=0, le=1)
    head_learning_rate: Optional[float] = Field(default=None, gt=0, le=1)
    """A classifier's task head (`classifier.*`, `score.*`) at its own rate; None: learning_rate.
    One rate for adapters and head ties the head's step to the adapter's scale."""
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    seed: int = Field(default=0, ge=0, le=(1 << 32) - 1)
    max_grad_norm: Optional[float] = Field(default=1.0, gt=0, le=1e12)


class PartitionSpec(WireModel):
    """How a shared dataset is split into client shards in simulation (no data crosses the wire)."""

    kind: str = Field(default="none", pattern="^(none|iid|dirichlet|shards)$")
    num_clients: int = Field(default=1, ge=1, le=100000)
    alpha: float = Field(default=0.5, gt=0, le=1e6)
    shards_per_client: int = Field(default=2, ge=1, le=1 << 20)
    seed: int = Field(default=0, ge=0, le=(1 << 32) - 1)
    min_shard_size: int = Field(default=0, ge=0, le=1 << 30)
    """Dirichlet: redraw the proportions until every client holds at least this many samples
    (0: one draw, as before)."""


class DeviceAssignment(WireModel):
    """What a round asks of one device beyond the shared task (the coordinator's
    `assignment:`): its own method settings (a LoRA rank), budget, and, at another rank than
    the run's, its own starting state."""

    method_config: Dict[str, Any] = Field(default_factory=dict, max_length=MAX_MAP_ENTRIES)
    batch_size: Optional[int] = Field(default=None, ge=1, le=4096)
    local_steps: Optional[int] = Field(default=None, ge=1, le=1 << 30)
    global_state: Optional[BlobManifest] = None


class Task(WireModel):
    """The coordinator's instruction for one round (retained, so late devices still get it)."""

    schema_version: int = Field(default=SCHEMA_VERSION, ge=0, le=1 << 16)
    experiment: str = Field(pattern=ID_PATTERN)
    round_index: RoundIndex
    method: str = Field(pattern=ID_PATTERN)
    method_config: Dict[str, Any] = Field(default_factory=dict)
    model: ModelRef
    training: TrainingConfig
    partition: PartitionSpec = PartitionSpec()
    client_indices: Dict[str, Count] = Field(default_factory=dict)
    selected_devices: List[str]
    global_state: BlobManifest
    init_state: Optional[BlobManifest] = None
    extra_blobs: Dict[str, BlobManifest] = Field(default_factory=dict)
    update_dtype: str = Field(default="fp32", pattern="^(fp32|fp16|bf16|int8)$")
    chunk_size_bytes: int = Field(default=DEFAULT_CHUNK_SIZE_BYTES, gt=0, le=MAX_BYTES)
    issued_unix_s: UnixSeconds
    deadline_unix_s: UnixSeconds
    min_clients: int = Field(default=1, ge=1, le=MAX_COUNT)
    """The round's quorum (shown on the live page)."""
    live_telemetry: bool = False
    """Someone watches the live page: devices publish `LiveTelemetry` while this says so."""
    assignments: Dict[str, DeviceAssignment] = Field(
        default_factory=dict, max_length=MAX_MAP_ENTRIES
    )
    """Per device id: what differs for it (`for_device`); absent devices take the task as is."""

    def for_device(self, device_id: str) -> Task:
        """The task as device `device_id` runs it: its assignment merged in."""
        assigned = self.assignments.get(device_id)
        if assigned is None:
            return self
        budget = {"batch_size": assigned.batch_size, "local_steps": assigned.local_steps}
        return self.model_copy(
            update={
                "method_config": {**self.method_config, **assigned.method_config},
                "training": self.training.model_copy(
                    update={key: value for key, value in budget.items() if value is not None}
                ),
                "global_state": assigned.global_state or self.global_state,
            }
        )


class Announcement(WireModel):
    """A running coordinator (retained on `coordinator`, cleared at the end or by its will):
    devices that are not pinned to an experiment join the one that announces itself."""

    schema_version: int = SCHEMA_VERSION
    experiment: str = Field(pattern=ID_PATTERN)
    started_unix_s: UnixSeconds


class Hello(WireModel):
    """A device's capabilities, sent on every (re)connect."""

    schema_version: int = Field(default=SCHEMA_VERSION, ge=0, le=1 << 16)
    device_id: str = Field(pattern=ID_PATTERN)
    jetfed_version: str
    hostname: str
    machine: str
    accelerator: str
    memory_total_bytes: Bytes
    telemetry_backend: str = "none"
    methods: List[str] = Field(default_factory=list, max_length=MAX_MAP_ENTRIES)
    context: Dict[str, Any] = Field(default_factory=dict, max_length=MAX_MAP_ENTRIES)
    """Free-form facts (`DeviceContext`); its numbers are range-checked like any other."""

    @field_validator("context")
    @classmethod
    def _bounded_context(cls, value: Dict[str, Any]) -> Dict[str, Any]:
        check_json_numbers(value)
        return value


def check_json_numbers(value: Any, depth: int = 0) -> None:
    """Free-form JSON from the network: finite numbers within ±MAX_METRIC, at most 4 levels
    deep, so nothing downstream (tables, formatting, sums) meets 2**70 or NaN."""
    if depth > 4:
        raise ValueError("nested more than 4 levels")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        if not (math.isfinite(value) and abs(value) <= MAX_METRIC):
            raise ValueError(f"number {value!r:.40} is out of range")
        return
    items = value.values() if isinstance(value, dict) else value
    for item in items:
        check_json_numbers(item, depth + 1)


class Update(WireModel):
    """A device's result for a round; the tensors follow as the chunks of `blob`."""

    schema_version: int = Field(default=SCHEMA_VERSION, ge=0, le=1 << 16)
    experiment: str
    device_id: str = Field(pattern=ID_PATTERN)
    round_index: RoundIndex
    base_digest: str = Field(pattern=DIGEST_PATTERN)
    num_samples: int = Field(ge=1, le=1 << 40)
    local_steps: Count
    train_loss: Metric
    blob: BlobManifest
    metrics: Dict[Name, Metric] = Field(default_factory=dict, max_length=MAX_MAP_ENTRIES)
    profile: List[PhaseRecord] = Field(default_factory=list, max_length=10000)
    """Phase records not yet acknowledged; riding on the update makes them as reliable as it."""


class ChunkRequest(WireModel):
    """Ask the holder of a blob to (re)send some of its chunks."""

    device_id: str = Field(pattern=ID_PATTERN)
    digest: str = Field(pattern=DIGEST_PATTERN)
    indices: List[Count] = Field(max_length=1 << 20)


class Ack(WireModel):
    device_id: str
    round_index: RoundIndex
    digest: str


class Nack(WireModel):
    """Why a message from this device was refused; `code` is stable, `reason` is for people.

    A refused update is named by `round_index` and `digest`, the sha256 of the refused `Update`
    message's bytes (`message_digest`): a device abandons its upload only on a nack naming the
    very message it sent, never on one earned by a replay, a forgery or a bit-flipped copy in its
    name. Other refusals (a hello, a status, a profile, a chunk request) carry neither."""

    device_id: str
    round_index: Optional[RoundIndex] = None
    digest: Optional[str] = Field(default=None, pattern=DIGEST_PATTERN)
    code: str
    reason: str


class ProfileBatch(WireModel):
    device_id: str = Field(pattern=ID_PATTERN)
    round_index: RoundIndex
    records: List[PhaseRecord] = Field(max_length=10000)


ROUND_FAILURE_REASON_CHARS = 500


class RoundFailure(WireModel):
    """A device could not do its round (its data, its model, a transfer): the coordinator stops
    waiting for it and logs why, instead of holding the round open until its deadline."""

    device_id: str = Field(pattern=ID_PATTERN)
    round_index: RoundIndex
    reason: str = Field(max_length=ROUND_FAILURE_REASON_CHARS)


PROGRESS_PHASES = ("download", "setup", "train", "upload")


class Progress(WireModel):
    """Where a device is in its round, for the live table (small, rate-limited by the device)."""

    device_id: str = Field(pattern=ID_PATTERN)
    round_index: RoundIndex
    phase: str = Field(pattern="^(" + "|".join(PROGRESS_PHASES) + ")$")
    step: Optional[Count] = None
    total_steps: Optional[Count] = Field(default=None, ge=1)
    bytes_received: Bytes
    bytes_sent: Bytes


LIVE_TELEMETRY_MAX_SAMPLES = 16
LIVE_TELEMETRY_MAX_RAILS = 16
LIVE_TELEMETRY_MAX_BYTES = 16 << 10
RAIL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,31}$"
LiveWatts = Annotated[float, Field(ge=0, le=MAX_POWER_W, allow_inf_nan=False)]


class LiveSample(WireModel):
    """One decimated telemetry sample: watts per rail and module, memory; None = no sensor."""

    wall_unix_s: UnixSeconds
    rails_w: Dict[Annotated[str, Field(pattern=RAIL_NAME_PATTERN)], Optional[LiveWatts]] = Field(
        default_factory=dict, max_length=LIVE_TELEMETRY_MAX_RAILS
    )
    total_w: Optional[LiveWatts] = None
    rss_bytes: Optional[Bytes] = None
    system_used_bytes: Optional[Bytes] = None


class LiveTelemetry(WireModel):
    """A device's recent samples for the live page (a few per second, about 1 KB a second);
    display only: no round depends on it."""

    device_id: str = Field(pattern=ID_PATTERN)
    backend: str = Field(pattern=ID_PATTERN)
    samples: List[LiveSample] = Field(min_length=1, max_length=LIVE_TELEMETRY_MAX_SAMPLES)


M = TypeVar("M", bound=BaseModel)


def encode_message(message: BaseModel) -> bytes:
    return message.model_dump_json().encode("utf-8")


def to_json_dict(message: BaseModel) -> Dict[str, Any]:
    return dict(json.loads(message.model_dump_json()))


def message_digest(payload: bytes) -> str:
    """What a nack names a refused update by: the sha256 of the message's exact bytes (a device
    re-sends identical bytes until acknowledged)."""
    return sha256_hex(payload)


def parse_message(model: Type[M], payload: bytes, max_bytes: int = MAX_JSON_MESSAGE_BYTES) -> M:
    """Size check first (cheap), then strict JSON schema validation; ProtocolError on failure."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"{model.__name__} message of {len(payload)} bytes > {max_bytes}")
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        line = validation_line(exc, default="message")
        raise ProtocolError(f"invalid {model.__name__}: {line}") from None


# --------------------------------------------------------------------------- digests and chunks


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def chunk_list_digest(chunk_digests: Sequence[str]) -> str:
    """A blob's digest: the sha256 of its chunk digests, raw bytes concatenated in order."""
    return sha256_hex(b"".join(bytes.fromhex(digest) for digest in chunk_digests))


def manifest_of_chunks(
    chunk_digests: List[str], size_bytes: int, chunk_size_bytes: int, content: str = "safetensors"
) -> BlobManifest:
    """The manifest of a payload whose chunks hash to `chunk_digests`."""
    return BlobManifest(
        version=MANIFEST_VERSION,
        digest=chunk_list_digest(chunk_digests),
        size_bytes=size_bytes,
        chunk_size_bytes=chunk_size_bytes,
        chunk_digests=chunk_digests,
        content=content,
    )


def make_manifest(data: bytes, chunk_size_bytes: int, content: str = "safetensors") -> BlobManifest:
    view = memoryview(data)
    digests = [
        sha256_hex(view[start : start + chunk_size_bytes])
        for start in range(0, max(len(data), 1), chunk_size_bytes)
    ]
    return manifest_of_chunks(digests, len(data), chunk_size_bytes, content)


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
