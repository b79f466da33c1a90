"""What turns a task's downloaded blobs into a local round: the model (built once, kept while
the method, model and init stay the same), this client's data shard, the `LocalRound` job.

A deployed agent owns one `LocalTrainer`. A simulation (`jetfed simulate`) gives every virtual
device of a process the same one, so a process holds one model and one copy of the data however
many devices it simulates: the federated tensors are overwritten by the global state at the start
of every local round (`FederatedMethod.local_round`) and the optimizer is new each round, so a
shared model trains exactly as a device's own would. A lock makes the rounds of the devices that
share a trainer run one at a time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Tuple

from jetfed.edge.data import check_labels, load_task_split, partition
from jetfed.edge.errors import UserError
from jetfed.edge.exchange import Exchange
from jetfed.edge.methods.base import FederatedMethod, LocalResult, LocalRound, get_method
from jetfed.edge.methods.base import run_local_round as run_method_round
from jetfed.edge.telemetry.phases import Profiler
from jetfed.edge.tensorfile import Payload, TensorFile, read_payload
from jetfed.edge.train import device_seed
from jetfed.edge.wire import Task


@dataclass
class _ModelCache:
    """The built model survives rounds; rebuilt only when the method, model or init changes."""

    key: Tuple[str, str, str, str]
    method: FederatedMethod
    model: Any
    tokenizer: Any


@dataclass(frozen=True)
class TrainingDevice:
    """Who a round is trained for: the device's id, its data, its profiler and exchange."""

    device_id: str
    data: Optional[str]
    train_split: str
    profiler: Profiler
    exchange: Optional[Exchange] = None


@dataclass
class PreparedRound:
    method: FederatedMethod
    local: LocalRound


def model_key(task: Task) -> Tuple[str, str, str, str]:
    init_digest = task.init_state.digest if task.init_state is not None else ""
    return (task.method, repr(sorted(task.method_config.items())), repr(task.model), init_digest)


class Trainer(Protocol):
    """What an agent trains with: a `LocalTrainer`, or a simulation's pool of them
    (`jetfed.edge.pool_trainer.PoolTrainer`)."""

    def needs_init(self, task: Task) -> bool: ...

    def prepare(self, task: Task, blobs: Dict[str, Payload], device: TrainingDevice) -> Any: ...

    def run(self, prepared: Any) -> LocalResult: ...


class LocalTrainer:
    """One model and the data shards of the devices it trains for."""

    def __init__(self, torch_device: Optional[str] = None) -> None:
        self.torch_device = torch_device
        self._model: Optional[_ModelCache] = None
        self._full: Dict[Tuple[str, str, bool], Any] = {}
        self._parts: Dict[Tuple[str, str, bool, str], List[List[int]]] = {}
        self._shards: Dict[Tuple[str, str, bool, str, int], Any] = {}
        self._lock = threading.Lock()

    @property
    def built_model(self) -> Any:
        """The model built last (None before the first round)."""
        return self._model.model if self._model is not None else None

    def needs_init(self, task: Task) -> bool:
        """Whether the task's fixed init must be downloaded (the model is not built from it)."""
        return task.init_state is not None and (
            self._model is None or self._model.key[3] != task.init_state.digest
        )

    def prepare(
        self, task: Task, blobs: Dict[str, Payload], device: TrainingDevice
    ) -> PreparedRound:
        """Decode the state, (re)build the model if needed, derive this device's data shard."""
        from jetfed.edge.models import is_causal_lm, load_tokenizer, pick_device

        with self._lock:
            key = model_key(task)
            if self._model is None or self._model.key != key:
                method = get_method(task.method)(task.method_config, task.model)
                init = dict(TensorFile(blobs["init"])) if "init" in blobs else None
                model = method.build(init, seed=task.training.seed)
                self._model = _ModelCache(key, method, model, load_tokenizer(task.model))
            cache = self._model
            expected = {n: tuple(t.shape) for n, t in cache.method.get_state(cache.model).items()}
            global_state = dict(TensorFile(blobs["global"], expected))
            client_index = task.client_indices.get(device.device_id, 0)
            causal = is_causal_lm(cache.model)
            dataset = self._shard(device.data, device.train_split, task, client_index, causal)
        extra = {name: read_payload(blobs[name]) for name in task.extra_blobs}
        local = LocalRound(
            model=cache.model,
            tokenizer=cache.tokenizer,
            dataset=dataset,
            training=task.training,
            model_ref=task.model,
            round_index=task.round_index,
            seed=device_seed(task.training.seed, task.round_index, client_index),
            device=pick_device(self.torch_device),
            global_state=global_state,
            profiler=device.profiler,
            extra_blobs=extra,
            exchange=device.exchange,
            data_path=device.data,
        )
        return PreparedRound(cache.method, local)

    def run(self, prepared: PreparedRound) -> LocalResult:
        """The method's local round (inside its "train" phase), one trainer user at a time."""
        with self._lock:
            return run_method_round(prepared.method, prepared.local)

    def _shard(
        self, data: Optional[str], split: str, task: Task, client_index: int, causal: bool
    ) -> Any:
        """This client's shard: instruction data for a causal LM, a TextDataset otherwise. The
        split is read and partitioned once per trainer, whatever the number of devices; each
        shard is cut once."""
        if not data:
            raise UserError("this device has no data: pass --data DIR (or JETFED_DATA)")
        source = (data, split, causal)
        if source not in self._full:
            loaded = load_task_split(data, split, causal)
            if not causal:
                check_labels(loaded.labels, task.model.num_labels, data)
            self._full[source] = loaded
        full = self._full[source]
        spec = task.partition
        if spec.kind != "none" and not 0 <= client_index < spec.num_clients:
            raise UserError(f"client index {client_index} outside 0..{spec.num_clients - 1}")
        split_key = (*source, repr(spec))
        if split_key not in self._parts:
            self._parts[split_key] = partition(full.labels, spec)
        index = 0 if spec.kind == "none" else client_index
        shard_key = (*split_key, index)
        if shard_key not in self._shards:
            self._shards[shard_key] = full.subset(self._parts[split_key][index])
        return self._shards[shard_key]
